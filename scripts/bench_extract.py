"""Feature-extraction throughput in one run: reader-only, model-only and end-to-end patches/s.

    make bench-extract                                     # CPU-sized defaults (demo encoder)
    python scripts/bench_extract.py --size 61440 --copies 8 --encoder uni --random-weights   # GPU machine

Builds (once, cached under bench_out/) a 40x JPEG-tiled slide with wsi_pipeline.synthetic and the
patches a perfect segmentation keeps (cells whose centre is in the drawn tissue), then exposes it as
`--copies` slides (symlinks, distinct slide ids) so the end-to-end number includes per-slide work:
opening, choosing the reader, writing HDF5, the manifest. Measured, in this order:
  reader-only   the DataLoader workers producing encoder-sized uint8 batches, no model
  openslide     the same through the OpenSlide reference reader (fewer patches: it is slow)
  model-only    preprocess + forward on random uint8 batches already on the device
  end-to-end    `wsi_pipeline.extract.run` over all copies (the encoder's loading reported apart)
`--random-weights` saves random weights for uni / resnet50_trunc once (bench_out/weights/), so the real
weight-loading path runs without the gated files. Prints a table; writes bench_out/bench_extract.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from wsi_pipeline.encoders import UNI_ARCHITECTURE  # noqa: E402
from wsi_pipeline.config import compose_app  # noqa: E402
from wsi_pipeline.extract import CellKey, Extractor, Shard, build_encoder, make_loader, pick_device, run  # noqa: E402
from wsi_pipeline.h5io import write_patches  # noqa: E402
from wsi_pipeline.patch_reader import choose_reader  # noqa: E402
from wsi_pipeline.slide import Slide  # noqa: E402
from wsi_pipeline.synthetic import SyntheticSlide, blobs, known_tissue_patches, write_slide  # noqa: E402

log = logging.getLogger("bench_extract")


def build_slide(root: Path, size: int) -> tuple[Path, SyntheticSlide]:
    spec = SyntheticSlide(size, size, tissue=blobs(size, size, 4, seed=0, fill=0.6), mpp=0.25, app_mag=40)
    path = root / "source" / f"bench_{size}.tif"
    if not path.is_file():
        start = time.perf_counter()
        tmp = write_slide(path.with_suffix(".tmp.tif"), spec)
        tmp.rename(path)
        log.info("built %s in %.1f s", path, time.perf_counter() - start)
    return path, spec


def expose_copies(root: Path, source: Path, spec: SyntheticSlide, copies: int, max_patches: int | None) -> tuple[Path, Path]:
    slides, patches = root / "slides", root / "patches"
    for folder in (slides, patches):
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
    for k in range(copies):
        link = slides / f"bench_{k:02d}.tif"
        link.symlink_to(source.resolve())
        grid = known_tissue_patches(link, spec)
        if max_patches:
            grid.coords, grid.grid = grid.coords[:max_patches], grid.grid[:max_patches]
        write_patches(patches / f"{link.stem}.h5", grid)
    return slides, patches


def random_weights(root: Path, encoder: str) -> str | None:
    """A local file of random weights with the real architecture's keys (uni, resnet50_trunc)."""
    path = root / "weights" / f"{encoder}_random.bin"
    if encoder not in ("uni", "resnet50_trunc") or path.is_file():
        return str(path) if path.is_file() else None
    import timm
    import torchvision
    model = timm.create_model(**UNI_ARCHITECTURE) if encoder == "uni" else torchvision.models.resnet50()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return str(path)


def reader_only(extractor: Extractor, slides: list[Path]) -> dict:
    """The extraction's own stream of cells over `slides` (workers, slide preparation), without the model."""
    extractor.plan(slides)
    start, n = time.perf_counter(), 0
    for slide in slides:
        _, batches = extractor.slide_batches(slide)
        n += sum(len(batch["index"]) for batch in batches)
    seconds = time.perf_counter() - start  # includes starting the workers, as every run does once
    extractor.close()
    return {"patches": n, "seconds": round(seconds, 3), "patches_per_s": round(n / seconds, 1),
            "workers": extractor.num_workers}


def openslide_only(extractor: Extractor, keys: list[CellKey], batch_size: int = 8) -> dict:
    """The OpenSlide reference reader over the same cells, through the same DataLoader."""
    batches = [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)]
    loader = make_loader(batches, extractor.num_workers, pin_memory=False, prefetch_factor=4)
    start = time.perf_counter()
    n = sum(len(batch["index"]) for batch in loader)
    seconds = time.perf_counter() - start
    return {"patches": n, "seconds": round(seconds, 3), "patches_per_s": round(n / seconds, 1),
            "workers": extractor.num_workers}


def model_only(extractor: Extractor, batch_size: int, batches: int) -> dict:
    size = extractor.encoder.input_size
    device = extractor.device
    data = [torch.randint(0, 256, (batch_size, size, size, 3), dtype=torch.uint8, device=device) for _ in range(4)]
    for i in range(3):  # warm-up: cuDNN/cuBLAS choices, compilation
        extractor.forward(data[i % 4])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for i in range(batches):
        extractor.forward(data[i % 4])
    sync()
    seconds = time.perf_counter() - start
    return {"images": batches * batch_size, "seconds": round(seconds, 3),
            "images_per_s": round(batches * batch_size / seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out", type=Path)
    ap.add_argument("--size", type=int, default=16384, help="level-0 width = height of the 40x slide")
    ap.add_argument("--copies", type=int, default=2, help="slides (symlinks to the one built)")
    ap.add_argument("--max-patches", type=int, default=None, help="cells per slide (default: all tissue cells)")
    ap.add_argument("--encoder", default="random_proj_demo")
    ap.add_argument("--random-weights", action="store_true", help="random weights for uni / resnet50_trunc")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--num-workers", default="auto")
    ap.add_argument("--model-batches", type=int, default=20)
    ap.add_argument("--openslide-patches", type=int, default=400)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="where to write the results (default: OUT/bench_extract.json)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    root = args.out / "extract"
    source, spec = build_slide(root, args.size)
    slides, patches = expose_copies(root, source, spec, args.copies, args.max_patches)
    weights = random_weights(root, args.encoder) if args.random_weights else None
    overrides = [f"slides={slides}", f"patches={patches}", f"out={root / 'features'}", f"encoder={args.encoder}",
                 f"batch_size={args.batch_size}", f"num_workers={args.num_workers}", "overwrite=true",
                 f"compile={args.compile}"] + ([f"encoder.weights={weights}"] if weights else [])
    cfg = compose_app("extract", overrides)

    start = time.perf_counter()
    encoder = build_encoder(cfg)
    device = pick_device(cfg.device, Shard())
    extractor = Extractor(encoder, patches, root / "features", cfg, device)
    build_seconds = time.perf_counter() - start
    slide_paths = sorted(slides.iterdir())
    with Slide(slide_paths[0]) as slide:
        reference = choose_reader(slide, slide.read_plan(0.5, 512), "openslide")
    cells = known_tissue_patches(slide_paths[0], spec).coords[: args.max_patches]
    keys = [CellKey(reference, i, int(x), int(y), encoder.input_size) for i, (x, y) in enumerate(cells)]
    workers = extractor.num_workers
    results = {
        "machine": {"cpus": os.cpu_count(), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                    "torch": torch.__version__, "python": platform.python_version()},
        "setup": {"slide_px": args.size, "copies": args.copies, "cells_per_slide": len(cells),
                  "encoder": encoder.name, "input_size": encoder.input_size, "batch_size": args.batch_size,
                  "loader_batch_size": int(cfg.loader_batch_size), "workers": workers, "compile": args.compile,
                  "device": str(device), "reader": extractor.prepare(slide_paths[0]).source.reader},
        "encoder_build_s": round(build_seconds, 2),
    }
    results["reader_only"] = reader_only(extractor, slide_paths)
    results["reader_only_openslide"] = openslide_only(extractor, keys[: args.openslide_patches])
    results["model_only"] = model_only(extractor, args.batch_size, args.model_batches)
    extractor.close()
    del extractor
    start = time.perf_counter()
    outcomes = run(cfg, encoder=encoder)  # the encoder is built: its loading time is reported apart
    seconds = time.perf_counter() - start
    done = sum(o.n_patches for o in outcomes if o.status == "ok")
    results["end_to_end"] = {"slides": len(outcomes), "failed": sum(o.status == "failed" for o in outcomes),
                             "patches": done, "seconds": round(seconds, 3), "patches_per_s": round(done / seconds, 1)}
    out_json = args.json or args.out / "bench_extract.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=2))
    print(json.dumps(results["setup"]))
    print(f"{'measure':<26}{'count':>10}{'seconds':>10}{'per s':>12}")
    for name, key, unit in [("reader-only (" + results["setup"]["reader"] + ")", "reader_only", "patches"),
                            ("reader-only (openslide)", "reader_only_openslide", "patches"),
                            ("model-only", "model_only", "images"), ("end-to-end", "end_to_end", "patches")]:
        r = results[key]
        print(f"{name:<26}{r[unit]:>10}{r['seconds']:>10}{r[unit + '_per_s']:>12}")
    print(f"encoder build {results['encoder_build_s']} s (excluded from end-to-end); results in {out_json}")


if __name__ == "__main__":
    main()

"""Benchmark of preprocessing (segmentation + patching + QC outputs) per slide, on one CPU core.

    python scripts/bench_preprocess.py [--repeats 7] [--root bench_out]      (make bench-preprocess)

Builds once (cached under ROOT/slides) a 61 440 x 61 440 px JPEG-tiled 40x slide with tissue-like
texture and background (wsi_pipeline.synthetic), and a half-size one to show that memory does not
follow the full-resolution size. Each repeat runs in a fresh subprocess pinned to one core, which
times the stage's own steps (the functions `process_slide` is made of) and reports its peak RSS;
the parent also times the whole subprocess (interpreter start and imports included). A subprocess
that only imports the same modules gives the memory floor. Medians over the repeats are printed
as a Markdown table and written to ROOT/bench_preprocess.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FULL_SIZE = 61440  # level-0 pixels per side, as in BENCHMARKS.md's CLAM measurement


def bench_slide(root: Path, size: int) -> Path:
    """The cached benchmark slide of `size` x `size` px at 0.25 µm/px, built on first use."""
    from wsi_pipeline.h5io import atomic_path
    from wsi_pipeline.synthetic import Ellipse, SyntheticSlide, blobs, write_slide

    path = root / "slides" / f"bench_40x_{size}.tif"
    if not path.is_file():
        tissue = blobs(size, size, 5, seed=7, fill=0.3)
        holes = [Ellipse(e.cx, e.cy, e.rx * 0.25, e.ry * 0.2) for e in tissue[:2]]
        spec = SyntheticSlide(size, size, tissue, holes, mpp=0.25, app_mag=40, seed=3)
        print(f"building {path} (once) ...", file=sys.stderr, flush=True)
        with atomic_path(path) as tmp:
            write_slide(tmp, spec)
    return path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(slide: Path | None, out: Path | None) -> dict:
    """One measurement in this (fresh) process; with no slide, only the imports."""
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import cv2

    cv2.setNumThreads(1)
    from wsi_pipeline.preprocess import (OutputLayout, PreprocessSettings, patch_step, read_plan, segment_step,
                                         write_step)
    from wsi_pipeline.slide import Slide

    if slide is None:
        return {"peak_rss_mb": peak_rss_mb()}
    settings = PreprocessSettings()
    t0 = time.perf_counter()
    with Slide(slide) as s:
        plan = read_plan(s, settings)
        t1 = time.perf_counter()
        seg = segment_step(s, plan, settings)
        t2 = time.perf_counter()
        patches = patch_step(s, plan, seg, settings)
        t3 = time.perf_counter()
    write_step(OutputLayout(out), seg, patches, settings)
    t4 = time.perf_counter()
    return {"open_s": t1 - t0, "segment_s": t2 - t1, "patching_s": t3 - t2, "qc_outputs_s": t4 - t3,
            "slide_s": t4 - t0, "n_patches": len(patches), "mask_px": list(seg.mask.shape),
            "peak_rss_mb": peak_rss_mb()}


def measure(args: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=True)
    record = json.loads(result.stdout.strip().splitlines()[-1])
    record["process_wall_s"] = time.perf_counter() - start
    return record


def medians(runs: list[dict]) -> dict:
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    return {k: statistics.median(r[k] for r in runs) for k in keys} | {"repeats": len(runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--root", type=Path, default=REPO / "bench_out")
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        slide, out = (Path(args.child[0]), Path(args.child[1])) if args.child else (None, None)
        print(json.dumps(child(slide, out)))
        return
    results = {"imports_only": medians([measure(["--child"]) for _ in range(args.repeats)])}
    for size in (FULL_SIZE, FULL_SIZE // 2):
        slide = bench_slide(args.root, size)
        with tempfile.TemporaryDirectory(dir=args.root) as out:
            runs = [measure(["--child", str(slide), out]) for _ in range(args.repeats)]
        results[f"{size}x{size}"] = medians(runs) | {"mask_px": runs[0]["mask_px"]}
    (args.root / "bench_preprocess.json").write_text(json.dumps(results, indent=2))
    print(f"| slide (40x, JPEG) | segment s | patching s | QC outputs s | slide total s | process wall s "
          f"| peak RSS MB | patches |  (median of {args.repeats}, one core)")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if name != "imports_only":
            print(f"| {name} | {r['segment_s']:.3f} | {r['patching_s']:.4f} | {r['qc_outputs_s']:.3f} | "
                  f"{r['slide_s']:.3f} | {r['process_wall_s']:.2f} | {r['peak_rss_mb']:.0f} | {r['n_patches']:.0f} |")
    print(f"| imports only | | | | | {results['imports_only']['process_wall_s']:.2f} "
          f"| {results['imports_only']['peak_rss_mb']:.0f} | |")


if __name__ == "__main__":
    main()

"""Feature extraction (stage 3) on generated slides: readers, loader, files, resume, sharding, bad input."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import openslide
import pandas as pd
import pytest
import torch
from PIL import Image

from wsi_pipeline.encoders import create_encoder
from wsi_pipeline.config import ConfigError
from wsi_pipeline.extract import CellKey, Extractor, compose_config, make_loader, run
from wsi_pipeline.h5io import PatchGrid, read_features, read_patches, write_patches
from wsi_pipeline.patch_reader import READERS, JpegTileReader, choose_reader
from wsi_pipeline.slide import Slide, SlideError
from wsi_pipeline.stage import Shard
from wsi_pipeline.synthetic import SyntheticSlide, blobs, known_tissue_patches

REPO = Path(__file__).resolve().parents[1]
# The fast path decodes at 1/2 or 1/4 scale in the DCT domain where the reference decodes fully and
# resizes bilinearly: two slightly different low-pass filters. JPEG q85 compression of the same
# texture already costs about 2.2 grey levels mean |error| and 35 dB PSNR; the two paths must agree
# better than that.
FAST_MEAN_ABS_TOL, FAST_MIN_PSNR = 2.0, 36.0


def write_test_patches(slide_path: Path, out_dir: Path, spec: SyntheticSlide) -> Path:
    """patches/<id>.h5 for the cells whose centre lies in the known tissue (no preprocessing module needed)."""
    patches = known_tissue_patches(slide_path, spec)
    path = out_dir / f"{patches.attrs['slide_id']}.h5"
    write_patches(path, patches)
    return path


SPEC = dict(width=6144, height=4096)


@pytest.fixture(scope="module")
def cohort(slide_factory, tmp_path_factory):
    """Three small 40x slides with their patches files: (slides dir, patches dir)."""
    root = tmp_path_factory.mktemp("cohort")
    slides, patches = root / "slides", root / "patches"
    for k in range(3):
        spec = SyntheticSlide(**SPEC, tissue=blobs(SPEC["width"], SPEC["height"], 2, seed=10 + k, fill=0.6), seed=k)
        path = slide_factory(f"case{k}.tif", folder=slides, **SPEC, tissue=spec.tissue, seed=k)
        write_test_patches(path, patches, spec)
    return slides, patches


def extract_cfg(slides: Path, patches: Path, out: Path, *overrides: str):
    """The app's config as Hydra composes it; small CPU defaults, each replaceable by an override."""
    settings = {"slides": slides, "patches": patches, "out": out, "encoder": "random_proj_demo", "device": "cpu",
                "num_workers": 0, "batch_size": 4, "loader_batch_size": 4}
    settings.update(o.split("=", 1) for o in overrides)
    return compose_config([f"{k}={v}" for k, v in settings.items()])


def h5_content(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {**{k: f[k][:] for k in f}, **{f"@{k}": f.attrs[k] for k in f.attrs}}


def assert_same_files(a: Path, b: Path) -> None:
    ca, cb = h5_content(a), h5_content(b)
    assert ca.keys() == cb.keys()
    for key in ca:
        np.testing.assert_array_equal(ca[key], cb[key], err_msg=f"{a.name}: {key}")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(float) - b.astype(float)) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


# -- readers --------------------------------------------------------------------------------------
def as_encoder_input(image: np.ndarray, size: int) -> np.ndarray:
    """What Encoder.preprocess does to a reader's image before normalising: antialiased bilinear to `size`."""
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).numpy()


@pytest.mark.parametrize("fixture", ["slide_40x", "slide_20x"])
@pytest.mark.parametrize("out_size", [512, 224])
def test_jpeg_tiles_match_openslide_reference(request, fixture, out_size):
    with Slide(request.getfixturevalue(fixture)) as slide:
        plan = slide.read_plan(0.5, 512)
        source = choose_reader(slide, plan)
        assert source.reader == "jpeg_tiles"
        fast, reference = READERS["jpeg_tiles"](source), READERS["openslide"](source)
        natural = plan.read_size // fast.scale_for(out_size)  # the cheapest DCT scale with >= out_size px
        assert natural >= out_size and natural // 2 < out_size
        step = plan.patch_size_level0
        # tissue cells, a background cell, and cells hanging over the right/bottom edge and the origin
        cells = [(2 * step, step), (3 * step, 2 * step), (0, 0), (slide.dimensions[0] - step // 2, step),
                 (step, slide.dimensions[1] - step // 3), (-step // 2, -step // 4)]
        for x, y in cells:
            a, b = fast.read(x, y, out_size), reference.read(x, y, out_size)
            assert a.shape == (natural, natural, 3) and a.dtype == np.uint8 and b.shape == (512, 512, 3)
            a, b = as_encoder_input(a, out_size), as_encoder_input(b, out_size)
            assert np.abs(a - b).mean() <= FAST_MEAN_ABS_TOL, (x, y)
            assert psnr(a, b) >= FAST_MIN_PSNR, (x, y)
        # the cell hanging over the right edge is white beyond it, as OpenSlide draws it
        edge = fast.read(slide.dimensions[0] - step // 2, step, out_size)
        assert (edge[:, -natural // 4:] == 255).all()
        fast.close(), reference.close()


def test_jpeg_tiles_decode_at_reduced_dct_scale(slide_40x):
    with Slide(slide_40x) as slide:
        reader = JpegTileReader(choose_reader(slide, slide.read_plan(0.5, 512)))
    assert [reader.scale_for(s) for s in (1024, 512, 224, 112, 64)] == [1, 2, 4, 8, 8]
    reader.close()


def test_untiled_slide_falls_back_to_openslide(slide_factory):
    path = slide_factory("uncompressed.tif", width=2048, height=2048, compression=None)
    with Slide(path) as slide:
        assert choose_reader(slide, slide.read_plan(0.5, 512)).reader == "openslide"


def test_loader_cell_equals_direct_openslide_read_and_resize(cohort):
    """A cell through the DataLoader (worker processes, reader=openslide) equals OpenSlide read + resize, exactly."""
    slides, patches = cohort
    grid = read_patches(patches / "case0.h5")
    with Slide(slides / "case0.tif") as slide:
        plan = slide.read_plan(0.5, 512)
        source = choose_reader(slide, plan, "openslide")
    keys = [CellKey(source, i, int(x), int(y), 224) for i, (x, y) in enumerate(grid.coords[:5])]
    loader = make_loader([keys[:3], keys[3:]], num_workers=2, pin_memory=False, prefetch_factor=2)
    loaded = torch.cat([b["image"] for b in loader])
    osr = openslide.OpenSlide(str(slides / "case0.tif"))
    for i, (x, y) in enumerate(grid.coords[:5]):
        region = osr.read_region((int(x), int(y)), plan.read_level, (plan.read_size, plan.read_size)).convert("RGB")
        np.testing.assert_array_equal(loaded[i].numpy(), np.asarray(region.resize((512, 512), Image.BILINEAR)))


# -- the stage ------------------------------------------------------------------------------------
def test_features_row_aligned_with_coords(cohort, tmp_path):
    slides, patches = cohort
    outcomes = run(extract_cfg(slides, patches, tmp_path, "num_workers=2"))
    assert [o.status for o in outcomes] == ["ok"] * 3
    encoder = create_encoder("random_proj_demo")
    grid = read_patches(patches / "case1.h5")
    feats = read_features(tmp_path / "random_proj_demo" / "case1.h5")
    np.testing.assert_array_equal(feats.coords, grid.coords)
    np.testing.assert_array_equal(feats.grid, grid.grid)
    assert feats.features.shape == (len(grid), 128) and feats.features.dtype == np.float16
    assert {**grid.attrs, "encoder": "random_proj_demo", "embed_dim": 128,
            "weights_sha256": encoder.weights_sha256}.items() <= feats.attrs.items()
    # every row is the feature of its own cell: recompute a few rows from direct reads, in shuffled order
    with Slide(slides / "case1.tif") as slide:
        reader = READERS["jpeg_tiles"](choose_reader(slide, slide.read_plan(0.5, 512)))
    rows = np.random.default_rng(0).permutation(len(grid))[:4]
    images = torch.from_numpy(np.stack([reader.read(*grid.coords[i], 112) for i in rows]))
    with torch.no_grad():
        expected = encoder.model(encoder.preprocess(images)).numpy()
    np.testing.assert_allclose(feats.features[rows].astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    assert not np.allclose(feats.features[rows[0]], feats.features[rows[1]])
    manifest = pd.read_csv(tmp_path / "random_proj_demo" / "manifest.csv")
    assert manifest["status"].tolist() == ["ok"] * 3
    assert manifest["n_patches"].tolist() == [len(read_patches(patches / f"case{k}.h5")) for k in range(3)]


def test_model_batches_cut_across_loader_batches_keep_rows(cohort, tmp_path):
    """Loader batches of 3 gathered into model batches of 5 (and a ragged tail) give the same rows."""
    slides, patches = cohort
    run(extract_cfg(slides, patches, tmp_path / "a", "features_dtype=float32"))
    run(extract_cfg(slides, patches, tmp_path / "b", "features_dtype=float32", "batch_size=5", "loader_batch_size=3"))
    for k in range(3):
        a = read_features(tmp_path / "a" / "random_proj_demo" / f"case{k}.h5").features
        b = read_features(tmp_path / "b" / "random_proj_demo" / f"case{k}.h5").features
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_rerun_skips_finished_slides(cohort, tmp_path):
    slides, patches = cohort
    run(extract_cfg(slides, patches, tmp_path))
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "random_proj_demo").glob("*.h5")}
    outcomes = run(extract_cfg(slides, patches, tmp_path))
    assert [o.status for o in outcomes] == ["skipped"] * 3
    assert before == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "random_proj_demo").glob("*.h5")}


def test_interrupted_run_resumes_to_identical_files(cohort, tmp_path, monkeypatch):
    slides, patches = cohort
    run(extract_cfg(slides, patches, tmp_path / "clean"))
    from wsi_pipeline import extract
    calls = {"n": 0}
    forward = extract.Extractor.forward
    batches = [-(-len(read_patches(patches / f"case{k}.h5")) // 4) for k in range(2)]
    assert batches[1] >= 2

    def dies_in_second_slide(self, images):
        calls["n"] += 1
        if calls["n"] == batches[0] + 2:  # the second batch of slide case1
            raise KeyboardInterrupt
        return forward(self, images)

    monkeypatch.setattr(extract.Extractor, "forward", dies_in_second_slide)
    with pytest.raises(KeyboardInterrupt):
        run(extract_cfg(slides, patches, tmp_path / "resumed"))
    out = tmp_path / "resumed" / "random_proj_demo"
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".h5", ".tmp")) == ["case0.h5"]
    monkeypatch.setattr(extract.Extractor, "forward", forward)
    outcomes = run(extract_cfg(slides, patches, tmp_path / "resumed"))
    assert [o.status for o in outcomes] == ["skipped", "ok", "ok"]
    for k in range(3):
        assert_same_files(tmp_path / "clean" / "random_proj_demo" / f"case{k}.h5", out / f"case{k}.h5")


def cli(slides: Path, patches: Path, out: Path, *extra: str, launcher: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, *launcher, "-m", "wsi_pipeline.extract", f"slides={slides}", f"patches={patches}",
            f"out={out}", "encoder=random_proj_demo", "num_workers=0", "batch_size=2", "loader_batch_size=2", *extra]


def env() -> dict:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_killed_process_resumes_to_identical_files(cohort, tmp_path):
    """SIGKILL the app as soon as its first slide is written; the re-run finishes with identical files."""
    slides, patches = cohort
    out = tmp_path / "killed"  # reader=openslide: slow enough (about 0.5 s a slide) to be killed mid-run
    proc = subprocess.Popen(cli(slides, patches, out, "reader=openslide"), cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "random_proj_demo" / "case0.h5"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (out / "random_proj_demo").glob("*.h5"))
    assert proc.returncode == -signal.SIGKILL, f"the app ended by itself (exit {proc.returncode}) before the kill"
    assert done and len(done) < 3, f"the kill came too late to test resuming: {done}"
    subprocess.run(cli(slides, patches, out, "reader=openslide"), cwd=REPO, env=env(), check=True, capture_output=True)
    run(extract_cfg(slides, patches, tmp_path / "clean", "batch_size=2", "loader_batch_size=2", "reader=openslide"))
    assert not list((out / "random_proj_demo").glob("*.tmp"))
    for k in range(3):
        assert_same_files(tmp_path / "clean" / "random_proj_demo" / f"case{k}.h5",
                          out / "random_proj_demo" / f"case{k}.h5")


@pytest.mark.slow
def test_torchrun_two_processes_share_the_slides(cohort, tmp_path):
    slides, patches = cohort
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    result = subprocess.run(cli(slides, patches, tmp_path, launcher=launcher), cwd=REPO, env=env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "random_proj_demo"
    ranks = [set(pd.read_csv(out / f"manifest.rank{r}-of-2.csv")["slide_id"]) for r in range(2)]
    assert ranks[0] and ranks[1] and not ranks[0] & ranks[1]
    assert ranks[0] | ranks[1] == {"case0", "case1", "case2"}
    merged = pd.read_csv(out / "manifest.csv")
    assert sorted(merged["slide_id"]) == ["case0", "case1", "case2"] and set(merged["status"]) == {"ok"}
    run(extract_cfg(slides, patches, tmp_path / "single", "batch_size=2", "loader_batch_size=2"))
    for k in range(3):
        assert_same_files(tmp_path / "single" / "random_proj_demo" / f"case{k}.h5", out / f"case{k}.h5")


def test_shards_are_disjoint_and_complete():
    sources = [Path(f"s{k:02d}.svs") for k in range(11)]
    shards = [Shard(r, 4).take(sources) for r in range(4)]
    assert sorted(sum(shards, [])) == sorted(sources)
    assert sum(len(s) for s in shards) == 11


# -- bad input ------------------------------------------------------------------------------------
def copy_cohort(cohort, tmp_path: Path, cases: range | list[int] = range(3)) -> tuple[Path, Path]:
    """Links to (some of) the cohort's slides and patches files, in folders of their own."""
    slides, patches = tmp_path / "slides", tmp_path / "patches"
    slides.mkdir(), patches.mkdir()
    for k in cases:
        (slides / f"case{k}.tif").symlink_to(cohort[0] / f"case{k}.tif")
        (patches / f"case{k}.h5").symlink_to(cohort[1] / f"case{k}.h5")
    return slides, patches


@pytest.mark.parametrize("workers", [0, 2])
def test_missing_patches_file_fails_that_slide_only(cohort, tmp_path, workers):
    slides, patches = copy_cohort(cohort, tmp_path)
    (patches / "case1.h5").unlink()
    outcomes = {o.slide_id: o for o in run(extract_cfg(slides, patches, tmp_path / "out", f"num_workers={workers}"))}
    assert outcomes["case0"].status == outcomes["case2"].status == "ok"
    assert outcomes["case1"].status == "failed"
    assert "case1.h5: no patches file" in outcomes["case1"].error and "preprocess" in outcomes["case1"].error
    manifest = pd.read_csv(tmp_path / "out" / "random_proj_demo" / "manifest.csv", keep_default_na=False)
    assert manifest.set_index("slide_id").loc["case1", "status"] == "failed"
    assert not (tmp_path / "out" / "random_proj_demo" / "case1.h5").exists()


def test_truncated_slide_fails_that_slide_only(cohort, tmp_path):
    slides, patches = copy_cohort(cohort, tmp_path)
    data = (cohort[0] / "case2.tif").read_bytes()
    (slides / "case2.tif").unlink()
    (slides / "case2.tif").write_bytes(data[: len(data) // 2])
    outcomes = {o.slide_id: o for o in run(extract_cfg(slides, patches, tmp_path / "out"))}
    assert outcomes["case0"].status == outcomes["case1"].status == "ok"
    assert outcomes["case2"].status == "failed" and "case2.tif" in outcomes["case2"].error
    assert not (tmp_path / "out" / "random_proj_demo" / "case2.h5").exists()


@pytest.mark.parametrize("reader, workers", [("jpeg_tiles", 0), ("openslide", 0), ("jpeg_tiles", 2)])
def test_corrupt_tile_fails_that_slide_with_its_location(cohort, tmp_path, reader, workers):
    """Garbage in the middle of one tissue tile: the slide fails naming the cell, the run goes on."""
    slides, patches = copy_cohort(cohort, tmp_path)
    grid = read_patches(patches / "case0.h5")
    with Slide(cohort[0] / "case0.tif") as slide:
        level = JpegTileReader(choose_reader(slide, slide.read_plan(0.5, 512))).level
    def tile_of(x, y):
        return (y // level.tile_height) * level.tiles_across + x // level.tile_width

    # a tissue cell whose top-left tile is not the densest one (that one is probed when choosing the reader)
    x, y = next((x, y) for x, y in grid.coords[len(grid) // 2:] if tile_of(x, y) != np.argmax(level.byte_counts))
    tile = tile_of(x, y)
    data = bytearray((cohort[0] / "case0.tif").read_bytes())
    start = int(level.offsets[tile])
    data[start:start + int(level.byte_counts[tile])] = b"\x00" * int(level.byte_counts[tile])
    (slides / "case0.tif").unlink()
    (slides / "case0.tif").write_bytes(bytes(data))
    cfg = extract_cfg(slides, patches, tmp_path / "out", f"reader={reader}", f"num_workers={workers}", "loader_batch_size=2")
    outcomes = {o.slide_id: o for o in run(cfg)}
    assert outcomes["case1"].status == outcomes["case2"].status == "ok"
    assert outcomes["case0"].status == "failed", outcomes["case0"]
    assert "case0.tif" in outcomes["case0"].error and f"({x}, {y})" in outcomes["case0"].error


def test_missing_uni_weights_is_a_clear_error_from_the_app(cohort, tmp_path):
    slides, patches = cohort
    result = subprocess.run([sys.executable, "-m", "wsi_pipeline.extract", f"slides={slides}",
                             f"patches={patches}", f"out={tmp_path}", "encoder=uni"],
                            cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    said = result.stdout + result.stderr  # Hydra's logging goes to stdout
    assert "gated" in said and "encoder.weights=" in said and "Traceback" not in said


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16_extraction_matches_cpu_float32(cohort, tmp_path):
    """The GPU path (pinned memory, worker processes, bf16 autocast, channels-last) computes the CPU's features."""
    slides, patches = cohort
    run(extract_cfg(slides, patches, tmp_path / "cpu", "device=cpu", "features_dtype=float32"))
    run(extract_cfg(slides, patches, tmp_path / "gpu", "device=cuda", "precision=bf16", "num_workers=2",
                    "features_dtype=float32", "batch_size=16"))
    for k in range(3):
        cpu = read_features(tmp_path / "cpu" / "random_proj_demo" / f"case{k}.h5").features
        gpu = read_features(tmp_path / "gpu" / "random_proj_demo" / f"case{k}.h5").features
        assert np.linalg.norm(gpu - cpu) / np.linalg.norm(cpu) < 1e-2  # bf16 operands: 1e-3 .. 1e-2


def test_bare_cuda_means_this_ranks_gpu():
    from wsi_pipeline.extract import pick_device
    assert pick_device("cuda", Shard(3, 4, local_rank=1)) == torch.device("cuda", 1)
    assert pick_device("cuda:0", Shard(3, 4, local_rank=1)) == torch.device("cuda", 0)
    assert pick_device("cpu", Shard()) == torch.device("cpu")


def test_unreadable_patches_file_is_blamed_on_its_own_slide(cohort, tmp_path):
    """A slide prepared ahead (while the previous one is encoded) fails on its own turn, with its own name."""
    slides, patches = copy_cohort(cohort, tmp_path)
    (patches / "case1.h5").unlink()
    (patches / "case1.h5").write_bytes(b"not hdf5")
    outcomes = {o.slide_id: o for o in run(extract_cfg(slides, patches, tmp_path / "out", "num_workers=2"))}
    assert outcomes["case0"].status == outcomes["case2"].status == "ok"
    assert outcomes["case1"].status == "failed" and "case1.h5" in outcomes["case1"].error


def test_extracts_what_the_real_preprocessing_wrote(cohort, tmp_path):
    """patches/ from `wsi_pipeline.preprocess` (not the test helper) carry everything extraction needs."""
    from wsi_pipeline import preprocess
    slides, _ = cohort
    preprocess.run(preprocess.compose_config([f"slides={slides}", f"out={tmp_path / 'pre'}"]))
    outcomes = run(extract_cfg(slides, tmp_path / "pre" / "patches", tmp_path / "features"))
    assert [o.status for o in outcomes] == ["ok"] * 3 and all(o.n_patches > 0 for o in outcomes)
    for k in range(3):
        patches = read_patches(tmp_path / "pre" / "patches" / f"case{k}.h5")
        feats = read_features(tmp_path / "features" / "random_proj_demo" / f"case{k}.h5")
        np.testing.assert_array_equal(feats.coords, patches.coords)
        assert feats.features.shape == (len(patches), 128) and np.isfinite(feats.features).all()
        assert {k: v for k, v in patches.attrs.items() if k != "format_version"}.items() <= feats.attrs.items()


@pytest.mark.slow
def test_workers_start_after_the_parent_used_opencv_threads(cohort, tmp_path):
    """`make demo` runs preprocessing (parallel OpenCV) in the same process first: forked workers must not hang."""
    slides, patches = cohort
    script = (
        "import cv2, numpy as np\n"
        "cv2.setNumThreads(2); cv2.GaussianBlur(np.random.rand(3000, 3000).astype(np.float32), (0, 0), 5)\n"
        "from wsi_pipeline.extract import compose_config, run\n"
        f"outcomes = run(compose_config(['slides={slides}', 'patches={patches}', 'out={tmp_path}', 'device=cpu',"
        " 'encoder=random_proj_demo', 'num_workers=2', 'loader_batch_size=4']))\n"
        "assert [o.status for o in outcomes] == ['ok'] * 3, outcomes\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=90)  # about 8 s when it works
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the app and its hung workers
        proc.communicate()
        pytest.fail("extraction hung in its DataLoader workers after the parent had used OpenCV threads")
    assert proc.returncode == 0, stderr[-2000:]


def replace_patches(patches: Path, slide_id: str, grid: PatchGrid) -> None:
    """Put `grid` where the link patches/<slide_id>.h5 was (the cohort's own file stays intact)."""
    (patches / f"{slide_id}.h5").unlink()
    write_patches(patches / f"{slide_id}.h5", grid)


def test_patches_file_of_another_slide_fails_that_slide(cohort, tmp_path):
    """A patches file copied from another slide (or of another size or resolution) never gives features."""
    slides, patches = copy_cohort(cohort, tmp_path)
    replace_patches(patches, "case0", read_patches(cohort[1] / "case1.h5"))  # case1's patches as case0's
    with Slide(slides / "case1.tif") as slide:
        w, h = slide.dimensions
    wider = read_patches(cohort[1] / "case1.h5")
    wider.attrs["level0_dimensions"] = (w + 1024, h)
    replace_patches(patches, "case1", wider)
    coarser = read_patches(cohort[1] / "case2.h5")
    coarser.attrs["level0_mpp"] = 0.5
    replace_patches(patches, "case2", coarser)
    outcomes = {o.slide_id: o for o in run(extract_cfg(slides, patches, tmp_path / "out"))}
    assert {o.status for o in outcomes.values()} == {"failed"}
    for k, problem in enumerate(["slide_id is 'case1'", f"level-0 size is {w + 1024}x{h} px, the slide's {w}x{h}",
                                 "level-0 resolution is 0.5 µm/px, the slide's 0.25"]):
        error = outcomes[f"case{k}"].error
        assert f"case{k}.h5 does not belong to {slides / f'case{k}.tif'}" in error and problem in error, error
        assert "preprocessing" in error
    assert not list((tmp_path / "out" / "random_proj_demo").glob("*.h5"))


def test_patches_file_without_its_slide_is_reported(cohort, tmp_path, caplog):
    slides, patches = copy_cohort(cohort, tmp_path, [0])
    for k in (1, 2):
        (patches / f"case{k}.h5").symlink_to(cohort[1] / f"case{k}.h5")
    with caplog.at_level(logging.WARNING, logger="wsi_pipeline.extract"):
        outcomes = run(extract_cfg(slides, patches, tmp_path / "out"))
    assert [(o.slide_id, o.status) for o in outcomes] == [("case0", "ok")]
    assert f"{patches}: 2 patches file(s) have no slide in the slides folder and are not extracted: case1, case2" \
        in caplog.text


def test_patches_file_with_no_patches_fails_that_slide(cohort, tmp_path):
    slides, patches = copy_cohort(cohort, tmp_path, [0, 1])
    grid = read_patches(cohort[1] / "case1.h5")
    replace_patches(patches, "case1", PatchGrid(grid.coords[:0], grid.grid[:0], grid.attrs))
    outcomes = {o.slide_id: o for o in run(extract_cfg(slides, patches, tmp_path / "out"))}
    assert outcomes["case0"].status == "ok"
    assert outcomes["case1"].status == "failed" and "case1.h5: 0 patches" in outcomes["case1"].error
    assert not (tmp_path / "out" / "random_proj_demo" / "case1.h5").exists()


@pytest.fixture(scope="module")
def finished(cohort, tmp_path_factory):
    """A features folder that a run finished with the default test settings: out/random_proj_demo/."""
    out = tmp_path_factory.mktemp("finished")
    assert [o.status for o in run(extract_cfg(*cohort, out))] == ["ok"] * 3
    return out


@pytest.mark.parametrize("change, attr", [("encoder.seed=1", "weights_sha256"), ("encoder.embed_dim=64", "embed_dim"),
                                          ("encoder.input_size=224", "encoder_input_size"), ("patches", "read_size")])
def test_resume_refuses_finished_files_made_with_other_settings(cohort, finished, tmp_path, change, attr):
    """Skipping finished files made with other weights, width, input size or read plan would mix features."""
    slides, patches = cohort
    overrides = [change]
    if change == "patches":  # case2 re-preprocessed since, with another read plan
        slides, patches = copy_cohort(cohort, tmp_path)
        grid = read_patches(cohort[1] / "case2.h5")
        grid.attrs["read_size"] *= 2
        replace_patches(patches, "case2", grid)
        overrides = []
    out = finished / "random_proj_demo"
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(ConfigError) as err:
        run(extract_cfg(slides, patches, finished, *overrides))
    message = str(err.value)
    assert message.startswith(f"{out}: ") and f" {attr} " in message and "(this run: " in message, message
    assert "out=" in message and "overwrite=true" in message
    assert before == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}  # nothing written, not even the manifest


def test_unreadable_finished_file_is_redone(cohort, finished, tmp_path, caplog):
    out = tmp_path / "random_proj_demo"
    shutil.copytree(finished / "random_proj_demo", out)
    (out / "case2.h5").write_bytes(b"")  # e.g. a disk that filled up
    with caplog.at_level(logging.WARNING, logger="wsi_pipeline.stage"):
        outcomes = run(extract_cfg(*cohort, tmp_path))
    assert [o.status for o in outcomes] == ["skipped", "skipped", "ok"]
    assert f"{out / 'case2.h5'}: an existing output that cannot be read" in caplog.text
    assert_same_files(finished / "random_proj_demo" / "case2.h5", out / "case2.h5")


def test_duplicate_slide_ids_are_refused_before_sharding(cohort, tmp_path, monkeypatch):
    """case0.tif and case0.tiff fall on two ranks (0 and 1 of 2); each rank still refuses to start."""
    slides, patches = copy_cohort(cohort, tmp_path, [0, 1])
    (slides / "case0.tiff").symlink_to(cohort[0] / "case0.tif")
    assert [p.name for p in Shard(0, 2).take(sorted(slides.iterdir()))] == ["case0.tif", "case1.tif"]
    monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SlideError, match="two slides share the id 'case0'"):
        run(extract_cfg(slides, patches, tmp_path / "out"))
    assert not (tmp_path / "out" / "random_proj_demo").exists()


BAD_SETTINGS = [("features_dtype=bfloat16", "one of float16, float32"),
                ("reader=fast", "one of auto, openslide, jpeg_tiles"),
                ("num_workers=-1", "auto or a whole number >= 0"),
                ("precision=fp8", "one of bf16, fp16, fp32")]


@pytest.mark.parametrize("setting, valid", BAD_SETTINGS)
def test_bad_settings_stop_the_run_before_the_encoder_is_built(cohort, tmp_path, monkeypatch, setting, valid):
    from wsi_pipeline import extract
    monkeypatch.setattr(extract, "build_encoder", lambda cfg: pytest.fail("the encoder was built"))
    key, value = setting.split("=")
    with pytest.raises(ConfigError, match=f"invalid setting\\(s\\): {key}='?{value}'? \\(must be {valid}\\)"):
        run(extract_cfg(*cohort, tmp_path, setting))
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("case, code, said", [("bad setting", 2, "invalid setting(s): features_dtype='bfloat16'"),
                                               ("no patches", 1, "all 3 slides failed")])
def test_app_exit_status_on_bad_settings_and_when_every_slide_fails(cohort, tmp_path, case, code, said):
    slides, patches = cohort
    extra = ["features_dtype=bfloat16"] if case == "bad setting" else []
    if case == "no patches":
        patches = tmp_path / "empty"
        patches.mkdir()
    result = subprocess.run(cli(slides, patches, tmp_path / "out", *extra), cwd=REPO, env=env(), capture_output=True,
                            text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == code, output[-3000:]
    assert said in output and "Traceback" not in output


def test_float16_overflow_fails_the_slide_and_suggests_float32(cohort, tmp_path):
    """Features beyond float16's range (65504) are not stored as inf: the slide fails; float32 stores them."""
    slides, patches = copy_cohort(cohort, tmp_path, [0])
    encoder = create_encoder("random_proj_demo")
    encoder.model = torch.nn.Sequential(encoder.model, Scale(1e6))
    [outcome] = run(extract_cfg(slides, patches, tmp_path / "out"), encoder)
    assert outcome.status == "failed" and "not finite as float16" in outcome.error
    assert "set features_dtype=float32" in outcome.error
    assert not (tmp_path / "out" / "random_proj_demo" / "case0.h5").exists()
    [outcome] = run(extract_cfg(slides, patches, tmp_path / "out", "features_dtype=float32"), encoder)
    features = read_features(tmp_path / "out" / "random_proj_demo" / "case0.h5").features
    assert outcome.status == "ok" and np.isfinite(features).all() and np.abs(features).max() > 65504


class Scale(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def test_auto_workers_count_the_cpus_this_process_may_use(tmp_path, monkeypatch):
    """A container or batch job limited to 4 of a host's 64 cores: 3 workers, not 63."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cfg = extract_cfg(tmp_path, tmp_path, tmp_path, "num_workers=auto")
    extractor = Extractor(create_encoder("random_proj_demo"), tmp_path, tmp_path, cfg, torch.device("cpu"))
    assert extractor.num_workers == 3

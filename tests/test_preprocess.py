import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile

from wsi_pipeline import preprocess as preprocess_module
from wsi_pipeline.config import ConfigError
from wsi_pipeline.h5io import Manifest, file_lock, read_attrs, read_patches
from wsi_pipeline.preprocess import OutputLayout, compose_config, process_slide, run
from wsi_pipeline.qc import cell_borders
from wsi_pipeline.slide import SlideError, slide_id_of
from wsi_pipeline.stage import WORKER_DIED
from wsi_pipeline.synthetic import Ellipse

REPO = Path(__file__).resolve().parents[1]

# slide id -> a fragment of the one-line message its manifest row must carry
BAD = {
    "notes": "notes.svs: OpenSlide cannot open",
    "truncated": "truncated.tif: OpenSlide cannot open",
    "damaged": "damaged.tif: reading 1x1 px at level 0",
    "no_mpp": "no_mpp.tif: no µm/px in the slide's metadata",
    "blank": "blank.tif: no tissue found",
    "tiny": "tiny.tif: the slide (512x512 px at level 0) is smaller than one patch",
}


def link(target: Path, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        os.symlink(target, path)
    return path


def zero_last_tiles(data: bytes, path: Path, count: int = 8) -> bytes:
    """The slide with its last level-0 tiles zeroed: it opens, and its low-resolution levels read fine."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        start, end = page.dataoffsets[-count], page.dataoffsets[-1] + page.databytecounts[-1]
    return data[:start] + bytes(end - start) + data[end:]


@pytest.fixture(scope="module")
def cohort(slide_factory, slide_40x, slide_20x, tmp_path_factory) -> Path:
    """Two good slides and one of each bad input of the issue."""
    folder = tmp_path_factory.mktemp("cohort")
    link(slide_40x, folder / "good_40x.tif")
    link(slide_20x, folder / "good_20x.svs")
    (folder / "notes.svs").write_text("this is not a slide\n")
    data = slide_40x.read_bytes()
    (folder / "truncated.tif").write_bytes(data[: len(data) // 3])
    (folder / "damaged.tif").write_bytes(zero_last_tiles(data, slide_40x))
    slide_factory("no_mpp.tif", folder=folder, width=4096, height=4096, mpp=None, app_mag=None,
                  tissue=[Ellipse(2048, 2048, 1500, 1200)])
    slide_factory("blank.tif", folder=folder, width=2048, height=2048, tissue=())
    slide_factory("tiny.tif", folder=folder, width=512, height=512, tissue=[Ellipse(256, 256, 200, 150)])
    return folder


def preprocess(slides: Path, out: Path, *overrides: str):
    return run(compose_config([f"slides={slides}", f"out={out}", *overrides]))


@pytest.fixture(scope="module")
def pool_run(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    outcomes = preprocess(cohort, out, "workers=2")
    return out, outcomes


def test_bad_inputs_fail_alone_with_one_clear_message(pool_run):
    out, outcomes = pool_run
    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False).set_index("slide_id")
    assert sorted(manifest.index) == sorted([*BAD, "good_40x", "good_20x"])
    for slide_id, message in BAD.items():
        row = manifest.loc[slide_id]
        assert row.status == "failed" and row.n_patches == 0
        assert message in row.error and "\n" not in row.error and "Traceback" not in row.error
    assert "slide.mpp=" in manifest.loc["no_mpp"].error  # says how to pass the override
    layout = OutputLayout(out)
    for slide_id in BAD:  # nothing half-written for a failed slide
        assert not any(p.exists() for p in (layout.patches(slide_id), layout.tissue(slide_id), layout.thumbnail(slide_id)))
    assert not list(out.rglob("*.tmp"))


def test_good_slides_of_the_same_run_are_processed(pool_run):
    out, outcomes = pool_run
    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False).set_index("slide_id")
    layout = OutputLayout(out)
    for slide_id in ("good_40x", "good_20x"):
        patches = read_patches(layout.patches(slide_id))
        assert manifest.loc[slide_id].status == "ok" and manifest.loc[slide_id].n_patches == len(patches) > 0
        assert layout.tissue(slide_id).stat().st_size > 0 and layout.thumbnail(slide_id).stat().st_size > 0
    a40, a20 = (read_patches(layout.patches(s)) for s in ("good_40x", "good_20x"))
    # The same field of view at 40x and at 20x: the same lattice and (up to mask resolution) the same cells.
    assert a40.attrs["patch_size_level0"] == 1024 and a20.attrs["patch_size_level0"] == 512
    # 20x patches: read 1024 px at level 0 of the 40x slide (its next level is 1 µm/px), 512 px on the 20x one
    assert (a40.attrs["read_level"], a40.attrs["read_size"]) == (0, 1024)
    assert (a20.attrs["read_level"], a20.attrs["read_size"]) == (0, 512)
    assert a40.attrs["grid_shape"] == a20.attrs["grid_shape"] == (6, 8)
    np.testing.assert_array_equal(a40.grid, a20.grid)
    np.testing.assert_array_equal(a20.coords, a20.grid[:, ::-1] * 512)


def test_resume_skips_and_overwrite_redoes(slide_20x, tmp_path):
    slides = tmp_path / "slides"
    link(slide_20x, slides / "a.tif")
    (slides / "bad.svs").write_text("not a slide")
    out = tmp_path / "out"
    first = {o.slide_id: o for o in preprocess(slides, out)}
    h5 = OutputLayout(out).patches("a")
    stamp = h5.stat().st_mtime_ns
    second = {o.slide_id: o for o in preprocess(slides, out)}
    assert second["a"].status == "skipped" and second["a"].n_patches == first["a"].n_patches > 0
    assert second["bad"].status == "failed"  # failed slides are retried, not skipped
    assert h5.stat().st_mtime_ns == stamp
    third = {o.slide_id: o for o in preprocess(slides, out, "overwrite=true")}
    assert third["a"].status == "ok" and h5.stat().st_mtime_ns != stamp
    assert pd.read_csv(out / "manifest.csv").set_index("slide_id").loc["a", "status"] == "ok"


def test_mpp_override_rescues_a_slide_without_mpp(cohort, tmp_path):
    slides, out = tmp_path / "slides", tmp_path / "out"
    link(cohort / "no_mpp.tif", slides / "no_mpp.tif")
    (outcome,) = preprocess(slides, out, "slide.mpp=0.25")
    assert outcome.status == "ok"
    attrs = read_attrs(OutputLayout(out).patches("no_mpp"))
    assert attrs["level0_mpp"] == 0.25 and attrs["mpp_source"] == "override"
    # a resume with the same override skips it; another override, or none, would make other patches of it
    assert [o.status for o in preprocess(slides, out, "slide.mpp=0.25")] == ["skipped"]
    for overrides, difference in [(["slide.mpp=0.3"], "level0_mpp 0.25 (this run: 0.3)"),
                                  ([], "mpp_source override (this run: objective_power)")]:
        with pytest.raises(ConfigError, match=re.escape(f"{difference} in 1 file(s)")):
            preprocess(slides, out, *overrides)


def test_mpp_override_does_not_stop_the_resume_of_slides_with_their_own_mpp(finished, tmp_path):
    """The slide's metadata beats slide.mpp=, so its patches are the same under any override."""
    slides, out = finished
    assert read_attrs(OutputLayout(out).patches("a"))["mpp_source"] == "metadata"
    shutil.copytree(out, tmp_path / "out")
    assert [o.status for o in preprocess(slides, tmp_path / "out", "slide.mpp=0.3")] == ["skipped"]


def test_failed_write_leaves_no_partial_outputs(slide_20x, tmp_path):
    slides = tmp_path / "slides"
    link(slide_20x, slides / "a.tif")
    out = tmp_path / "out"
    out.mkdir()
    (out / "patches").write_text("a file where the patches folder should be")
    (outcome,) = preprocess(slides, out)
    assert outcome.status == "failed" and "FileExistsError" in outcome.error
    assert not (out / "tissue" / "a.geojson").exists() and not (out / "thumbnails" / "a.jpg").exists()
    assert not list(out.rglob("*.tmp"))


def test_missing_slides_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SlideError, match="nowhere: not a folder of slides"):
        preprocess(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlideError, match="empty: no slide files in this folder"):
        preprocess(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(SlideError, match="missing slides: python -m wsi_pipeline.preprocess slides=DIR out=DIR"):
        run(compose_config([f"out={tmp_path}"]))


def test_hydra_app_from_the_command_line(slide_20x, tmp_path):
    slides = tmp_path / "slides"
    link(slide_20x, slides / "a.tif")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "wsi_pipeline.preprocess", f"slides={slides}", f"out={out}",
           "patching.patch_size=256", "patching.tissue_threshold=0.5"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    attrs = read_attrs(out / "patches" / "a.h5")
    assert (attrs["patch_size"], attrs["patch_size_level0"], attrs["tissue_threshold"]) == (256, 256, 0.5)
    assert attrs["grid_shape"] == (12, 16)
    assert list((out / "logs" / "preprocess").glob("*/.hydra/config.yaml"))  # Hydra's record of the run
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "b.svs").write_bytes(b"not a slide")
    result = subprocess.run(cmd[:3] + [f"slides={bad}", f"out={tmp_path}/bad_out"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and "every slide failed (1)" in result.stdout + result.stderr  # not "done", rc 0


def test_bad_settings_fail_the_run_once_before_any_slide(slide_20x, tmp_path):
    """Not one traceback per slide, nor 13 million 1-px patches recorded as ok: a setting out of its range fails
    the run with one line naming the key and what it accepts, and nothing is written."""
    slides = tmp_path / "slides"
    link(slide_20x, slides / "a.tif")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "wsi_pipeline.preprocess", f"slides={slides}", f"out={out}", "segment.method=triangle",
           "patching.patch_size=-5", f"hydra.run.dir={tmp_path}/hydra"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output, output[-3000:]
    assert ("invalid setting(s): segment.method='triangle' (must be one of otsu, fixed); "
            "patching.patch_size=-5 (must be a whole number >= 16)") in output  # both groups, one message
    with pytest.raises(ConfigError, match=r"patching.patch_size=-5 \(must be a whole number >= 16\)"):
        run(compose_config([f"slides={slides}", f"out={out}", "patching.patch_size=-5"]))
    with pytest.raises(ConfigError, match=r"patching.tissue_threshold=1.5 \(must be a tissue fraction from 0 to 1\)"):
        run(compose_config([f"slides={slides}", f"out={out}", "patching.tissue_threshold=1.5"]))
    with pytest.raises(ConfigError, match=r"slide.mpp=-0.25 \(must be null or level-0 µm/px > 0\)"):
        run(compose_config([f"slides={slides}", f"out={out}", "slide.mpp=-0.25"]))
    assert not out.exists()


def test_qc_draws_the_borders_of_kept_cells_only():
    kept = np.array([[False, True, False], [False, False, False]])
    borders = cell_borders((20, 30), (10.0, 10.0), kept)
    expected = np.zeros((20, 30), bool)
    expected[0:10, 10:20] = True
    expected[1:9, 11:19] = False  # the inside of the kept cell stays as it is
    np.testing.assert_array_equal(borders, expected)


def test_thumbnail_has_the_mask_size_and_patch_borders(pool_run):
    out, _ = pool_run
    thumb = cv2.imread(str(OutputLayout(out).thumbnail("good_40x")))[..., ::-1]
    patches = read_patches(OutputLayout(out).patches("good_40x"))
    assert thumb.shape == (192, 256, 3)  # the 8 µm/px mask of an 8192 x 6144 px slide at 0.25 µm/px
    step = 256 // 8  # thumbnail pixels per lattice cell (8 columns)
    kept = np.zeros((6, 8), bool)
    kept[patches.grid[:, 0], patches.grid[:, 1]] = True
    (row, col), (empty_row, empty_col) = np.argwhere(kept)[0], np.argwhere(~kept)[0]

    def green(r, c, offset):  # mean green of a row of the cell (r, c), `offset` pixels below its top edge
        return thumb[r * step + offset, c * step + 2: (c + 1) * step - 2, 1].mean()

    # The border colour PATCH_RGB has no green; tissue (~140) and glass (~240) have plenty.
    assert green(row, col, 0) < 80 and green(row, col, step // 2) > 100
    assert green(empty_row, empty_col, 0) > 100


def test_tissue_without_a_cell_at_the_threshold_fails_with_its_message(slide_20x, tmp_path):
    """0.86 mm² of tissue in blobs, but no 512 µm cell entirely tissue: the documented message, nothing written."""
    slides = tmp_path / "slides"
    link(slide_20x, slides / "a.tif")
    (outcome,) = preprocess(slides, tmp_path / "out", "patching.patch_size=1024", "patching.tissue_threshold=1.0")
    assert outcome.status == "failed" and outcome.error.startswith(f"{slides / 'a.tif'}: ")
    assert "mm² of tissue but no lattice cell is at least 100% tissue; lower patching.tissue_threshold" in outcome.error
    assert not any(p.exists() for p in OutputLayout(tmp_path / "out").outputs("a"))


# -- worker processes, overwrite and resume, shards ------------------------------------------------------------
def dies_on_b(source: Path, **kwargs) -> int:
    """process_slide, except that slide b kills its process as a segfault or the OOM killer would."""
    if slide_id_of(source) == "b":
        os.kill(os.getpid(), signal.SIGKILL)
    return process_slide(source, **kwargs)


def test_a_worker_that_dies_fails_its_slide_only(slide_20x, tmp_path, monkeypatch):
    slides, out = tmp_path / "slides", tmp_path / "out"
    for name in "abcd":
        link(slide_20x, slides / f"{name}.tif")
    monkeypatch.setattr(preprocess_module, "process_slide", dies_on_b)
    outcomes = {o.slide_id: o for o in preprocess(slides, out, "workers=2")}
    assert {sid: o.status for sid, o in outcomes.items()} == {"a": "ok", "b": "failed", "c": "ok", "d": "ok"}
    assert outcomes["b"].error == f"{slides / 'b.tif'}: {WORKER_DIED}"
    manifest = Manifest(out / "manifest.csv").rows
    assert sorted(manifest) == ["a", "b", "c", "d"] and manifest["b"]["error"] == outcomes["b"].error
    assert [manifest[s]["status"] for s in "acd"] == ["ok"] * 3
    assert not any(p.exists() for p in OutputLayout(out).outputs("b")) and not list(out.rglob("*.tmp"))


NO_TISSUE = "segment.min_tissue_mm2=1000"  # segmentation settings are not recorded in the patches file


def test_overwrite_removes_the_old_outputs_of_a_slide_that_now_fails(slide_20x, tmp_path):
    """Else the old patches stay, and the next plain run skips the slide with them (and extraction uses them)."""
    slides, out = tmp_path / "slides", tmp_path / "out"
    link(slide_20x, slides / "a.tif")
    link(slide_20x, slides / "b.tif")
    assert [o.status for o in preprocess(slides, out)] == ["ok", "ok"]
    (slides / "b.tif").unlink()
    (failed,) = preprocess(slides, out, "overwrite=true", NO_TISSUE)
    assert failed.status == "failed" and "a.tif: no tissue found" in failed.error
    layout = OutputLayout(out)
    assert not any(p.exists() for p in layout.outputs("a"))
    assert all(p.exists() for p in layout.outputs("b"))  # not in this run: left alone
    (again,) = preprocess(slides, out, NO_TISSUE)
    assert again.status == "failed"


@pytest.fixture(scope="module")
def finished(slide_20x, tmp_path_factory):
    """slides/a.tif and the folder a default run made of it."""
    root = tmp_path_factory.mktemp("finished")
    link(slide_20x, root / "slides" / "a.tif")
    assert [o.status for o in preprocess(root / "slides", root / "out")] == ["ok"]
    return root / "slides", root / "out"


@pytest.mark.parametrize("setting, difference", [("patching.patch_size=256", "patch_size 512 (this run: 256)"),
                                                 ("patching.target_mpp=1.0", "target_mpp 0.5 (this run: 1.0)"),
                                                 ("patching.tissue_threshold=0.5",
                                                  "tissue_threshold 0.25 (this run: 0.5)"),
                                                 ("segment.min_saturation=40",
                                                  "segment_min_saturation 15 (this run: 40)"),
                                                 ("segment.method=fixed", "segment_method otsu (this run: fixed)")])
def test_resume_refuses_patches_made_with_other_settings(finished, tmp_path, setting, difference):
    slides, out = finished
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(ConfigError) as err:
        preprocess(slides, out, setting)
    message = str(err.value)
    assert message.startswith(f"{out}: 1 of its 1 finished patches files were made with other settings"), message
    assert f"{difference} in 1 file(s)" in message and "out=ANOTHER_FOLDER" in message and "overwrite=true" in message
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*")}  # nothing written, not even the manifest
    shutil.copytree(out, tmp_path / "out")
    (redone,) = preprocess(slides, tmp_path / "out", setting, "overwrite=true")
    assert redone.status == "ok"


def test_resume_does_not_compare_settings_a_file_does_not_record(finished, tmp_path):
    """Patches files written before the segmentation settings were recorded resume under any of them."""
    slides, out = finished
    shutil.copytree(out, tmp_path / "out")
    with h5py.File(tmp_path / "out" / "patches" / "a.h5", "a") as f:
        for key in [k for k in f.attrs if k.startswith("segment_")]:
            del f.attrs[key]
    (outcome,) = preprocess(slides, tmp_path / "out", "segment.min_saturation=40")
    assert outcome.status == "skipped"


def test_two_shards_run_one_after_the_other_cover_the_folder(slide_20x, tmp_path, monkeypatch):
    slides, out = tmp_path / "slides", tmp_path / "out"
    ids = ["001", "002", "010", "1e5"]  # ids that look like numbers stay text through the shards' manifests
    for slide_id in ids:
        link(slide_20x, slides / f"{slide_id}.tif")
    monkeypatch.setenv("WORLD_SIZE", "2")
    shards = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        shards.append({o.slide_id for o in preprocess(slides, out)})
        assert (out / f"manifest.rank{rank}-of-2.csv").is_file()
    assert shards == [{"001", "010"}, {"002", "1e5"}]
    assert all(OutputLayout(out).patches(slide_id).is_file() for slide_id in ids)
    manifest = pd.read_csv(out / "manifest.csv", dtype=str)
    assert sorted(manifest["slide_id"]) == ids and set(manifest["status"]) == {"ok"}


def test_a_second_run_of_the_same_shard_into_one_folder_stops(finished, tmp_path):
    """While a run writes a folder, another run of the same shard there stops with one message (two unsharded runs
    would each do every slide); another shard may run beside it, and the folder is free once the run ends."""
    slides, out = finished
    shutil.copytree(out, tmp_path / "out")
    out = tmp_path / "out"
    with file_lock(out / ".run-manifest.lock", wait=False):  # held as a running unsharded run holds it
        before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
        with pytest.raises(ConfigError, match=r"another run is writing this folder \(it holds .*\.run-manifest\.lock\)"
                           r".*RANK=r WORLD_SIZE=n .*shard\.rank=r shard\.world_size=n"):
            preprocess(slides, out)
        assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*")}
        assert [o.status for o in preprocess(slides, out, "shard.rank=0", "shard.world_size=2")] == ["skipped"]
    (outcome,) = preprocess(slides, out)
    assert outcome.status == "skipped"


def test_a_hydra_sweep_over_shard_ranks_covers_the_folder(slide_20x, tmp_path):
    """DESIGN's route: Hydra's launcher (submitit_local here, submitit_slurm on a cluster) runs one job per
    shard.rank; together they do every slide once and leave one complete manifest."""
    slides, out = tmp_path / "slides", tmp_path / "out"
    for slide_id in ("a", "b", "c"):
        link(slide_20x, slides / f"{slide_id}.tif")
    cmd = [sys.executable, "-m", "wsi_pipeline.preprocess", "-m", "hydra/launcher=submitit_local", f"slides={slides}",
           f"out={out}", "shard.world_size=2", "shard.rank=0,1"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    manifest = pd.read_csv(out / "manifest.csv", dtype=str)
    assert sorted(manifest["slide_id"]) == ["a", "b", "c"] and set(manifest["status"]) == {"ok"}
    assert {f.name for f in out.glob("manifest.rank*")} == {"manifest.rank0-of-2.csv", "manifest.rank1-of-2.csv"}


@pytest.mark.parametrize("rank, world_size", [("2", "2"), ("x", "2"), ("0", "0")])
def test_bad_rank_is_a_clear_error(slide_20x, tmp_path, monkeypatch, rank, world_size):
    link(slide_20x, tmp_path / "slides" / "a.tif")
    monkeypatch.setenv("RANK", rank), monkeypatch.setenv("WORLD_SIZE", world_size)
    with pytest.raises(ConfigError, match="RANK"):
        preprocess(tmp_path / "slides", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_killed_process_resumes_where_it_stopped(slide_40x, tmp_path):
    """SIGKILL the app as soon as its first slide is written; the re-run skips it and finishes the rest."""
    slides, out = tmp_path / "slides", tmp_path / "out"
    names = [f"s{k}" for k in range(8)]
    for name in names:
        link(slide_40x, slides / f"{name}.tif")
    cmd = [sys.executable, "-m", "wsi_pipeline.preprocess", f"slides={slides}", f"out={out}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((out / "patches").glob("*.h5")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.stem for p in (out / "patches").glob("*.h5"))
    assert proc.returncode == -signal.SIGKILL, f"the app ended by itself (exit {proc.returncode}) before the kill"
    assert done and len(done) < len(names), f"the kill came too late to test resuming: {done}"
    stamps = {sid: OutputLayout(out).patches(sid).stat().st_mtime_ns for sid in done}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = Manifest(out / "manifest.csv").rows
    assert {sid: row["status"] for sid, row in manifest.items()} == {
        sid: "skipped" if sid in done else "ok" for sid in names}
    assert stamps == {sid: OutputLayout(out).patches(sid).stat().st_mtime_ns for sid in done}
    assert not list(out.rglob("*.tmp"))
    preprocess(slides, tmp_path / "clean")
    for sid in names:
        a, b = read_patches(OutputLayout(out).patches(sid)), read_patches(OutputLayout(tmp_path / "clean").patches(sid))
        np.testing.assert_array_equal(a.coords, b.coords)
        assert a.attrs == b.attrs

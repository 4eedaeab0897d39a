import numpy as np
import pandas as pd
import pytest

from wsi_pipeline import h5io
from wsi_pipeline.h5io import (FORMAT_VERSION, FeatureGrid, FormatError, Manifest, PatchGrid, atomic_path,
                               read_features, read_patches, write_features, write_patches)


def test_patches_round_trip(tmp_path):
    grid = np.array([[0, 1], [2, 3]], np.int32)
    patches = PatchGrid(grid[:, ::-1] * 1024, grid, {"slide_id": "a", "grid_shape": (3, 4), "target_mpp": 0.5})
    write_patches(tmp_path / "a.h5", patches)
    back = read_patches(tmp_path / "a.h5")
    assert back.coords.dtype == np.int64 and back.grid.dtype == np.int32
    np.testing.assert_array_equal(back.coords, [[1024, 0], [3072, 2048]])
    assert back.attrs["grid_shape"] == (3, 4) and back.attrs["format_version"] == FORMAT_VERSION
    assert not list(tmp_path.glob("*.tmp"))


def test_features_must_be_row_aligned(tmp_path):
    with pytest.raises(ValueError, match="row-aligned"):
        FeatureGrid(np.zeros((3, 2)), np.zeros((3, 2)), {}, features=np.zeros((2, 8)))
    fg = FeatureGrid(np.zeros((3, 2)), np.zeros((3, 2)), {"encoder": "x"}, features=np.ones((3, 8), np.float16))
    write_features(tmp_path / "f.h5", fg)
    back = read_features(tmp_path / "f.h5")
    assert back.features.dtype == np.float16 and back.features.shape == (3, 8)


def test_atomic_path_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "good"
    assert not list(tmp_path.glob("*.tmp"))


def test_reading_a_corrupt_file_names_it(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"garbage")
    with pytest.raises(FormatError, match="bad.h5"):
        read_patches(bad)


def test_manifest_updates_rows_and_survives_reload(tmp_path):
    m = Manifest(tmp_path / "manifest.csv")
    m.record("b", "/s/b.svs", "failed", error="no tissue")
    m.record("a", "/s/a.svs", "ok", 12, 1.5)
    m.record("b", "/s/b.svs", "ok", 3, 0.5)
    frame = pd.read_csv(tmp_path / "manifest.csv", keep_default_na=False)
    assert list(frame.columns) == ["slide_id", "source", "status", "n_patches", "seconds", "error"]
    assert frame.slide_id.tolist() == ["a", "b"] and frame.n_patches.tolist() == [12, 3]
    assert Manifest(tmp_path / "manifest.csv").rows["b"]["status"] == "ok"


def test_atomic_path_is_private_to_its_process_and_clears_dead_leftovers(tmp_path):
    """Two processes writing one file (the folds of a sweep, each rewriting summary.csv) must not share a temporary
    file: one would rename or delete the other's. A killed process's leftover is removed by the next writer."""
    import os
    import subprocess
    import sys

    target = tmp_path / "summary.csv"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = h5io._HOST
    leftover = tmp_path / f"summary.csv.{host}-{int(dead.stdout)}-0123abcd.tmp"
    leftover.write_text("killed mid-write")
    other_host = tmp_path / f"summary.csv.elsewhere-{int(dead.stdout)}-0123abcd.tmp"
    other_host.write_text("a live writer on another machine sharing the disk")
    with atomic_path(target) as first:
        assert not leftover.exists() and other_host.exists()
        first.write_text("first")
        with atomic_path(target) as second:  # another writer while the first is open
            second.write_text("second")
        assert first.exists(), "a second writer removed or renamed the first one's temporary file"
        assert first.name.startswith(f"summary.csv.{host}-{os.getpid()}-")
    assert target.read_text() == "first"
    assert {p.name for p in tmp_path.iterdir()} == {other_host.name, "summary.csv"}


@pytest.mark.parametrize("ids", [["001", "002", "1e5"], ["TRUE", "FALSE"]])
def test_manifest_keeps_slide_ids_that_look_like_numbers(tmp_path, ids):
    """A re-run reads the manifest back: ids such as 001 or 1e5 must stay those ids (read as numbers, 001 became 1,
    a second row was added for "001", and sorting str with number ids failed)."""
    first = Manifest(tmp_path / "manifest.csv")
    for slide_id in ids:
        first.record(slide_id, f"/slides/{slide_id}.tif", "ok", 3, 1.5)
    again = Manifest(tmp_path / "manifest.csv")
    again.record(ids[0], f"/slides/{ids[0]}.tif", "skipped", 3)
    frame = pd.read_csv(tmp_path / "manifest.csv", dtype=str, keep_default_na=False)
    assert sorted(frame.slide_id) == sorted(ids)
    assert frame.set_index("slide_id").loc[ids[0], "status"] == "skipped"
    assert again.rows[ids[1]]["n_patches"] == 3

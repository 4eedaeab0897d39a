"""Attention heatmaps: percentile normalisation, cell painting, canvases (slide, thumbnail, blank)."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
from PIL import Image

from wsi_pipeline import heatmap
from wsi_pipeline.h5io import FormatError, PatchGrid

STEP = 1024  # patch_size_level0 of a 40x slide at 20x / 512 px


def lattice(cells: list[tuple[int, int]], grid_shape: tuple[int, int] = (6, 8)) -> PatchGrid:
    grid = np.asarray(cells)
    return PatchGrid(grid[:, ::-1] * STEP, grid, {"patch_size_level0": STEP, "grid_shape": grid_shape})


def heat(pixel: np.ndarray) -> int:
    """Red minus blue: large on the hot end of 'jet', negative on the cold end."""
    return int(pixel[0]) - int(pixel[2])


def centre(canvas: heatmap.Canvas, row: int, col: int) -> tuple[int, int]:
    """Canvas (y, x) of a lattice cell's centre."""
    return int((row + 0.5) * STEP * canvas.scale[1]), int((col + 0.5) * STEP * canvas.scale[0])


def test_percentile_scores_are_ranks_in_unit_interval():
    scores = heatmap.percentile_scores(np.array([0.5, 1e-6, 3.0, 0.5]))
    np.testing.assert_allclose(scores, [0.5, 0.0, 1.0, 0.5])  # ties share their mean rank
    assert heatmap.percentile_scores(np.array([7.0])).tolist() == [1.0]


def test_cell_values_places_each_patch_on_its_lattice_cell():
    grid = lattice([(0, 0), (2, 5), (5, 7)])
    cells = heatmap.cell_values(np.array([0.1, 0.2, 0.3]), grid)
    assert cells.shape == (6, 8)
    assert cells[2, 5] == pytest.approx(0.2) and cells[5, 7] == pytest.approx(0.3)
    assert np.isnan(cells).sum() == 6 * 8 - 3


def test_lattice_grows_when_a_patch_lies_outside_grid_shape():
    assert heatmap.lattice_shape(lattice([(0, 0), (7, 9)], grid_shape=(6, 8))) == (8, 10)


def test_high_attention_cell_is_hotter_than_low_one_on_blank_canvas():
    grid = lattice([(1, 1), (1, 2), (4, 6)])
    canvas = heatmap.blank_canvas(grid, max_size=400)
    painted = heatmap.paint(canvas, heatmap.percentile_scores(np.array([0.9, 0.05, 0.4])), grid, alpha=0.6)
    hot, cold, middle = (painted[centre(canvas, r, c)] for r, c in [(1, 1), (1, 2), (4, 6)])
    assert heat(hot) > heat(middle) > heat(cold)
    assert tuple(painted[centre(canvas, 3, 3)]) == heatmap.BLANK_RGB  # no patch there: untouched


def test_alpha_zero_leaves_the_canvas_unchanged():
    grid = lattice([(1, 1), (2, 2)])
    canvas = heatmap.blank_canvas(grid, max_size=200)
    np.testing.assert_array_equal(heatmap.paint(canvas, np.array([1.0, 0.0]), grid, alpha=0.0), canvas.image)


def test_heatmap_over_real_slide_is_aligned_with_its_cells(slide_40x):
    """8192 x 6144 px slide, 1024 px cells: paint two cells and find them at the right canvas pixels."""
    canvas = heatmap.canvas_from_slide(slide_40x, thumbnail_mpp=8.0, max_size=600)
    assert canvas.source == "slide" and max(canvas.image.shape[:2]) <= 600
    assert canvas.scale[0] == pytest.approx(canvas.image.shape[1] / 8192)
    grid = lattice([(2, 3), (4, 6)])
    painted = heatmap.paint(canvas, np.array([1.0, 0.0]), grid, alpha=0.7)
    assert heat(painted[centre(canvas, 2, 3)]) > 80 > -80 > heat(painted[centre(canvas, 4, 6)])
    np.testing.assert_array_equal(painted[centre(canvas, 0, 0)], canvas.image[centre(canvas, 0, 0)])


def test_canvas_falls_back_from_slide_to_thumbnail_to_blank(tmp_path, caplog):
    grid = lattice([(0, 0), (5, 7)])
    thumbs = tmp_path / "out" / "thumbnails"
    thumbs.mkdir(parents=True)
    Image.new("RGB", (400, 300), (200, 120, 160)).save(thumbs / "s1.jpg")
    canvas = heatmap.load_canvas(grid, "s1", slides=tmp_path / "no_slides", thumbnails=tmp_path / "out")
    assert canvas.source == "thumbnail" and canvas.scale == pytest.approx((400 / (8.5 * STEP), 300 / (6.5 * STEP)))
    assert "no slide file for s1" in caplog.text
    assert heatmap.load_canvas(grid, "s2", thumbnails=thumbs).source == "blank"
    assert "no thumbnail for s2" in caplog.text
    (thumbs / "s3.jpg").write_bytes(b"not a jpeg")
    assert heatmap.load_canvas(grid, "s3", thumbnails=thumbs).source == "blank"
    assert "s3.jpg: unreadable thumbnail" in caplog.text


def test_canvas_and_attention_warnings_go_to_the_note_callback(tmp_path):
    notes: list[str] = []
    assert heatmap.load_canvas(lattice([(0, 0)]), "s1", slides=tmp_path, thumbnails=tmp_path,
                               note=notes.append).source == "blank"
    with h5py.File(tmp_path / "attention_test.h5", "w") as f:
        f.create_dataset("a", data=np.ones(1, dtype=np.float32))
    assert list(heatmap.read_attention(tmp_path / "attention_test.h5", ["a", "s1"], note=notes.append)) == ["a"]
    assert notes == [f"{tmp_path}: no slide file for s1; using the thumbnail or a blank canvas",
                     f"{tmp_path}: no thumbnail for s1; drawing on a blank canvas",
                     f"{tmp_path / 'attention_test.h5'}: no attention for 1 slide(s): s1; no heatmap for them"]


def test_slide_without_a_small_level_is_not_read_whole(slide_40x, monkeypatch, caplog):
    monkeypatch.setattr(heatmap, "MAX_LEVEL_PIXELS", 1000)
    canvas = heatmap.load_canvas(lattice([(0, 0)]), "slide_40x", slides=slide_40x.parent)
    assert canvas.source == "blank" and "too large to read as a thumbnail" in caplog.text


def test_heatmap_figure_rejects_attention_of_the_wrong_length():
    grid = lattice([(0, 0), (1, 1)])
    with pytest.raises(FormatError, match="3 attention values for 2 patches"):
        heatmap.heatmap_figure(heatmap.blank_canvas(grid), np.ones(3), grid, "s1")


def test_read_attention_warns_about_missing_slides_and_missing_file(tmp_path, caplog):
    path = tmp_path / "attention_test.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("a", data=np.arange(3, dtype=np.float32))
    found = heatmap.read_attention(path, ["a", "b"])
    assert list(found) == ["a"] and found["a"].tolist() == [0, 1, 2]
    assert "no attention for 1 slide(s): b" in caplog.text
    with pytest.raises(FormatError, match="missing.h5: no such file"):
        heatmap.read_attention(tmp_path / "missing.h5", ["a"])


def test_heatmap_over_a_real_preprocessing_thumbnail(slide_40x, tmp_path):
    """Preprocess a slide for real, then paint its first (top-left) patch hot and another early one cold."""
    from wsi_pipeline.h5io import read_patches
    from wsi_pipeline.preprocess import PreprocessSettings, compose_config, process_slide

    settings = PreprocessSettings.from_config(compose_config(["slides=unused", f"out={tmp_path}"]))
    process_slide(slide_40x, tmp_path, settings)
    grid = read_patches(tmp_path / "patches" / "slide_40x.h5")
    canvas = heatmap.load_canvas(grid, "slide_40x", thumbnails=tmp_path)
    assert canvas.source == "thumbnail"
    thumb_w = Image.open(tmp_path / "thumbnails" / "slide_40x.jpg").width
    assert canvas.scale[0] == pytest.approx(thumb_w / 8192)  # exact: the patches file knows the slide's size
    first, cold = 0, int(np.argmax(grid.grid.sum(1) == grid.grid[0].sum() + 1))  # a neighbour of the first cell
    values = np.full(len(grid), 0.5)
    values[first], values[cold] = 1.0, 0.0
    painted = heatmap.paint(canvas, values, grid, alpha=0.7)
    hot_px, cold_px = (painted[centre(canvas, *grid.grid[i])] for i in (first, cold))
    assert heat(hot_px) > 80 and heat(cold_px) < -80

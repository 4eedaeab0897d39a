
import numpy as np
import pytest

from wsi_pipeline.h5io import FORMAT_VERSION
from wsi_pipeline.patching import cell_tissue_fraction, lattice_shape, patch_grid, select_cells
from wsi_pipeline.segment import SegmentParams, segment_slide
from wsi_pipeline.slide import Slide
from wsi_pipeline.synthetic import blobs

DESIGN_ATTRS = {"slide_id", "patch_size", "target_mpp", "level0_mpp", "patch_size_level0", "read_level", "read_size",
                "grid_shape", "tissue_threshold", "format_version", "level0_dimensions"}


def brute_force_fraction(mask: np.ndarray, up: int, cell: int, shape: tuple[int, int]) -> np.ndarray:
    """Each mask pixel blown up to up x up sub-pixels; cells of cell x cell sub-pixels averaged."""
    fine = np.repeat(np.repeat(mask, up, 0), up, 1).astype(float)
    rows, cols = shape
    return fine[: rows * cell, : cols * cell].reshape(rows, cell, cols, cell).mean((1, 3))


@pytest.mark.parametrize("scale, step, up, cell", [
    (4.0, 8, 1, 2),  # cells of exactly 2 x 2 mask pixels
    (2.5, 5, 2, 4),  # non-integer scale, cells of exactly 2 mask pixels
    (2.5, 4, 5, 8),  # cells of 1.6 mask pixels: cell edges fall inside mask pixels
])
def test_tissue_fraction_is_the_exact_area_average(scale, step, up, cell):
    rng = np.random.default_rng(3)
    mask = (rng.random((23, 31)) < 0.4).astype(np.uint8)
    dims = (round(31 * scale), round(23 * scale))
    shape = lattice_shape(dims, step)
    got = cell_tissue_fraction(mask, (scale, scale), shape, step)
    np.testing.assert_allclose(got, brute_force_fraction(mask, up, cell, shape), atol=1e-9)


def test_lattice_keeps_only_full_cells():
    assert lattice_shape((61440, 30000), 1024) == (29, 60)
    assert lattice_shape((1000, 5000), 1024) == (4, 0)
    fraction = np.array([[0.0, 0.25, 0.3], [1.0, 0.2, 0.25]])
    coords, grid = select_cells(fraction, 0.25, 1024)
    np.testing.assert_array_equal(grid, [[0, 1], [0, 2], [1, 0], [1, 2]])  # threshold inclusive, row-major
    np.testing.assert_array_equal(coords, grid[:, ::-1] * 1024)
    assert coords.dtype == np.int64 and grid.dtype == np.int32


@pytest.fixture(scope="module")
def seg_40x(slide_40x):
    with Slide(slide_40x) as slide:
        return slide.mpp, slide.dimensions, segment_slide(slide, SegmentParams())


def exact_cell_fraction(shape, step, tissue, samples=32):
    """Tissue fraction of each lattice cell from the analytic ellipses, sampled on samples^2 points per cell."""
    offsets = (np.arange(samples) + 0.5) * step / samples
    rows, cols = shape
    xs = (np.arange(cols)[:, None] * step + offsets).ravel()
    ys = (np.arange(rows)[:, None] * step + offsets).ravel()
    inside = np.zeros((len(ys), len(xs)), bool)
    for e in tissue:
        inside |= ((xs[None, :] - e.cx) / e.rx) ** 2 + ((ys[:, None] - e.cy) / e.ry) ** 2 <= 1
    return inside.reshape(rows, samples, cols, samples).mean((1, 3))


@pytest.mark.parametrize("threshold", [0.25, 0.5, 0.9])
def test_kept_cells_match_the_true_tissue(seg_40x, threshold):
    mpp, dims, seg = seg_40x
    step = 256  # 128 px patches at 0.5 µm/px: a 32 x 24 lattice over the 8192 x 6144 slide
    tissue = blobs(8192, 6144, 3, seed=1)
    truth = exact_cell_fraction(lattice_shape(dims, step), step, tissue)
    got = cell_tissue_fraction(seg.mask, seg.scale, lattice_shape(dims, step), step)
    # The mask boundary is within about one mask pixel (32 level-0 px) of the truth: a boundary cell's
    # fraction can differ by up to (perimeter inside the cell x 32 px) / cell area <= 2 x 256 x 32 / 256^2 = 0.25.
    assert np.abs(got - truth).max() <= 0.25
    clear = np.abs(truth - threshold) > 0.25  # cells far from the threshold must be decided exactly as the truth
    np.testing.assert_array_equal((got >= threshold)[clear], (truth >= threshold)[clear])


def test_patch_count_matches_tissue_area(seg_40x):
    """At threshold 0.5 the count estimates area / cell area; only cells on a boundary can be off, by < 1/2 each."""
    mpp, dims, seg = seg_40x
    step = 128
    tissue = blobs(8192, 6144, 3, seed=1)
    n = len(select_cells(cell_tissue_fraction(seg.mask, seg.scale, lattice_shape(dims, step), step), 0.5, step)[0])
    expected = sum(e.area for e in tissue) / step**2
    # A convex curve crosses at most (bbox perimeter / step + 4) cells.
    boundary_cells = sum(4 * (e.rx + e.ry) / step + 4 for e in tissue)
    assert abs(n - expected) <= 0.5 * boundary_cells
    assert abs(n - expected) / expected < 0.03  # in practice the errors cancel: ~1%


def test_patch_grid_attrs_and_coords_inside_tissue(slide_40x, seg_40x):
    mpp, dims, seg = seg_40x
    tissue = blobs(8192, 6144, 3, seed=1)
    with Slide(slide_40x) as slide:
        plan = slide.read_plan(0.5, 128)
    grid = patch_grid("slide_40x", seg.mask, seg.scale, dims, mpp, plan, 0.6)
    assert set(grid.attrs) == DESIGN_ATTRS
    assert grid.attrs["grid_shape"] == (24, 32) and grid.attrs["patch_size_level0"] == 256
    assert grid.attrs["level0_dimensions"] == (8192, 6144)
    assert (grid.attrs["read_level"], grid.attrs["read_size"]) == (0, 256)
    assert grid.attrs["format_version"] == FORMAT_VERSION and grid.attrs["level0_mpp"] == 0.25
    np.testing.assert_array_equal(grid.coords, grid.grid[:, ::-1] * 256)
    # For a convex shape, a cell more than half covered has its centre inside (margin: 0.6 vs 0.5).
    centres = grid.coords + 128
    inside = np.zeros(len(centres), bool)
    for e in tissue:
        inside |= e.contains(centres[:, 0], centres[:, 1])
    assert len(grid) > 100 and inside.all()
    assert (grid.coords + 256 <= np.asarray(dims)).all()  # full cells only


def test_read_level_for_20x(slide_factory):
    """On a 40x slide with a 20x level, patches are read there at 512 px; never from a coarser level."""
    path = slide_factory("pyr_x2.tif", width=4096, height=4096, level_step=2, min_level_size=512)
    with Slide(path) as slide:
        assert slide.level_mpp(1) == pytest.approx(0.5)
        plan = slide.read_plan(0.5, 512)
    assert (plan.read_level, plan.read_size, plan.patch_size_level0) == (1, 512, 1024)

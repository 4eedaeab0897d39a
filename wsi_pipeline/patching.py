"""The patch lattice: pure geometry from a tissue mask to the kept cells (DESIGN.md, patches/<id>.h5).

The lattice is anchored at the slide origin with step `patch_size_level0` and holds only full cells
inside the slide. A cell's tissue fraction is the exact area average of the mask over the cell's
footprint (cells need not align with mask pixels), computed for all cells at once from the mask's
summed-area table; a cell is kept when its fraction is at least `tissue_threshold`.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .config import check_settings, positive, whole, within
from .h5io import FORMAT_VERSION, PatchGrid
from .slide import ReadPlan


@dataclass(frozen=True)
class PatchParams:
    """Patching settings (configs/preprocess.yaml, group `patching`)."""

    patch_size: int = 512  # pixels at target_mpp
    target_mpp: float = 0.5  # 20x
    tissue_threshold: float = 0.25  # minimum tissue fraction of a kept cell (area average over the cell)

    def __post_init__(self) -> None:
        check_settings("patching", self, {"patch_size": whole(16), "target_mpp": positive("µm/px"),
                                          "tissue_threshold": within(0, 1, "a tissue fraction")})


def lattice_shape(dimensions: tuple[int, int], patch_size_level0: int) -> tuple[int, int]:
    """(rows, cols) of full lattice cells inside a level-0 extent (width, height)."""
    width, height = dimensions
    return height // patch_size_level0, width // patch_size_level0


def _sample_linear(table: np.ndarray, positions: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of `table` along `axis` at fractional indices (exact for a summed-area table)."""
    positions = np.clip(positions, 0, table.shape[axis] - 1)
    lo = np.minimum(np.floor(positions).astype(np.int64), table.shape[axis] - 2)
    frac = positions - lo
    shape = [1, 1]
    shape[axis] = -1
    frac = frac.reshape(shape)
    return np.take(table, lo, axis=axis) * (1 - frac) + np.take(table, lo + 1, axis=axis) * frac


def cell_tissue_fraction(mask: np.ndarray, scale: tuple[float, float], grid_shape: tuple[int, int],
                         patch_size_level0: int) -> np.ndarray:
    """Tissue fraction (0..1) of every lattice cell, float (rows, cols).

    `mask` is 0/1 with each pixel spanning `scale` = (sx, sy) level-0 pixels. The summed-area table
    is bilinear inside each mask pixel, so sampling it linearly at the cells' fractional edges and
    differencing gives each cell's exact mask integral.
    """
    rows, cols = grid_shape
    if rows == 0 or cols == 0:
        return np.zeros((rows, cols))
    table = cv2.integral(np.ascontiguousarray(mask, dtype=np.uint8), sdepth=cv2.CV_32S)  # (h + 1, w + 1)
    xs = np.arange(cols + 1) * (patch_size_level0 / scale[0])  # cell edges in mask pixels
    ys = np.arange(rows + 1) * (patch_size_level0 / scale[1])
    corners = _sample_linear(_sample_linear(table, ys, axis=0), xs, axis=1)  # (rows + 1, cols + 1)
    sums = corners[1:, 1:] - corners[:-1, 1:] - corners[1:, :-1] + corners[:-1, :-1]
    cell_area = (patch_size_level0 / scale[0]) * (patch_size_level0 / scale[1])
    return np.clip(sums / cell_area, 0.0, 1.0)


def select_cells(fraction: np.ndarray, tissue_threshold: float, patch_size_level0: int) -> tuple[np.ndarray, np.ndarray]:
    """Kept cells as (coords int64 (N, 2) level-0 (x, y), grid int32 (N, 2) (row, col)), row-major order."""
    grid = np.argwhere(fraction >= tissue_threshold).astype(np.int32)
    coords = grid[:, ::-1].astype(np.int64) * patch_size_level0
    return coords, grid


def patch_grid(slide_id: str, mask: np.ndarray, scale: tuple[float, float], dimensions: tuple[int, int],
               level0_mpp: float, plan: ReadPlan, tissue_threshold: float) -> PatchGrid:
    """The slide's kept lattice cells with every attribute of DESIGN.md's patches file."""
    shape = lattice_shape(dimensions, plan.patch_size_level0)
    fraction = cell_tissue_fraction(mask, scale, shape, plan.patch_size_level0)
    coords, grid = select_cells(fraction, tissue_threshold, plan.patch_size_level0)
    attrs = dict(
        slide_id=slide_id, patch_size=plan.patch_size, target_mpp=plan.target_mpp, level0_mpp=level0_mpp,
        patch_size_level0=plan.patch_size_level0, read_level=plan.read_level, read_size=plan.read_size,
        grid_shape=shape, tissue_threshold=tissue_threshold, format_version=FORMAT_VERSION,
        level0_dimensions=tuple(int(v) for v in dimensions),  # (width, height): lets QC/heatmaps place cells exactly
    )
    return PatchGrid(coords, grid, attrs)

"""Quality-control thumbnail: the slide at low resolution with tissue contours and kept patches drawn.

Green: tissue exteriors; blue: holes; dark red: the borders of kept lattice cells. Patch borders
are drawn for all cells at once from per-pixel cell indices (no loop over thousands of patches).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .h5io import PatchGrid, atomic_path
from .segment import Segmentation

TISSUE_RGB = (0, 190, 0)
HOLE_RGB = (0, 90, 255)
PATCH_RGB = (170, 0, 40)


def thumbnail_scale(seg: Segmentation, max_side: int) -> float:
    """Thumbnail pixels per segmentation-mask pixel (≤ 1: the thumbnail is never larger than the mask)."""
    h, w = seg.rgb.shape[:2]
    return min(1.0, max_side / max(h, w, 1))


def cell_borders(shape: tuple[int, int], px_per_cell: tuple[float, float], kept: np.ndarray) -> np.ndarray:
    """Boolean (h, w): pixels on the border of a kept cell. `kept` is the (rows, cols) lattice of kept cells."""
    h, w = shape
    rows, cols = kept.shape
    col = np.floor((np.arange(w) + 0.5) / px_per_cell[0]).astype(np.int64)
    row = np.floor((np.arange(h) + 0.5) / px_per_cell[1]).astype(np.int64)
    inside_x, inside_y = col < cols, row < rows
    cell = np.zeros((h, w), bool)
    cell[np.ix_(inside_y, inside_x)] = kept[np.ix_(row[inside_y], col[inside_x])]
    edge_x = np.r_[True, col[1:] != col[:-1]] | np.r_[col[1:] != col[:-1], True]
    edge_y = np.r_[True, row[1:] != row[:-1]] | np.r_[row[1:] != row[:-1], True]
    return cell & (edge_x[None, :] | edge_y[:, None])


def draw_qc(seg: Segmentation, patches: PatchGrid, max_side: int = 2048) -> np.ndarray:
    """RGB uint8 thumbnail with contours and kept patches."""
    f = thumbnail_scale(seg, max_side)
    h, w = seg.rgb.shape[:2]
    size = (max(1, round(w * f)), max(1, round(h * f)))
    image = seg.rgb.copy() if f == 1.0 else cv2.resize(seg.rgb, size, interpolation=cv2.INTER_AREA)
    level0_per_px = (seg.scale[0] / f, seg.scale[1] / f)
    step = patches.attrs["patch_size_level0"]
    kept = np.zeros(tuple(patches.attrs["grid_shape"]), bool)
    kept[patches.grid[:, 0], patches.grid[:, 1]] = True
    image[cell_borders(image.shape[:2], (step / level0_per_px[0], step / level0_per_px[1]), kept)] = PATCH_RGB

    def pts(ring: np.ndarray) -> np.ndarray:
        return np.round(ring / np.asarray(level0_per_px) - 0.5).astype(np.int32).reshape(-1, 1, 2)

    cv2.polylines(image, [pts(p.exterior) for p in seg.polygons], True, TISSUE_RGB, 2)
    cv2.polylines(image, [pts(h) for p in seg.polygons for h in p.holes], True, HOLE_RGB, 2)
    return image


def write_thumbnail(path: str | Path, image: np.ndarray, quality: int = 85) -> None:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"{path}: JPEG encoding of the QC thumbnail failed")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.tobytes())

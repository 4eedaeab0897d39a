"""Attention heatmaps: a model's per-patch attention painted on the slide's lattice cells over a thumbnail.

The canvas under the heatmap is, in order of preference: a pyramid level of the slide itself (read
with `Slide`, exact geometry), the preprocessing thumbnail `thumbnails/<slide_id>.jpg` (scaled by the
slide's level-0 size that preprocessing records in the features file: exact too), or a blank canvas
the size of the lattice. What is missing on the way is reported through a `note` callback (default:
a logged warning; the report lists them in its Notes). Attention is percentile-normalised per slide
(each cell's rank among the slide's cells, as in CLAM's heatmaps), so the colour map spans the slide
whatever the softmax temperature.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
from matplotlib import colormaps
from matplotlib.colors import Normalize
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from PIL import Image
from scipy.stats import rankdata

from wsi_pipeline.h5io import FormatError, PatchGrid
from wsi_pipeline.slide import SLIDE_EXTENSIONS, Slide, SlideError

log = logging.getLogger(__name__)

BLANK_RGB = (245, 245, 245)
MAX_LEVEL_PIXELS = 80_000_000  # ~240 MB of RGB: the largest slide level read as a canvas

Note = Callable[[str], None]  # where warnings go: log.warning, or a report's list of notes


@dataclass
class Canvas:
    """An RGB image of the whole slide and its scale in canvas pixels per level-0 pixel, (x, y)."""

    image: np.ndarray  # uint8 (H, W, 3)
    scale: tuple[float, float]
    source: str  # "slide" | "thumbnail" | "blank"


def percentile_scores(attention: np.ndarray) -> np.ndarray:
    """Each value's rank among the slide's values, mapped to [0, 1] (ties share their mean rank)."""
    attention = np.asarray(attention, dtype=float).ravel()
    if len(attention) < 2:
        return np.ones_like(attention)
    return (rankdata(attention) - 1) / (len(attention) - 1)


def lattice_shape(grid: PatchGrid) -> tuple[int, int]:
    """(rows, cols) of the slide's lattice: attr `grid_shape`, grown if a patch lies outside it."""
    cells = grid.coords[:, ::-1] // int(grid.attrs["patch_size_level0"])
    rows, cols = (int(v) for v in grid.attrs.get("grid_shape", (0, 0)))
    if len(cells):
        rows, cols = max(rows, int(cells[:, 0].max()) + 1), max(cols, int(cells[:, 1].max()) + 1)
    return rows, cols


def cell_values(values: np.ndarray, grid: PatchGrid) -> np.ndarray:
    """A (rows, cols) float array holding each patch's value at its lattice cell; NaN where no patch."""
    rows, cols = lattice_shape(grid)
    cells = grid.coords[:, ::-1] // int(grid.attrs["patch_size_level0"])
    out = np.full((rows, cols), np.nan)
    out[cells[:, 0], cells[:, 1]] = values
    return out


def paint(canvas: Canvas, values: np.ndarray, grid: PatchGrid, cmap: str = "jet", alpha: float = 0.5) -> np.ndarray:
    """Alpha-blend `values` (in [0, 1], one per patch) through `cmap` onto the canvas, cell by cell."""
    cells = cell_values(values, grid)
    step = int(grid.attrs["patch_size_level0"])
    height, width = canvas.image.shape[:2]
    # the lattice cell under each canvas pixel's centre
    rows = np.floor((np.arange(height) + 0.5) / canvas.scale[1] / step).astype(int)
    cols = np.floor((np.arange(width) + 0.5) / canvas.scale[0] / step).astype(int)
    padded = np.pad(cells, ((0, 1), (0, 1)), constant_values=np.nan)  # index -1 = outside the lattice
    rows[rows >= cells.shape[0]], cols[cols >= cells.shape[1]] = -1, -1
    under = padded[rows[:, None], cols[None, :]]
    inside = np.isfinite(under)
    colour = colormaps[cmap](np.nan_to_num(under[inside]))[:, :3] * 255
    out = canvas.image.astype(float)
    out[inside] = (1 - alpha) * out[inside] + alpha * colour
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _fit(image: np.ndarray, scale: tuple[float, float], max_size: int) -> tuple[np.ndarray, tuple[float, float]]:
    """Shrink `image` so that its longer side is at most `max_size`, keeping the scale exact per axis."""
    height, width = image.shape[:2]
    factor = min(1.0, max_size / max(height, width))
    if factor == 1.0:
        return image, scale
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    resized = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    return resized, (scale[0] * size[0] / width, scale[1] * size[1] / height)


def canvas_from_slide(path: str | Path, thumbnail_mpp: float = 16.0, max_size: int = 1600) -> Canvas:
    """The pyramid level nearest `thumbnail_mpp` µm/px, shrunk to `max_size`: exact geometry."""
    with Slide(path) as slide:
        level = slide.level_near_mpp(thumbnail_mpp)
        w, h = slide.level_dimensions[level]
        if w * h > MAX_LEVEL_PIXELS:  # a slide without a low-resolution level: do not read gigapixels
            raise SlideError(f"{path}: its level nearest {thumbnail_mpp} µm/px is {w}x{h} px, too large to read "
                             "as a thumbnail (no pyramid?)")
        image = slide.read_level_image(level)
        w0, h0 = slide.dimensions
    image, scale = _fit(image, (image.shape[1] / w0, image.shape[0] / h0), max_size)
    return Canvas(image, scale, "slide")


def canvas_from_thumbnail(path: str | Path, grid: PatchGrid, max_size: int = 1600) -> Canvas:
    """A preprocessing thumbnail of the whole slide, scaled by the slide's size (attr `level0_dimensions`).
    Files without that attr hold only the lattice, which covers whole cells (`grid_shape = dimensions //
    patch_size_level0`): the slide is then taken to be half a cell larger, so cells land within half a cell."""
    image = np.asarray(Image.open(path).convert("RGB"))
    if "level0_dimensions" in grid.attrs:
        extent = tuple(float(v) for v in grid.attrs["level0_dimensions"])
    else:
        rows, cols = lattice_shape(grid)
        step = int(grid.attrs["patch_size_level0"])
        extent = ((cols + 0.5) * step, (rows + 0.5) * step)
    image, scale = _fit(image, (image.shape[1] / extent[0], image.shape[0] / extent[1]), max_size)
    return Canvas(image, scale, "thumbnail")


def blank_canvas(grid: PatchGrid, max_size: int = 1024) -> Canvas:
    """A light-grey canvas of the lattice, at most `max_size` pixels on its longer side."""
    rows, cols = lattice_shape(grid)
    cell = max(1, max_size // max(rows, cols, 1))
    image = np.empty((rows * cell, cols * cell, 3), dtype=np.uint8)
    image[:] = BLANK_RGB
    scale = cell / int(grid.attrs["patch_size_level0"])
    return Canvas(image, (scale, scale), "blank")


def find_file(folder: str | Path | None, stem: str, suffixes: tuple[str, ...]) -> Path | None:
    """`folder/<stem><suffix>` (suffix case-insensitive), or None."""
    if folder is None or not Path(folder).is_dir():
        return None
    for path in Path(folder).glob(f"{stem}.*"):
        if path.stem == stem and path.suffix.lower() in suffixes:
            return path
    return None


def load_canvas(grid: PatchGrid, slide_id: str, slides: str | Path | None = None,
                thumbnails: str | Path | None = None, thumbnail_mpp: float = 16.0, max_size: int = 1600,
                note: Note = log.warning) -> Canvas:
    """The best canvas available for a slide (slide, else thumbnail, else blank); each failure is a `note`."""
    slide_path = find_file(slides, slide_id, SLIDE_EXTENSIONS)
    if slide_path is not None:
        try:
            return canvas_from_slide(slide_path, thumbnail_mpp, max_size)
        except SlideError as err:
            note(f"{err}; using the thumbnail or a blank canvas instead")
    elif slides is not None:
        note(f"{slides}: no slide file for {slide_id}; using the thumbnail or a blank canvas")
    thumb_dirs = [] if thumbnails is None else [Path(thumbnails), Path(thumbnails) / "thumbnails"]
    thumb = next((t for d in thumb_dirs if (t := find_file(d, slide_id, (".jpg", ".jpeg", ".png")))), None)
    if thumb is not None:
        try:
            return canvas_from_thumbnail(thumb, grid, max_size)
        except OSError as err:  # PIL: unreadable or truncated image
            note(f"{thumb}: unreadable thumbnail ({err}); drawing on a blank canvas")
    elif thumbnails is not None:
        note(f"{thumbnails}: no thumbnail for {slide_id}; drawing on a blank canvas")
    return blank_canvas(grid, min(max_size, 1024))


def read_attention(path: str | Path, slide_ids: list[str], note: Note = log.warning) -> dict[str, np.ndarray]:
    """The attention vectors of `slide_ids` from an `attention_test.h5` (ids it lacks are left out, with a `note`)."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file (the trainer writes attention_test.h5 beside each fold's predictions)")
    try:
        with h5py.File(path, "r") as f:
            found = {sid: np.asarray(f[sid][:], dtype=np.float32).ravel() for sid in slide_ids if sid in f}
    except OSError as err:
        raise FormatError(f"{path}: not a readable HDF5 file ({err})") from err
    missing = sorted(set(slide_ids) - set(found))
    if missing:
        note(f"{path}: no attention for {len(missing)} slide(s): {', '.join(missing[:5])}"
             + (" …" if len(missing) > 5 else "") + "; no heatmap for them")
    return found


def heatmap_figure(canvas: Canvas, attention: np.ndarray, grid: PatchGrid, title: str = "",
                   cmap: str = "jet", alpha: float = 0.5) -> Figure:
    """The canvas (when it shows tissue) beside the percentile-normalised attention painted over it."""
    if len(attention) != len(grid):
        raise FormatError(f"{title}: {len(attention)} attention values for {len(grid)} patches; "
                          "the attention file and the features file do not belong together")
    painted = paint(canvas, percentile_scores(attention), grid, cmap, alpha)
    panels = [painted] if canvas.source == "blank" else [canvas.image, painted]
    height, width = painted.shape[:2]
    fig = Figure(figsize=(min(14.0, 4.2 * len(panels) * width / max(height, 1) + 1.0), 4.6))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, image in zip(axes, panels):
        ax.imshow(image)
        ax.set_axis_off()
    fig.colorbar(ScalarMappable(Normalize(0, 1), cmap), ax=list(axes), fraction=0.046 / len(panels), pad=0.02,
                 label="attention (percentile within slide)")
    fig.suptitle(title, fontsize=10)
    return fig

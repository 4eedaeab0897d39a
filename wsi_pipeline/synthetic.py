"""Generated whole-slide images: pyramidal, tiled, Aperio-flavoured TIFFs that OpenSlide opens.

Tests, the demo and the benchmarks use these instead of downloaded slides. Tissue is a set of
ellipses (with optional elliptical holes) in level-0 pixels, so the true tissue area is known in
closed form; pixels inside tissue get an H&E-like texture (pink stroma, purple nuclei), pixels
outside a near-white, low-saturation background, as on a real scan. Tiles are produced one at a
time, so memory does not grow with the slide's size (a 60 000 x 60 000 slide is fine).

OpenSlide reads such a TIFF as an Aperio slide when every level is written tiled with
`metadata=None` and an ImageDescription that starts with `Aperio Image Library`; the first
description carries `|AppMag = ..|MPP = ..` (either may be left out to make a slide without them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
import tifffile

BACKGROUND_RGB = (243, 242, 240)


@dataclass(frozen=True)
class Ellipse:
    cx: float
    cy: float
    rx: float
    ry: float

    @property
    def area(self) -> float:
        return math.pi * self.rx * self.ry

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return ((x - self.cx) / self.rx) ** 2 + ((y - self.cy) / self.ry) ** 2 <= 1.0

    def bbox(self) -> tuple[float, float, float, float]:
        return self.cx - self.rx, self.cy - self.ry, self.cx + self.rx, self.cy + self.ry


@dataclass(frozen=True)
class SyntheticSlide:
    """What to draw. Sizes and shapes are in level-0 pixels."""

    width: int
    height: int
    tissue: Sequence[Ellipse] = ()
    holes: Sequence[Ellipse] = ()
    mpp: float | None = 0.25
    app_mag: float | None = 40.0
    tile: int = 256
    level_step: int = 4  # each pyramid level is this much smaller than the previous one
    min_level_size: int = 256  # stop adding levels once the next would be smaller than this
    compression: str | None = "jpeg"
    jpeg_quality: int = 85
    seed: int = 0
    stain: tuple[int, int, int] = (222, 140, 180)  # mean stroma colour
    extra_description: str = ""
    downsamples: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        ds = [1]
        while min(self.width, self.height) // (ds[-1] * self.level_step) >= self.min_level_size:
            ds.append(ds[-1] * self.level_step)
        object.__setattr__(self, "downsamples", tuple(ds))

    @property
    def tissue_area(self) -> float:
        """Tissue area in level-0 px² (ellipses assumed disjoint, holes inside tissue and disjoint)."""
        return sum(e.area for e in self.tissue) - sum(h.area for h in self.holes)

    def mask(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """True where level-0 points (x, y) are tissue."""
        inside = np.zeros(np.broadcast(x, y).shape, dtype=bool)
        for e in self.tissue:
            inside |= e.contains(x, y)
        for h in self.holes:
            inside &= ~h.contains(x, y)
        return inside

    def description(self, level: int) -> str:
        w, h = self.width // self.downsamples[level], self.height // self.downsamples[level]
        text = f"Aperio Image Library v12.0.15\r\n{self.width}x{self.height} [0,0 {w}x{h}] ({self.tile}x{self.tile})"
        if level == 0:
            if self.app_mag is not None:
                text += f"|AppMag = {self.app_mag:g}"
            if self.mpp is not None:
                text += f"|MPP = {self.mpp:g}"
            text += self.extra_description
        return text


def _textures(spec: SyntheticSlide, count: int = 8) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A few tissue and background tiles to pick from (texture is not what the tests measure)."""
    rng = np.random.default_rng(spec.seed)
    t = spec.tile
    tissue, background = [], []
    for _ in range(count):
        noise = cv2.GaussianBlur(rng.normal(0, 1, (t, t)).astype(np.float32), (0, 0), 3)
        noise /= noise.std() + 1e-6
        tex = np.empty((t, t, 3), np.float32)
        for c, mean in enumerate(spec.stain):
            tex[..., c] = mean + 14 * noise
        for _ in range(int(t * t / 900)):  # nuclei
            cx, cy = rng.integers(0, t, 2)
            r = int(rng.integers(2, 6))
            colour = tuple(float(v) for v in rng.normal((120, 60, 150), 12))
            cv2.circle(tex, (int(cx), int(cy)), r, colour, -1, lineType=cv2.LINE_AA)
        tissue.append(np.clip(tex, 0, 255).astype(np.uint8))
        bg = np.asarray(BACKGROUND_RGB, np.float32) + rng.normal(0, 1.5, (t, t, 1))
        background.append(np.clip(bg, 0, 255).astype(np.uint8).repeat(1, axis=2))
    return tissue, background


def _tiles(spec: SyntheticSlide, level: int, tissue_tex, background_tex) -> Iterator[np.ndarray]:
    ds, t = spec.downsamples[level], spec.tile
    width, height = spec.width // ds, spec.height // ds
    boxes = [e.bbox() for e in spec.tissue]
    offsets = (np.arange(t) + 0.5) * ds
    for ty in range(math.ceil(height / t)):
        for tx in range(math.ceil(width / t)):
            k = (tx * 7 + ty * 13) % len(tissue_tex)
            x0, y0 = tx * t * ds, ty * t * ds
            x1, y1 = x0 + t * ds, y0 + t * ds
            if not any(bx0 < x1 and bx1 > x0 and by0 < y1 and by1 > y0 for bx0, by0, bx1, by1 in boxes):
                yield background_tex[k]
                continue
            inside = spec.mask((x0 + offsets)[None, :], (y0 + offsets)[:, None])
            yield np.where(inside[..., None], tissue_tex[k], background_tex[k])


def write_slide(path: str | Path, spec: SyntheticSlide) -> Path:
    """Write `spec` as a pyramidal tiled TIFF at `path`; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tissue_tex, background_tex = _textures(spec)
    compression = spec.compression
    kwargs = {"compressionargs": {"level": spec.jpeg_quality}} if compression == "jpeg" else {}
    with tifffile.TiffWriter(path, bigtiff=spec.width * spec.height * 3 > 2**31) as tif:
        for level, ds in enumerate(spec.downsamples):
            shape = (spec.height // ds, spec.width // ds, 3)
            tif.write(
                _tiles(spec, level, tissue_tex, background_tex),
                shape=shape,
                dtype=np.uint8,
                tile=(spec.tile, spec.tile),
                photometric="rgb",
                compression=compression,
                description=spec.description(level),
                metadata=None,
                **kwargs,
            )
    return path


def blobs(width: int, height: int, count: int, seed: int = 0, fill: float = 0.35) -> list[Ellipse]:
    """`count` disjoint ellipses laid out on a loose grid covering about `fill` of the slide."""
    rng = np.random.default_rng(seed)
    cols = math.ceil(math.sqrt(count * width / height))
    rows = math.ceil(count / cols)
    cw, ch = width / cols, height / rows
    scale = math.sqrt(fill * cols * rows / (count * math.pi / 4))  # ellipse area vs cell area
    out = []
    for i in range(count):
        r, c = divmod(i, cols)
        rx = min(0.48, 0.5 * scale * rng.uniform(0.75, 1.0)) * cw
        ry = min(0.48, 0.5 * scale * rng.uniform(0.75, 1.0)) * ch
        out.append(Ellipse((c + 0.5) * cw, (r + 0.5) * ch, rx, ry))
    return out


def known_tissue_patches(path: str | Path, spec: SyntheticSlide, target_mpp: float = 0.5, patch_size: int = 512):
    """The PatchGrid a perfect preprocessing would keep for slide `path` drawn from `spec`: the lattice
    cells whose centre lies in the known tissue (for tests and benchmarks of later stages)."""
    from .h5io import PatchGrid  # late imports: keep this module free of the pipeline for slide writing
    from .slide import Slide

    with Slide(path) as slide:
        plan = slide.read_plan(target_mpp, patch_size)
        step = plan.patch_size_level0
        rows, cols = slide.dimensions[1] // step, slide.dimensions[0] // step
        attrs = dict(slide_id=slide.slide_id, patch_size=patch_size, target_mpp=target_mpp, level0_mpp=slide.mpp,
                     patch_size_level0=step, read_level=plan.read_level, read_size=plan.read_size,
                     grid_shape=(rows, cols), tissue_threshold=0.5)
    r, c = (a.ravel() for a in np.mgrid[:rows, :cols])
    grid = np.stack([r, c], 1)[spec.mask((c + 0.5) * step, (r + 0.5) * step)]
    return PatchGrid(grid[:, ::-1] * step, grid, attrs)

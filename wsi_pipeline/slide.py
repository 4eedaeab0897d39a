"""Open a whole-slide image, resolve its physical resolution, read patches at a target µm/px.

Everything that touches OpenSlide lives here, so the other stages think in µm/px and level-0
pixels, never in vendor properties. Errors are `SlideError`s whose text names the file, what
was wrong and what to do about it.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

log = logging.getLogger(__name__)

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide")

# 10 µm/px divided by the objective power: the usual microscope convention (40x ≈ 0.25 µm/px).
MPP_TIMES_POWER = 10.0
# A level whose µm/px is within this relative margin of the target counts as "at" the target.
LEVEL_MPP_TOLERANCE = 0.02


class SlideError(RuntimeError):
    """A slide cannot be used; the message says which file, what is wrong and what to do."""


@dataclass(frozen=True)
class MppResolution:
    mpp: float
    source: str  # "metadata" | "objective_power" | "override"


def resolve_mpp(properties: dict, path: str | Path, override: float | None = None) -> MppResolution:
    """µm/px at level 0 from the slide's metadata, else `override` (the user's `slide.mpp`), else the objective
    power's usual resolution (a guess, with a warning): an explicit value beats a guess."""
    mpp_x, mpp_y = properties.get(openslide.PROPERTY_NAME_MPP_X), properties.get(openslide.PROPERTY_NAME_MPP_Y)
    try:
        values = [float(v) for v in (mpp_x, mpp_y) if v is not None]
    except ValueError:
        values = []
    values = [v for v in values if math.isfinite(v) and v > 0]
    if values:
        if len(values) == 2 and abs(values[0] - values[1]) > 0.01 * max(values):
            log.warning("%s: non-square pixels (mpp-x %s, mpp-y %s); using their mean", path, mpp_x, mpp_y)
        return MppResolution(float(np.mean(values)), "metadata")
    if override is not None and override > 0:
        return MppResolution(float(override), "override")
    power = properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
    try:
        power_value = float(power) if power is not None else 0.0
    except ValueError:
        power_value = 0.0
    if power_value > 0:
        mpp = MPP_TIMES_POWER / power_value
        log.warning("%s: no µm/px in the metadata; assuming %.4g µm/px from objective power %gx (slide.mpp= sets it)",
                    path, mpp, power_value)
        return MppResolution(mpp, "objective_power")
    raise SlideError(
        f"{path}: no µm/px in the slide's metadata (openslide.mpp-x/y) and no objective power; "
        "pass the level-0 resolution explicitly, e.g. `slide.mpp=0.25` for a 40x scan or `slide.mpp=0.5` for 20x"
    )


@dataclass(frozen=True)
class ReadPlan:
    """How to read one lattice cell of `patch_size_level0` level-0 pixels as `patch_size` pixels at `target_mpp`."""

    target_mpp: float
    patch_size: int
    patch_size_level0: int
    read_level: int
    read_size: int  # pixels read at read_level, then resized to patch_size


class Slide:
    """A thin, explicit wrapper over `openslide.OpenSlide` in µm/px terms."""

    def __init__(self, path: str | Path, mpp_override: float | None = None):
        self.path = Path(path)
        self.slide_id = slide_id_of(self.path)
        if not self.path.is_file():
            raise SlideError(f"{self.path}: no such file")
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except (openslide.OpenSlideError, OSError) as err:
            raise SlideError(f"{self.path}: OpenSlide cannot open this file as a whole-slide image ({err})") from err
        self.properties = dict(self._osr.properties)
        resolution = resolve_mpp(self.properties, self.path, mpp_override)
        self.mpp, self.mpp_source = resolution.mpp, resolution.source
        self.dimensions: tuple[int, int] = self._osr.dimensions
        self.level_dimensions: tuple[tuple[int, int], ...] = self._osr.level_dimensions
        self.level_downsamples: tuple[float, ...] = self._osr.level_downsamples

    # -- geometry ---------------------------------------------------------------------------------
    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def level_for_mpp(self, target_mpp: float) -> int:
        """The coarsest level whose resolution is at least as fine as `target_mpp` (never upsample)."""
        usable = [lvl for lvl in range(self.level_count) if self.level_mpp(lvl) <= target_mpp * (1 + LEVEL_MPP_TOLERANCE)]
        return max(usable, key=self.level_mpp) if usable else 0

    def read_plan(self, target_mpp: float, patch_size: int) -> ReadPlan:
        if self.mpp > target_mpp * (1 + LEVEL_MPP_TOLERANCE):
            log.warning(
                "%s: level-0 resolution %.3g µm/px is coarser than the target %.3g µm/px; patches will be upsampled",
                self.path, self.mpp, target_mpp,
            )
        patch_size_level0 = max(1, int(round(patch_size * target_mpp / self.mpp)))
        level = self.level_for_mpp(target_mpp)
        read_size = max(1, int(round(patch_size_level0 / self.level_downsamples[level])))
        return ReadPlan(target_mpp, patch_size, patch_size_level0, level, read_size)

    # -- pixels -----------------------------------------------------------------------------------
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3); transparent (outside the scanned area) pixels come back white."""
        try:
            rgba = self._osr.read_region((int(location[0]), int(location[1])), level, (int(size[0]), int(size[1])))
        except openslide.OpenSlideError as err:
            raise SlideError(
                f"{self.path}: reading {size[0]}x{size[1]} px at level {level}, level-0 (x, y) = {location} failed "
                f"({err}); the file is probably truncated or corrupt"
            ) from err
        return rgba_to_rgb(np.asarray(rgba))

    def read_patch(self, x: int, y: int, plan: ReadPlan) -> np.ndarray:
        """The lattice cell with level-0 top-left (x, y) as (patch_size, patch_size, 3) uint8."""
        region = self.read_region((x, y), plan.read_level, (plan.read_size, plan.read_size))
        if plan.read_size == plan.patch_size:
            return region
        return np.asarray(Image.fromarray(region).resize((plan.patch_size, plan.patch_size), Image.BILINEAR))

    def read_level_image(self, level: int) -> np.ndarray:
        """A whole (low-resolution) level as RGB uint8."""
        w, h = self.level_dimensions[level]
        return self.read_region((0, 0), level, (w, h))

    def level_near_mpp(self, mpp: float) -> int:
        """The level whose µm/px is closest to `mpp` in log scale (for thumbnails and masks)."""
        return int(np.argmin([abs(math.log(self.level_mpp(lvl) / mpp)) for lvl in range(self.level_count)]))

    def close(self) -> None:
        self._osr.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({str(self.path)!r}, {self.dimensions[0]}x{self.dimensions[1]} px, {self.mpp:.4g} µm/px)"


def slide_id_of(path: str | Path) -> str:
    """The slide id: the file name without its extension."""
    return Path(path).stem


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite OpenSlide's premultiplied RGBA on white."""
    if rgba.shape[-1] == 3:
        return rgba
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    out = rgb + (255 - alpha)  # premultiplied: colour + (1 - alpha) * white
    return np.clip(out, 0, 255).astype(np.uint8)


def list_slides(folder: str | Path, extensions: tuple[str, ...] = SLIDE_EXTENSIONS) -> list[Path]:
    """Slide files directly in `folder`, sorted, by extension (case-insensitive)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SlideError(f"{folder}: not a folder of slides")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions)

"""Read lattice cells as encoder-sized images: fast from a TIFF's JPEG tiles, else through OpenSlide.

Feature extraction reads every tissue cell of every slide once, so reading is its bottleneck
(OpenSlide: about 24 cells/s per core for a 1024 px level-0 region of a 40x JPEG slide). Most
whole-slide images are tiled TIFFs whose tiles are independent JPEG streams, and an encoder wants
a small image (224 px for a 512 px patch). `JpegTileReader` therefore reads the raw bytes of the
tiles a cell covers and lets libjpeg decode them already downscaled by 1/2, 1/4 or 1/8 in the DCT
domain (the reduced inverse DCT is an area-averaging low-pass filter, and skips most of the
decoding work), then cuts and resizes the cell. `OpenSlideReader` is the reference and the general
fallback (any format OpenSlide opens): `Slide.read_patch`, then a resize to the encoder's size.

`choose_reader` decides per slide, and checks the fast path against OpenSlide on the slide's
densest tile before trusting it (colour space, tables, level geometry), falling back otherwise.
Readers are built inside DataLoader workers from a picklable `SlideSource`, one per worker.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import cv2
import numpy as np
import tifffile
from PIL import Image

from .slide import ReadPlan, Slide, SlideError

log = logging.getLogger(__name__)

WHITE = 255
# cv2.imdecode flags decoding a JPEG straight to RGB at 1/d of its size (libjpeg's scale_denom): the
# IMREAD_REDUCED_GRAYSCALE_d values are the bare "reduce by d" bits, IMREAD_COLOR_RGB the colour output.
DCT_SCALE_FLAGS = {d: cv2.IMREAD_COLOR_RGB | reduce for d, reduce in (
    (1, 0), (2, cv2.IMREAD_REDUCED_GRAYSCALE_2), (4, cv2.IMREAD_REDUCED_GRAYSCALE_4), (8, cv2.IMREAD_REDUCED_GRAYSCALE_8))}
# The fast path is trusted on a slide only if its densest tile decodes like OpenSlide decodes it:
# the same libjpeg-turbo on both sides gives (near-)identical pixels; a wrong colour space or
# tile geometry gives differences of tens of grey levels.
PROBE_MEAN_ABS_TOLERANCE = 1.0


@dataclass(frozen=True)
class SlideSource:
    """Everything a worker needs to read one slide's cells (picklable, no open handles)."""

    path: str
    plan: ReadPlan
    reader: str  # a key of READERS
    level_size: tuple[int, int]  # (width, height) of plan.read_level
    level_downsample: float
    mpp_override: float | None = None


class PatchReader(Protocol):
    def read(self, x: int, y: int, min_size: int) -> np.ndarray:
        """The cell with level-0 top-left (x, y) as a square RGB uint8 image of at least `min_size` pixels
        where the reader can (its cheapest size; the same for every cell of a slide). The encoder resizes
        batches to its input size on the device (`Encoder.preprocess`)."""

    def close(self) -> None: ...


def resize(image: np.ndarray, out_size: int, box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Antialiased bilinear resize (PIL's, as `Slide.read_patch`) of `image` or of its `box` region."""
    h, w = image.shape[:2]
    if box is None and (w, h) == (out_size, out_size):
        return image
    return np.array(Image.fromarray(image).resize((out_size, out_size), Image.BILINEAR, box=box))


class OpenSlideReader:
    """The reference: `Slide.read_patch`, i.e. read_size px at read_level resized to patch_size px."""

    def __init__(self, source: SlideSource):
        self.slide = Slide(source.path, mpp_override=source.mpp_override)
        self.plan = source.plan

    def read(self, x: int, y: int, min_size: int) -> np.ndarray:
        return self.slide.read_patch(x, y, self.plan)

    def close(self) -> None:
        self.slide.close()


@dataclass(frozen=True)
class TiledJpegLevel:
    """Where one pyramid level's JPEG tiles are in a TIFF file."""

    width: int
    height: int
    tile_width: int
    tile_height: int
    offsets: np.ndarray
    byte_counts: np.ndarray
    jpeg_tables: bytes | None

    @property
    def tiles_across(self) -> int:
        return math.ceil(self.width / self.tile_width)


def find_tiled_jpeg_level(path: str | Path, level_size: tuple[int, int]) -> TiledJpegLevel | None:
    """The TIFF page of `level_size` if it is 8-bit RGB/YCbCr JPEG tiles; None if not (or not a TIFF)."""
    try:
        with tifffile.TiffFile(path) as tif:
            for page in tif.pages:
                if (page.imagewidth, page.imagelength) != tuple(level_size):
                    continue
                usable = (page.is_tiled and page.compression == tifffile.COMPRESSION.JPEG
                          and page.samplesperpixel == 3 and page.bitspersample == 8 and page.imagedepth == 1
                          and page.photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR))
                if not usable:
                    return None
                return TiledJpegLevel(page.imagewidth, page.imagelength, page.tilewidth, page.tilelength,
                                      np.asarray(page.dataoffsets, np.int64), np.asarray(page.databytecounts, np.int64),
                                      page.jpegtables)
    except (tifffile.TiffFileError, OSError, ValueError) as err:
        log.debug("%s: not readable as a TIFF (%s)", path, err)
    return None


class JpegTileReader:
    """Decode the JPEG tiles under a cell at the coarsest DCT scale that still gives >= out_size pixels."""

    def __init__(self, source: SlideSource, level: TiledJpegLevel | None = None):
        self.path = source.path
        self.plan = source.plan
        self.downsample = source.level_downsample
        self.level = level or find_tiled_jpeg_level(source.path, source.level_size)
        if self.level is None:
            raise SlideError(f"{source.path}: level {source.plan.read_level} is not stored as JPEG tiles")
        self._fd = os.open(source.path, os.O_RDONLY)

    def scale_for(self, out_size: int) -> int:
        """The largest denominator d (1, 2, 4, 8) with read_size / d >= out_size that divides the tile size."""
        fits = [d for d in (8, 4, 2, 1) if self.plan.read_size / d >= out_size
                and self.level.tile_width % d == 0 and self.level.tile_height % d == 0]
        return fits[0] if fits else 1

    def read(self, x: int, y: int, min_size: int) -> np.ndarray:
        """The cell decoded at 1/d scale: read_size / d pixels (256 for a 1024 px read and min_size 224)."""
        d = self.scale_for(min_size)
        # level coordinates of the cell, rounded to whole level pixels (exact on integer downsamples)
        lx, ly = round(x / self.downsample), round(y / self.downsample)
        size = self.plan.read_size
        canvas, (cx, cy) = self.read_level_region(lx, ly, size, size, d)
        if (lx - cx) % d == 0 and (ly - cy) % d == 0 and size % d == 0:  # on the tile lattice: a plain crop
            top, left = (ly - cy) // d, (lx - cx) // d
            return canvas[top:top + size // d, left:left + size // d]
        box = ((lx - cx) / d, (ly - cy) / d, (lx - cx + size) / d, (ly - cy + size) / d)
        return resize(canvas, round(size / d), box)

    def read_level_region(self, lx: int, ly: int, w: int, h: int, d: int) -> tuple[np.ndarray, tuple[int, int]]:
        """RGB canvas of the whole tiles covering [lx, lx+w) x [ly, ly+h) at 1/d scale, and its level origin."""
        lv = self.level
        tx0, ty0 = lx // lv.tile_width, ly // lv.tile_height
        tx1, ty1 = (lx + w - 1) // lv.tile_width, (ly + h - 1) // lv.tile_height
        tw, th = lv.tile_width // d, lv.tile_height // d
        canvas = np.full(((ty1 - ty0 + 1) * th, (tx1 - tx0 + 1) * tw, 3), WHITE, np.uint8)
        for ty in range(max(ty0, 0), min(ty1, math.ceil(lv.height / lv.tile_height) - 1) + 1):
            for tx in range(max(tx0, 0), min(tx1, lv.tiles_across - 1) + 1):
                tile = self._decode(ty * lv.tiles_across + tx, d)
                if tile is not None:
                    canvas[(ty - ty0) * th:(ty - ty0 + 1) * th, (tx - tx0) * tw:(tx - tx0 + 1) * tw] = tile
        # Edge tiles are padded in the file; OpenSlide shows what lies beyond the level as white.
        right, bottom = math.ceil((lv.width - tx0 * lv.tile_width) / d), math.ceil((lv.height - ty0 * lv.tile_height) / d)
        canvas[max(bottom, 0):] = WHITE
        canvas[:, max(right, 0):] = WHITE
        return canvas, (tx0 * lv.tile_width, ty0 * lv.tile_height)

    def _decode(self, index: int, d: int) -> np.ndarray | None:
        """One tile as RGB (tile_height/d, tile_width/d, 3); None for a tile absent from the file."""
        lv = self.level
        count = int(lv.byte_counts[index])
        if count == 0:
            return None
        data = os.pread(self._fd, count, int(lv.offsets[index]))
        if lv.jpeg_tables is not None:  # abbreviated stream: the tables' SOI..tables, then the tile after its SOI
            data = lv.jpeg_tables[:-2] + data[2:]
        rgb = cv2.imdecode(np.frombuffer(data, np.uint8), DCT_SCALE_FLAGS[d])
        expected = (lv.tile_height // d, lv.tile_width // d, 3)
        if rgb is None or rgb.shape != expected:
            raise SlideError(
                f"{self.path}: JPEG tile {index} of level {self.plan.read_level} (byte {lv.offsets[index]}, "
                f"{count} bytes) does not decode to {expected[1]}x{expected[0]} px; the file is probably corrupt"
            )
        return rgb

    def close(self) -> None:
        os.close(self._fd)


READERS: dict[str, Callable[[SlideSource], PatchReader]] = {
    "openslide": OpenSlideReader,
    "jpeg_tiles": JpegTileReader,
}


def probe_jpeg_tiles(slide: Slide, plan: ReadPlan, level: TiledJpegLevel) -> float:
    """Mean |fast - OpenSlide| over the slide's densest tile at read_level, decoded at full scale."""
    source = SlideSource(str(slide.path), plan, "jpeg_tiles", (level.width, level.height),
                         slide.level_downsamples[plan.read_level])
    index = int(np.argmax(level.byte_counts))
    tx, ty = index % level.tiles_across, index // level.tiles_across
    lx, ly = tx * level.tile_width, ty * level.tile_height
    reader = JpegTileReader(source, level)
    try:
        fast, _ = reader.read_level_region(lx, ly, level.tile_width, level.tile_height, 1)
    finally:
        reader.close()
    ds = source.level_downsample
    reference = slide.read_region((round(lx * ds), round(ly * ds)), plan.read_level, (level.tile_width, level.tile_height))
    return float(np.abs(fast.astype(np.int16) - reference.astype(np.int16)).mean())


def choose_reader(slide: Slide, plan: ReadPlan, prefer: str = "auto") -> SlideSource:
    """The reader to use for `slide`: `prefer` if given, else JPEG tiles when they check out, else OpenSlide."""
    if prefer not in ("auto", *READERS):
        raise ValueError(f"reader must be auto or one of {sorted(READERS)}, not {prefer!r}")
    level_size = tuple(slide.level_dimensions[plan.read_level])
    source = SlideSource(str(slide.path), plan, "openslide", level_size, slide.level_downsamples[plan.read_level],
                         slide.mpp if slide.mpp_source == "override" else None)
    if prefer == "openslide":
        return source
    level = find_tiled_jpeg_level(slide.path, level_size)
    if level is None:
        if prefer == "jpeg_tiles":
            raise SlideError(f"{slide.path}: reader=jpeg_tiles, but level {plan.read_level} is not stored as JPEG "
                             "tiles; use reader=auto or reader=openslide")
        log.info("%s: level %d is not JPEG-tiled; reading through OpenSlide", slide.path, plan.read_level)
        return source
    try:
        error = probe_jpeg_tiles(slide, plan, level)
        problem = f"differs from OpenSlide by {error:.2f} grey levels on average" if error > PROBE_MEAN_ABS_TOLERANCE else ""
    except SlideError as err:
        problem = f"failed ({err})"
    if problem and prefer == "auto":
        log.warning("%s: decoding its JPEG tiles directly %s; reading through OpenSlide instead", slide.path, problem)
        return source
    if problem:
        raise SlideError(f"{slide.path}: reader=jpeg_tiles, but decoding its densest JPEG tile directly {problem}")
    return SlideSource(source.path, plan, "jpeg_tiles", level_size, source.level_downsample, source.mpp_override)

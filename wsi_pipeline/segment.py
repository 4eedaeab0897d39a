"""Tissue segmentation on a low-resolution pyramid level, and its GeoJSON export.

The mask is computed at about `seg_mpp` µm/px whatever the scanner: the level nearest that
resolution is read in bands (so memory stays bounded even for a slide without a pyramid) and, when
it is 2x or more finer than `seg_mpp`, block-averaged by floor(seg_mpp / its µm/px). Every size (blur, closing, minimum
areas) is given in µm or mm² and converted with the mask's µm/px, so the defaults mean the same
thing at 20x and at 40x.

Steps (pure functions below `segment_image`): RGB → HSV saturation → median blur → threshold
(Otsu, floored at `min_saturation` so that a blank slide stays blank, or a fixed value) →
morphological closing → contours with holes (RETR_CCOMP) → drop pieces and holes smaller than
`min_tissue_mm2` / `min_hole_mm2` → the mask is redrawn from the kept polygons.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from .config import check_settings, one_of, positive, within
from .h5io import atomic_path
from .slide import Slide

log = logging.getLogger(__name__)

# Pixels per band when reading the segmentation level: OpenSlide's RGBA buffer and its RGB conversion
# stay a few MB whatever the level's size.
BAND_PIXELS = 1 << 18


@dataclass(frozen=True)
class SegmentParams:
    """Segmentation settings (configs/preprocess.yaml, group `segment`)."""

    # µm/px of the mask. 10 rather than 8: on a 40x Aperio pyramid (0.25/1/4/16 µm/px) 8 lies exactly
    # half-way (in log scale) between 4 and 16, so the level would flip with tiny MPP differences.
    seg_mpp: float = 10.0
    method: str = "otsu"  # a key of THRESHOLDS
    threshold: int = 20  # saturation (0-255) for method=fixed
    min_saturation: int = 15  # floor for Otsu: background glass has saturation ~3
    median_um: float = 56.0  # median blur window
    closing_um: float = 64.0  # closing kernel: bridges thin gaps inside tissue
    min_tissue_mm2: float = 0.1  # smaller tissue pieces (net of holes) are dropped
    min_hole_mm2: float = 0.02  # smaller holes are filled

    def __post_init__(self) -> None:
        check_settings("segment", self, {
            "seg_mpp": positive("µm/px"), "method": one_of(*THRESHOLDS), "threshold": within(0, 255, "a saturation"),
            "min_saturation": within(0, 255, "a saturation"),
            **{key: within(0, math.inf) for key in ("median_um", "closing_um", "min_tissue_mm2", "min_hole_mm2")},
        })


@dataclass(frozen=True)
class TissuePolygon:
    """One tissue piece in level-0 pixels: exterior ring and hole rings, each (K, 2) float (x, y)."""

    exterior: np.ndarray
    holes: tuple[np.ndarray, ...] = ()


@dataclass
class Segmentation:
    """A slide's tissue: the mask (1 = tissue) and its geometry, plus the RGB it was computed from."""

    mask: np.ndarray  # uint8 (h, w), 0/1, after removing small pieces and filling small holes
    level: int  # pyramid level read
    mask_mpp: float  # µm/px of the mask
    scale: tuple[float, float]  # level-0 pixels per mask pixel in x and y
    polygons: list[TissuePolygon]
    rgb: np.ndarray  # uint8 (h, w, 3), the image the mask was computed from (for QC)
    threshold: float  # saturation threshold used

    @property
    def tissue_mm2(self) -> float:
        return float(self.mask.sum()) * self.mask_mpp**2 / 1e6


# -- thresholds: name -> f(blurred saturation, params) -> threshold -------------------------------------

def otsu_threshold(saturation: np.ndarray, params: SegmentParams) -> float:
    otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return max(float(otsu), float(params.min_saturation))


def fixed_threshold(saturation: np.ndarray, params: SegmentParams) -> float:
    return float(params.threshold)


THRESHOLDS: dict[str, Callable[[np.ndarray, SegmentParams], float]] = {"otsu": otsu_threshold, "fixed": fixed_threshold}


# -- pure image functions -------------------------------------------------------------------------------

def odd_kernel(um: float, mpp: float) -> int:
    """An odd kernel size in pixels covering about `um` µm at `mpp` µm/px (1 = no-op)."""
    return max(1, 2 * int(round(um / mpp / 2)) + 1) if um > 0 else 1


def saturation(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)[..., 1]


def threshold_mask(rgb: np.ndarray, mpp: float, params: SegmentParams) -> tuple[np.ndarray, float]:
    """Saturation → median blur → threshold → closing. Returns the 0/1 mask and the threshold."""
    sat = cv2.medianBlur(saturation(rgb), odd_kernel(params.median_um, mpp))
    thresh = THRESHOLDS[params.method](sat, params)
    mask = (sat > thresh).astype(np.uint8)
    k = odd_kernel(params.closing_um, mpp)
    if k > 1:
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    return mask, thresh


def tissue_contours(mask: np.ndarray, mpp: float, params: SegmentParams) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Tissue pieces as (exterior, [holes]) in mask pixels, after the area filters (given in mm²)."""
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    hierarchy = hierarchy[0]  # (n, 4): next, previous, first child, parent
    px_per_mm2 = 1e6 / mpp**2
    areas = np.array([cv2.contourArea(c) for c in contours]) / px_per_mm2
    pieces = []
    for i in np.flatnonzero(hierarchy[:, 3] < 0):  # outer contours; with RETR_CCOMP their children are holes
        holes = [c for c in _children(hierarchy, i) if areas[c] >= params.min_hole_mm2 and len(contours[c]) >= 3]
        net = areas[i] - sum(areas[c] for c in holes)  # dropped holes are filled, so they count as tissue
        if net >= params.min_tissue_mm2 and len(contours[i]) >= 3:
            pieces.append((contours[i][:, 0, :], [contours[c][:, 0, :] for c in holes]))
    return pieces


def _children(hierarchy: np.ndarray, parent: int) -> list[int]:
    out, child = [], hierarchy[parent, 2]
    while child >= 0:
        out.append(child)
        child = hierarchy[child, 0]
    return out


def draw_pieces(shape: tuple[int, int], pieces: list[tuple[np.ndarray, list[np.ndarray]]]) -> np.ndarray:
    """The 0/1 mask of the kept pieces: exteriors filled, kept holes cleared."""
    mask = np.zeros(shape, np.uint8)
    for exterior, holes in pieces:
        cv2.drawContours(mask, [exterior.reshape(-1, 1, 2)], -1, 1, thickness=cv2.FILLED)
        if holes:
            cv2.drawContours(mask, [h.reshape(-1, 1, 2) for h in holes], -1, 0, thickness=cv2.FILLED)
    return mask


def to_level0(points: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """Mask pixel indices (x, y) → level-0 coordinates of the pixel centres."""
    return (points.astype(np.float64) + 0.5) * np.asarray(scale)


def segment_image(rgb: np.ndarray, mpp: float, scale: tuple[float, float], params: SegmentParams,
                  level: int = 0) -> Segmentation:
    """Segment an RGB image at `mpp` µm/px whose pixels span `scale` level-0 pixels each."""
    raw, thresh = threshold_mask(rgb, mpp, params)
    pieces = tissue_contours(raw, mpp, params)
    polygons = [TissuePolygon(to_level0(ext, scale), tuple(to_level0(h, scale) for h in holes)) for ext, holes in pieces]
    return Segmentation(draw_pieces(raw.shape, pieces), level, mpp, scale, polygons, rgb, thresh)


# -- reading the slide ------------------------------------------------------------------------------------

def read_level_at(slide: Slide, level: int, factor: int) -> np.ndarray:
    """The whole `level` as RGB, block-averaged by `factor`, read in bands of about BAND_PIXELS."""
    width, height = slide.level_dimensions[level]
    out_w, out_h = width // factor, height // factor
    if out_w < 1 or out_h < 1:
        return np.zeros((0, 0, 3), np.uint8)
    ds = slide.level_downsamples[level]
    # Band height: a multiple of `factor` (for the reduction) and, where known, of the tile height, so that
    # no tile is decoded twice.
    tile_h = int(slide.properties.get(f"openslide.level[{level}].tile-height", 1) or 1)
    unit = math.lcm(factor, tile_h) if tile_h * width <= BAND_PIXELS else factor
    rows = max(unit, (BAND_PIXELS // width) // unit * unit)
    out = np.empty((out_h, out_w, 3), np.uint8)
    for y in range(0, out_h * factor, rows):
        n = min(rows, out_h * factor - y)
        band = slide.read_region((0, int(round(y * ds))), level, (out_w * factor, n))
        if factor > 1:
            band = cv2.resize(band, (out_w, n // factor), interpolation=cv2.INTER_AREA)
        out[y // factor: y // factor + len(band)] = band
    return out


def segment_slide(slide: Slide, params: SegmentParams) -> Segmentation:
    """Read the level nearest `params.seg_mpp` (reduced to about that resolution) and segment it."""
    level = slide.level_near_mpp(params.seg_mpp)
    factor = max(1, int(params.seg_mpp / slide.level_mpp(level) + 1e-6))
    rgb = read_level_at(slide, level, factor)
    if rgb.size == 0:
        return Segmentation(np.zeros((0, 0), np.uint8), level, params.seg_mpp, (1.0, 1.0), [], rgb, math.nan)
    (level_w, level_h), (width, height) = slide.level_dimensions[level], slide.dimensions
    scale = (width / level_w * factor, height / level_h * factor)  # the reduction drops < factor edge pixels
    mask_mpp = slide.mpp * math.sqrt(scale[0] * scale[1])
    log.debug("%s: segmenting level %d (x1/%d) at %.3g µm/px, %dx%d px", slide.path, level, factor, mask_mpp,
              rgb.shape[1], rgb.shape[0])
    return segment_image(rgb, mask_mpp, scale, params, level)


# -- GeoJSON (QuPath-compatible) --------------------------------------------------------------------------

def _ring(points: np.ndarray, counter_clockwise: bool) -> list[list[float]]:
    """A closed GeoJSON ring with RFC 7946 winding: exteriors counter-clockwise, holes clockwise."""
    pts = np.round(points, 1)
    x, y = pts[:, 0], pts[:, 1]
    signed_area = 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))  # > 0: counter-clockwise
    if (signed_area > 0) != counter_clockwise:
        pts = pts[::-1]
    return [*pts.tolist(), pts[0].tolist()]


def to_geojson(polygons: list[TissuePolygon]) -> dict:
    """FeatureCollection of Polygons with holes in level-0 pixels, annotations of class "Tissue" for QuPath."""
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon",
                         "coordinates": [_ring(p.exterior, True), *(_ring(h, False) for h in p.holes)]},
            "properties": {"objectType": "annotation", "classification": {"name": "Tissue", "color": [0, 160, 0]}},
        }
        for p in polygons
    ]
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: str | Path, polygons: list[TissuePolygon]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(to_geojson(polygons)))

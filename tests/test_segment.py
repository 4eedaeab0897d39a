import json
import math

import cv2
import numpy as np
import pytest

from wsi_pipeline.segment import SegmentParams, segment_image, segment_slide, to_geojson, write_geojson
from wsi_pipeline.slide import Slide
from wsi_pipeline.synthetic import BACKGROUND_RGB, Ellipse, blobs

TISSUE_RGB = (222, 140, 180)


def ellipse_perimeter(e: Ellipse) -> float:
    a, b = e.rx, e.ry  # Ramanujan's approximation, well within 0.1% here
    return math.pi * (3 * (a + b) - math.sqrt((3 * a + b) * (a + 3 * b)))


def radial(e: Ellipse, pts: np.ndarray) -> np.ndarray:
    """Normalised radius of level-0 points w.r.t. ellipse e (1 on its boundary)."""
    return np.sqrt(((pts[:, 0] - e.cx) / e.rx) ** 2 + ((pts[:, 1] - e.cy) / e.ry) ** 2)


def render(size_um: tuple[float, float], mpp: float, discs_um: list[tuple[float, float, float]],
           holes_um: list[tuple[float, float, float]] = ()) -> np.ndarray:
    """An RGB field of view at `mpp` µm/px with tissue discs (cx, cy, r in µm) and holes in them."""
    w, h = int(size_um[0] / mpp), int(size_um[1] / mpp)
    rng = np.random.default_rng(0)
    img = np.clip(np.asarray(BACKGROUND_RGB, float) + rng.normal(0, 1.5, (h, w, 3)), 0, 255).astype(np.uint8)
    for colour, shapes in ((TISSUE_RGB, discs_um), (BACKGROUND_RGB, holes_um)):
        for cx, cy, r in shapes:
            cv2.circle(img, (round(cx / mpp), round(cy / mpp)), round(r / mpp), colour, -1)
    return img


# A 4 x 3 mm field: a big disc (about 3.1 mm²) with a 0.2 mm² hole and a 0.008 mm² hole,
# and a small fragment of about 0.05 mm².
FIELD = dict(size_um=(4000, 3000), discs_um=[(1500, 1500, 1000), (3400, 700, 126)],
             holes_um=[(1300, 1400, 252), (1900, 1800, 50)])


@pytest.mark.parametrize("mpp", [4.0, 8.0, 16.0])
def test_area_thresholds_are_physical(mpp):
    """The same field seen at 4, 8 and 16 µm/px keeps the same pieces and holes with the same defaults."""
    rgb = render(mpp=mpp, **FIELD)
    seg = segment_image(rgb, mpp, (mpp / 0.25, mpp / 0.25), SegmentParams())
    assert [len(p.holes) for p in seg.polygons] == [1]  # fragment (0.05 < 0.1 mm²) dropped, 0.008 mm² hole filled
    expected_mm2 = math.pi * (1.0**2 - 0.252**2)
    assert seg.tissue_mm2 == pytest.approx(expected_mm2, rel=0.03)
    kept_small = segment_image(rgb, mpp, (1, 1), SegmentParams(min_tissue_mm2=0.01, min_hole_mm2=0.003))
    assert sorted(len(p.holes) for p in kept_small.polygons) == [0, 2]


def test_blank_field_has_no_tissue_and_fixed_threshold_works():
    blank = render((2000, 2000), 8.0, [])
    assert segment_image(blank, 8.0, (32, 32), SegmentParams()).polygons == []
    tissue = render(mpp=8.0, **FIELD)
    assert segment_image(tissue, 8.0, (32, 32), SegmentParams(method="fixed", threshold=250)).polygons == []
    assert len(segment_image(tissue, 8.0, (32, 32), SegmentParams(method="fixed", threshold=30)).polygons) == 1
    with pytest.raises(ValueError, match="segment.method='triangle'"):
        segment_image(tissue, 8.0, (32, 32), SegmentParams(method="triangle"))


# 40x: levels 0.25/1/4 µm/px, the 4 µm/px one is nearest 10 and is reduced x2; 20x: 0.5/2 µm/px, 2 is reduced x5.
@pytest.mark.parametrize("fixture, level, mask_mpp", [("slide_40x", 2, 8.0), ("slide_20x", 1, 10.0)])
def test_segmentation_level_and_area_on_slides(request, fixture, level, mask_mpp):
    path = request.getfixturevalue(fixture)
    scale_to_40x = 1 if fixture == "slide_40x" else 2
    tissue = [Ellipse(e.cx / scale_to_40x, e.cy / scale_to_40x, e.rx / scale_to_40x, e.ry / scale_to_40x)
              for e in blobs(8192, 6144, 3, seed=1)]
    with Slide(path) as slide:
        seg = segment_slide(slide, SegmentParams())
        mpp0 = slide.mpp
    assert seg.level == level and seg.mask_mpp == pytest.approx(mask_mpp, rel=0.01)
    true_mm2 = sum(e.area for e in tissue) * mpp0**2 / 1e6
    # The boundary of a smooth shape is found to within about one mask pixel: area error <= perimeter x 1 px.
    tolerance_mm2 = sum(ellipse_perimeter(e) for e in tissue) * mpp0 * mask_mpp / 1e6
    assert abs(seg.tissue_mm2 - true_mm2) <= tolerance_mm2
    assert len(seg.polygons) == 3
    for poly in seg.polygons:  # level-0 contour points lie on one of the ellipses, within 1.5 mask pixels
        dist = min((abs(radial(e, poly.exterior) - 1) * min(e.rx, e.ry) for e in tissue), key=np.median)
        assert dist.max() <= 1.5 * seg.scale[0]


def test_seg_level_is_chosen_by_physical_resolution(slide_factory):
    """Aperio pyramids (x4 levels): 16 µm/px at 40x, 8 µm/px at 20x; both near the default 10 µm/px."""
    p40 = slide_factory("pyr40.tif", width=4096, height=4096, min_level_size=16)
    p20 = slide_factory("pyr20.tif", width=4096, height=4096, min_level_size=16, mpp=0.5, app_mag=20)
    with Slide(p40) as s40, Slide(p20) as s20:
        assert s40.level_near_mpp(SegmentParams().seg_mpp) == 3 and s40.level_mpp(3) == pytest.approx(16)
        assert s20.level_near_mpp(SegmentParams().seg_mpp) == 2 and s20.level_mpp(2) == pytest.approx(8)


def test_slide_without_coarse_level_is_reduced_to_seg_mpp(slide_factory):
    """A single-level slide is read in bands and block-averaged, so the mask is still about seg_mpp."""
    spec = dict(width=3072, height=2048, tissue=[Ellipse(1536, 1024, 900, 700)], min_level_size=4096)
    with Slide(slide_factory("flat.tif", **spec)) as slide:
        assert slide.level_count == 1
        seg = segment_slide(slide, SegmentParams(seg_mpp=4.0))
    assert seg.mask.shape == (128, 192) and seg.scale == (16.0, 16.0)
    true_mm2 = math.pi * 900 * 700 * 0.25**2 / 1e6
    assert seg.tissue_mm2 == pytest.approx(true_mm2, rel=0.05)


def test_geojson_is_level0_polygons_with_holes(slide_factory, tmp_path):
    e, hole = Ellipse(3000, 2500, 2000, 1500), Ellipse(3000, 2500, 700, 500)
    path = slide_factory("holed.tif", width=6144, height=5120, tissue=[e], holes=[hole])
    with Slide(path) as slide:
        seg = segment_slide(slide, SegmentParams())
    write_geojson(tmp_path / "t.geojson", seg.polygons)
    doc = json.loads((tmp_path / "t.geojson").read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 1
    feature = doc["features"][0]
    assert feature["properties"]["objectType"] == "annotation"
    assert feature["properties"]["classification"]["name"] == "Tissue"
    assert feature["geometry"]["type"] == "Polygon"
    exterior, *holes = [np.asarray(r) for r in feature["geometry"]["coordinates"]]
    assert len(holes) == 1
    for ring in (exterior, holes[0]):
        assert len(ring) >= 4 and (ring[0] == ring[-1]).all()  # closed
    tol = 1.5 * seg.scale[0]  # level-0 pixels: the rings sit on the true boundaries
    assert (abs(radial(e, exterior) - 1) * min(e.rx, e.ry)).max() <= tol
    assert (abs(radial(hole, holes[0]) - 1) * min(hole.rx, hole.ry)).max() <= tol

    def signed_area(r):
        return 0.5 * np.sum(r[:-1, 0] * r[1:, 1] - r[1:, 0] * r[:-1, 1])

    assert signed_area(exterior) > 0 > signed_area(holes[0])  # RFC 7946 winding
    assert to_geojson([]) == {"type": "FeatureCollection", "features": []}

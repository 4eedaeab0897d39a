import numpy as np
import openslide
import pytest
from PIL import Image

from wsi_pipeline.slide import Slide, SlideError, resolve_mpp


def test_mpp_from_metadata_and_levels(slide_40x):
    with Slide(slide_40x) as s:
        assert s.mpp == pytest.approx(0.25)
        assert s.mpp_source == "metadata"
        assert s.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
        assert s.slide_id == "slide_40x"


def test_mpp_from_objective_power_warns_and_an_explicit_value_beats_it(slide_factory, caplog):
    path = slide_factory("power_only.tif", width=2048, height=2048, mpp=None, app_mag=20)
    with Slide(path) as s:
        assert s.mpp == pytest.approx(0.5) and s.mpp_source == "objective_power"
    assert "objective power" in caplog.text
    with Slide(path, mpp_override=0.2627) as s:  # the user's slide.mpp: not overruled by the 10 / power guess
        assert s.mpp == 0.2627 and s.mpp_source == "override"
    with Slide(slide_factory("slide_40x.tif"), mpp_override=0.5) as s:  # the slide's own metadata wins
        assert s.mpp == pytest.approx(0.25) and s.mpp_source == "metadata"


def test_missing_mpp_needs_override(slide_factory):
    path = slide_factory("no_mpp.tif", width=2048, height=2048, mpp=None, app_mag=None)
    with pytest.raises(SlideError, match=r"no_mpp.tif: no µm/px.*slide.mpp="):
        Slide(path)
    with Slide(path, mpp_override=0.5) as s:
        assert s.mpp == 0.5 and s.mpp_source == "override"


def test_resolve_mpp_ignores_garbage_values():
    props = {openslide.PROPERTY_NAME_MPP_X: "nan", openslide.PROPERTY_NAME_MPP_Y: "abc",
             openslide.PROPERTY_NAME_OBJECTIVE_POWER: "40"}
    assert resolve_mpp(props, "x.svs").mpp == pytest.approx(0.25)


@pytest.mark.parametrize("fixture, level, read_size", [("slide_40x", 0, 1024), ("slide_20x", 0, 512)])
def test_read_plan_for_20x(request, fixture, level, read_size):
    with Slide(request.getfixturevalue(fixture)) as s:
        plan = s.read_plan(0.5, 512)
        assert (plan.read_level, plan.read_size) == (level, read_size)
        assert plan.patch_size_level0 == round(512 * 0.5 / s.mpp)


def test_read_plan_uses_coarser_level_when_it_matches(slide_40x):
    with Slide(slide_40x) as s:  # 1.0 µm/px is exactly level 1 (downsample 4)
        plan = s.read_plan(1.0, 256)
        assert (plan.read_level, plan.read_size, plan.patch_size_level0) == (1, 256, 1024)
        # 2 µm/px lies between levels 1 (1 µm/px) and 2 (4 µm/px): never go coarser than the target
        assert s.read_plan(2.0, 256).read_level == 1


def test_read_patch_matches_direct_openslide_read(slide_40x):
    with Slide(slide_40x) as s:
        plan = s.read_plan(0.5, 512)
        patch = s.read_patch(2048, 1024, plan)
    raw = openslide.OpenSlide(str(slide_40x)).read_region((2048, 1024), 0, (1024, 1024)).convert("RGB")
    expected = np.asarray(raw.resize((512, 512), Image.BILINEAR))
    assert patch.shape == (512, 512, 3) and patch.dtype == np.uint8
    np.testing.assert_array_equal(patch, expected)


def test_text_file_named_svs_is_a_clear_error(tmp_path):
    bad = tmp_path / "notes.svs"
    bad.write_text("this is not a slide")
    with pytest.raises(SlideError, match="notes.svs: OpenSlide cannot open"):
        Slide(bad)


def test_truncated_tiff_is_a_clear_error(slide_40x, tmp_path):
    data = slide_40x.read_bytes()
    cut = tmp_path / "truncated.tif"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(SlideError, match="truncated.tif"):
        with Slide(cut) as s:  # opening may succeed: the damage shows on reading
            for level in range(s.level_count):
                s.read_level_image(level)
            s.read_region((0, 0), 0, s.dimensions)

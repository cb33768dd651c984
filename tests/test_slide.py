"""Slide reading against OpenSlide, level choice and the µm/px policy."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
from conftest import tissue_like

from cscvision.slides.slide import (
    MPP_FROM_OPENSLIDE,
    MPP_FROM_OVERRIDE,
    SlideError,
    load_mpp_overrides,
    open_slide,
    override_for,
    plan_read,
    resolve_mpp,
)
from cscvision.testing import write_pyramid


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    path = tmp_path_factory.mktemp("slides") / "pyr.tif"
    return write_pyramid(path, tissue_like(2048, 1536), mpp=0.25, levels=3, tile_px=256)


@pytest.fixture(scope="module")
def no_mpp(tmp_path_factory):
    path = tmp_path_factory.mktemp("slides") / "nompp.tif"
    return write_pyramid(path, tissue_like(512, 512), mpp=None, levels=1)


def test_info_reports_geometry_and_mpp(pyramid):
    with open_slide(pyramid) as slide:
        info = slide.info
    assert info.vendor == "generic-tiff"
    assert info.dimensions == (2048, 1536)
    assert info.level_count == 3
    assert info.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
    assert info.mpp == pytest.approx(0.25)
    assert info.mpp_source == MPP_FROM_OPENSLIDE
    assert info.bounds == (0, 0, 2048, 1536)


def test_real_svs_metadata(cmu_svs):
    with open_slide(cmu_svs) as slide:
        info = slide.info
        assert slide.associated_images()  # label, macro, thumbnail
    assert info.vendor == "aperio"
    assert info.dimensions == (2220, 2967)
    assert info.mpp == pytest.approx(0.499)
    assert info.objective_power == 20


@pytest.mark.parametrize(
    ("target", "level", "read_px"),
    [
        (0.25, 0, 224),  # native level 0
        (0.5, 1, 224),  # native level 1
        (1.0, 2, 224),  # native level 2
        (0.4, 0, 358),  # between 0 and 1: finest level not coarser, resized down
        (2.0, 2, 448),  # coarser than every level: top level, resized down
        (0.2, 0, 179),  # finer than the slide: upsampled from level 0
    ],
)
def test_level_choice(pyramid, target, level, read_px):
    with open_slide(pyramid) as slide:
        plan = plan_read(slide.info, mpp=target, tile_px=224)
        tile = slide.read_tile((256, 256), plan)
    assert (plan.level, plan.read_px) == (level, read_px)
    assert plan.tile_l0 == pytest.approx(read_px * 2**level)
    assert tile.shape == (224, 224, 3) and tile.dtype == np.uint8


def test_level_choice_tolerates_rounding_of_scanner_mpp(cmu_svs):
    with open_slide(cmu_svs) as slide:
        plan = plan_read(slide.info, mpp=0.5, tile_px=224)
    assert plan.read_px == 224 and plan.level == 0  # 0.499 µm/px counts as 0.5


def test_read_region_matches_openslide_and_is_white_outside(pyramid):
    with open_slide(pyramid, fast=False) as slide:
        rgb = slide.read_region((1900, 1400), 0, (300, 300))
    osr = openslide.OpenSlide(str(pyramid))
    ref = np.asarray(osr.read_region((1900, 1400), 0, (300, 300)))
    osr.close()
    inside = ref[..., 3] == 255
    assert np.array_equal(rgb[inside], ref[..., :3][inside])
    assert (rgb[~inside] == 255).all() and (~inside).any()


def test_resized_tile_is_antialiased_average(pyramid):
    with open_slide(pyramid) as slide:
        plan = plan_read(slide.info, mpp=0.75, tile_px=64)  # from level 1, 1.5x down
        tile = slide.read_tile((1024, 768), plan).astype(float)
        src = slide.read_region((1024, 768), plan.level, (plan.read_px, plan.read_px))
    assert abs(tile.mean() - src.mean()) < 2.0


def test_missing_mpp_is_an_error_naming_slide_and_fixes(no_mpp):
    with pytest.raises(SlideError) as err:
        open_slide(no_mpp)
    message = str(err.value)
    assert str(no_mpp) in message and "--slide-mpp" in message and "--mpp-override" in message
    with open_slide(no_mpp, mpp=0.5) as slide:
        assert slide.info.mpp == 0.5 and slide.info.mpp_source == MPP_FROM_OVERRIDE


def test_mpp_from_tiff_tags_when_openslide_has_none(tmp_path):
    # A plain (untiled) TIFF with resolution in inches: OpenSlide gives no mpp.
    import tifffile

    path = tmp_path / "plain.tif"
    dpi = 25_400 / 0.5  # 0.5 µm/px
    tifffile.imwrite(path, tissue_like(300, 200), resolution=(dpi, dpi), resolutionunit="INCH")
    with open_slide(path) as slide:
        assert slide.info.mpp == pytest.approx(0.5)
        assert slide.info.mpp_source == "tiff-resolution"


def test_png_without_mpp_needs_override(ihc_png):
    with pytest.raises(SlideError, match="no µm/px"):
        open_slide(ihc_png)
    with open_slide(ihc_png, mpp=0.5) as slide:
        assert slide.info.dimensions == (512, 512)
        assert slide.read_region((0, 0), 0, (16, 16)).shape == (16, 16, 3)


def test_override_csv(tmp_path):
    csv_path = tmp_path / "mpp.csv"
    csv_path.write_text("slide,mpp\nA.svs,0.25\nB,0.5\n")
    overrides = load_mpp_overrides(csv_path)
    assert override_for("/x/A.svs", overrides) == 0.25
    assert override_for("/y/B.ndpi", overrides) == 0.5  # matched by stem
    assert override_for("/y/C.svs", overrides) is None
    bad = tmp_path / "bad.csv"
    bad.write_text("name,um\nA,1\n")
    with pytest.raises(SlideError, match="slide,mpp"):
        load_mpp_overrides(bad)
    bad.write_text("slide,mpp\nA,-1\n")
    with pytest.raises(SlideError, match="outside the plausible"):
        load_mpp_overrides(bad)


def test_resolve_mpp_order():
    props = {openslide.PROPERTY_NAME_MPP_X: "0.25", openslide.PROPERTY_NAME_MPP_Y: "0.25"}
    assert resolve_mpp("s.svs", props, None) == (0.25, MPP_FROM_OPENSLIDE)
    with pytest.warns(UserWarning, match="not used"):
        assert resolve_mpp("s.svs", props, 0.5) == (0.25, MPP_FROM_OPENSLIDE)
    assert resolve_mpp("s.svs", {}, 0.5) == (0.5, MPP_FROM_OVERRIDE)


@pytest.mark.parametrize("content", [b"", b"not a slide at all", b"II*\x00garbage" * 10])
def test_corrupt_and_non_slide_files(tmp_path, content):
    path = tmp_path / "bad.svs"
    path.write_bytes(content)
    with pytest.raises(SlideError, match=str(path)):
        open_slide(path)


def test_missing_file(tmp_path):
    with pytest.raises(SlideError, match="file not found"):
        open_slide(tmp_path / "nope.svs")


def test_override_csv_from_excel_with_bom_and_short_rows(tmp_path):
    csv_path = tmp_path / "mpp.csv"
    csv_path.write_text("slide,mpp\nA.svs,0.25\n", encoding="utf-8-sig")  # Excel "CSV UTF-8"
    assert load_mpp_overrides(csv_path) == {"A.svs": 0.25}
    csv_path.write_text("slide,mpp\nA.svs\n")
    with pytest.raises(SlideError, match="not a number"):
        load_mpp_overrides(csv_path)


@pytest.mark.parametrize("dpi", [300, 600])
def test_image_editor_dpi_is_not_a_microscope_mpp(tmp_path, dpi):
    # 300 dpi is 84.7 µm/px: taken as the slide's µm/px, every tile would be one pixel.
    import tifffile

    path = tmp_path / "scan.tif"
    tifffile.imwrite(path, tissue_like(300, 200), resolution=(dpi, dpi), resolutionunit="INCH")
    with pytest.raises(SlideError, match="no µm/px"):
        open_slide(path)


def test_near_whole_factor_snaps_to_exact_reduction(pyramid):
    import dataclasses

    with open_slide(pyramid) as slide:
        info = dataclasses.replace(  # a 40x scanner's µm/px, one level
            slide.info, mpp=0.2527, level_dimensions=((2048, 1536),), level_downsamples=(1.0,)
        )
    plan = plan_read(info, mpp=0.5, tile_px=224)
    assert plan.level == 0 and plan.read_px == 448  # not round(224 * 1.9786) = 443

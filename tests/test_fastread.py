"""The fast JPEG path must give OpenSlide's pixels exactly, or step aside (return None).

Both decode with libjpeg-turbo using the same settings, so the bound on differences is
zero: every comparison here is exact.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cscvision.slides.fastread import StoredTileReader
from cscvision.slides.slide import ReadPlan, open_slide, plan_read
from cscvision.slides.storedtiles import jpeg_header, level_rect, paste_plan
from cscvision.testing import texture_tile_fn, write_pyramid

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
CMU_SVS = DATA / "cmu_small_region.svs"
needs_cmu = pytest.mark.skipif(
    not CMU_SVS.exists(), reason=f"real test data not found at {DATA} (see shared/data)"
)

WIDTH, HEIGHT, TILE = 1100, 900, 256  # 5 x 4 stored tiles, edge tiles 76 and 132 px


def textured(width: int, height: int) -> np.ndarray:
    """H&E-like texture plus ramps, so a region read from the wrong place cannot match."""
    rgb = texture_tile_fn(seed=3)(0, 0, 0, width, height).astype(np.int16)
    yy, xx = np.mgrid[0:height, 0:width]
    rgb[..., 0] -= (xx // 9).astype(np.int16) % 40
    rgb[..., 2] -= (yy // 7).astype(np.int16) % 40
    return np.clip(rgb, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fastread")
    rgb = textured(WIDTH, HEIGHT)
    return {
        "generic": write_pyramid(root / "generic.tif", rgb),
        "aperio": write_pyramid(root / "aperio.svs", rgb, aperio=True),
        "holey": write_pyramid(root / "holey.svs", rgb, aperio=True, missing_tiles=[(0, 3, 1)]),
        "fractional": write_pyramid(root / "fractional.tif", textured(WIDTH + 1, HEIGHT - 1)),
        "deflate": write_pyramid(root / "deflate.tif", rgb, compression="deflate"),
        "uncompressed": write_pyramid(root / "none.tif", rgb, compression="none"),
    }


@pytest.fixture(scope="module")
def png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("png") / "image.png"
    Image.fromarray(textured(300, 200)).save(path)
    return path


def assert_matches_openslide(path: Path, regions: list[tuple[tuple[int, int], int, tuple]]):
    """Every region read by the fast reader equals OpenSlide's, composited on white."""
    with open_slide(path) as slide:
        reader = StoredTileReader.open(str(path), slide.info)
        assert reader is not None
        try:
            for xy_l0, level, size in regions:
                fast = reader.read_region(xy_l0, level, size)
                assert fast is not None, f"fast path declined {xy_l0} level {level} {size}"
                assert fast.shape == (size[1], size[0], 3) and fast.dtype == np.uint8
                ref = slide.read_region_openslide(xy_l0, level, size)
                np.testing.assert_array_equal(fast, ref, err_msg=f"{xy_l0} L{level} {size}")
        finally:
            reader.close()


# --- when the fast path is used -----------------------------------------------------------


@pytest.mark.parametrize("name", ["generic", "aperio", "fractional"])
def test_fast_path_is_used_for_jpeg_tiled_tiffs(slides, name):
    with open_slide(slides[name]) as slide:
        assert slide.info.vendor == ("aperio" if name == "aperio" else "generic-tiff")
        assert slide.uses_fast_path


@pytest.mark.parametrize("name", ["deflate", "uncompressed"])
def test_fast_path_is_not_used_without_jpeg(slides, name):
    with open_slide(slides[name]) as slide:
        assert not slide.uses_fast_path
        assert slide.read_region((0, 0), 0, (64, 64)).shape == (64, 64, 3)


def test_fast_path_is_not_used_for_a_png(png):
    with open_slide(png, mpp=0.5) as slide:
        assert not slide.uses_fast_path


@needs_cmu
def test_fast_path_is_used_for_the_real_svs():
    with open_slide(CMU_SVS) as slide:
        assert slide.info.vendor == "aperio"
        assert slide.uses_fast_path


# --- same pixels as OpenSlide -------------------------------------------------------------


@pytest.mark.parametrize("name", ["generic", "aperio"])
def test_aligned_tiles_match_openslide(slides, name):
    full = [
        (x, y) for y in range(0, HEIGHT - TILE + 1, TILE) for x in range(0, WIDTH - TILE + 1, TILE)
    ]
    assert len(full) == 12
    assert_matches_openslide(slides[name], [(xy, 0, (TILE, TILE)) for xy in full])


@pytest.mark.parametrize("name", ["generic", "aperio"])
def test_unaligned_regions_spanning_four_tiles_match_openslide(slides, name):
    regions = [((200, 180), 0, (224, 224)), ((500, 300), 0, (300, 400)), ((1, 255), 0, (256, 2))]
    regions += [((130, 130), 0, (448, 448)), ((0, 0), 0, (1100, 900))]
    assert_matches_openslide(slides[name], regions)


@pytest.mark.parametrize("name", ["generic", "aperio"])
def test_edge_and_outside_regions_match_openslide(slides, name):
    regions = [
        ((1024, 768), 0, (76, 132)),  # the corner stored tile, cropped to the image
        ((1000, 700), 0, (256, 256)),  # across the right and bottom edges
        ((-50, -70), 0, (200, 200)),  # before the top-left corner
        ((5000, 10), 0, (64, 64)),  # wholly outside
        ((512, 256), 2, (100, 100)),  # a level 2 region past its 275 x 225 edge
    ]
    assert_matches_openslide(slides[name], regions)
    with open_slide(slides[name]) as slide:
        assert (slide.read_region((1000, 700), 0, (256, 256))[200:, 200:] == 255).all()


@pytest.mark.parametrize("name", ["generic", "aperio"])
def test_levels_above_zero_match_openslide(slides, name):
    rng = np.random.default_rng(7)
    regions = []
    for level, downsample in ((1, 2), (2, 4)):
        for _ in range(12):
            x, y = rng.integers(-20, 300, size=2)
            w, h = rng.integers(1, 300, size=2)
            regions.append(((int(x) * downsample, int(y) * downsample), level, (int(w), int(h))))
    assert_matches_openslide(slides[name], regions)


def test_aperio_fixture_has_shared_tables_and_rgb_jpeg(slides):
    with tifffile.TiffFile(slides["aperio"]) as tif:
        page = tif.pages[0]
        assert page.jpegtables is not None and page.photometric == 2  # RGB, not YCbCr
    with tifffile.TiffFile(slides["holey"]) as tif:
        assert tif.pages[0].databytecounts[1 * 5 + 3] == 0  # the missing tile


def test_missing_level0_tile_reads_white_as_in_openslide(slides):
    assert_matches_openslide(slides["holey"], [((700, 200), 0, (400, 150))])
    with open_slide(slides["holey"]) as slide:
        assert (slide.read_region((3 * TILE, TILE), 0, (TILE, TILE)) == 255).all()


def test_aperio_tiles_over_a_missing_tile_go_to_openslide(slides):
    # OpenSlide paints the coarser tiles covering a missing tile by scaling the finer level
    path = slides["holey"]
    with open_slide(path) as slide:
        reader = StoredTileReader.open(str(path), slide.info)
        assert reader.read_region((2 * TILE, 0), 1, (TILE, TILE)) is None  # covers (3, 1)
        assert reader.read_region((0, 0), 2, (100, 100)) is None
        reader.close()
        for xy_l0, level in (((2 * TILE, 0), 1), ((0, 0), 2)):
            ref = slide.read_region_openslide(xy_l0, level, (TILE, TILE))
            np.testing.assert_array_equal(slide.read_region(xy_l0, level, (TILE, TILE)), ref)
    assert_matches_openslide(path, [((0, 0), 1, (TILE, TILE)), ((0, 2 * TILE), 1, (300, 200))])


@needs_cmu
def test_real_svs_matches_openslide():
    stored = 240  # the CMU region's tile size; 2220 x 2967 px
    regions = [((x, y), 0, (stored, stored)) for x, y in ((0, 0), (480, 720), (1920, 2640))]
    regions += [((x, y), 0, (256, 256)) for x, y in ((100, 100), (1000, 1500), (2000, 2800))]
    regions += [((2100, 2900), 0, (300, 300)), ((0, 0), 0, (2220, 2967))]
    assert_matches_openslide(CMU_SVS, regions)


def test_fractional_level_coordinates_fall_back_to_openslide(slides):
    with open_slide(slides["fractional"]) as slide:
        downsample = slide.info.level_downsamples[1]
        assert not float(downsample).is_integer()
        reader = StoredTileReader.open(str(slides["fractional"]), slide.info)
        xy_l0 = (round(100 * downsample), 0)
        assert reader.read_region(xy_l0, 1, (64, 64)) is None
        assert reader.read_region((64, 32), 0, (64, 64)) is not None  # level 0 is exact
        reader.close()
        ref = slide.read_region_openslide(xy_l0, 1, (64, 64))
        np.testing.assert_array_equal(slide.read_region(xy_l0, 1, (64, 64)), ref)


# --- memory, threads, processes -----------------------------------------------------------


def test_returned_arrays_are_the_callers_own(slides):
    with open_slide(slides["generic"]) as slide:
        ref = slide.read_region_openslide((0, 0), 0, (TILE, TILE))
        for xy, size in (((100, 100), (300, 300)), ((0, 0), (TILE, TILE))):
            slide.read_region(xy, 0, size)[:] = 0  # fills the cache, then scribbles
            np.testing.assert_array_equal(slide.read_region((0, 0), 0, (TILE, TILE)), ref)


def test_decoded_tile_cache_is_bounded(slides):
    with open_slide(slides["generic"]) as slide:
        reader = StoredTileReader.open(str(slides["generic"]), slide.info)
        reader.cache_bytes = 3 * TILE * TILE * 3
        reader.read_region((0, 0), 0, (WIDTH, HEIGHT))
        assert len(reader._cache) == 3
        reader.close()


@pytest.fixture(scope="module")
def wide_slide(tmp_path_factory) -> Path:
    """A level 40 stored tiles (of 64 px) across and 6 down: wide for its tile size."""
    path = tmp_path_factory.mktemp("wide") / "wide.tif"
    return write_pyramid(path, textured(40 * 64, 6 * 64), tile_px=64, levels=1)


def raster_decodes(path: Path, region: int, factor: int, reserve: bool) -> tuple[int, int]:
    """(decodes, distinct stored tiles) for a raster grid of ``region`` px regions read
    with a cache of 12 tiles, less than one stored row, before any reservation."""
    with open_slide(path) as slide:
        reader = StoredTileReader.open(str(path), slide.info)
        reader.cache_bytes = 12 * 64 * 64 * 3 // factor**2
        if reserve:
            reader.reserve_raster(0, region, factor)
        decoded: list[int] = []
        decode = reader._decode
        reader._decode = lambda lvl, index, out=None: (
            decoded.append(index) or decode(lvl, index, out)
        )
        width, height = slide.info.dimensions
        for y in range(0, height - region + 1, region):
            for x in range(0, width - region + 1, region):
                if factor == 1:
                    got = reader.read_region((x, y), 0, (region, region))
                    ref = slide.read_region_openslide((x, y), 0, (region, region))
                else:
                    got = reader.read_reduced((x, y), 0, (region, region), factor)
                    ref = np.asarray(
                        Image.fromarray(
                            slide.read_region_openslide((x, y), 0, (region, region))
                        ).reduce(factor)
                    )
                np.testing.assert_array_equal(got, ref)
        reader.close()
    return len(decoded), len(set(decoded))


@pytest.mark.parametrize(("region", "factor"), [(56, 1), (112, 2)])
def test_raster_reservation_decodes_each_stored_tile_once(wide_slide, region, factor):
    # Unaligned regions (56 px on 64 px tiles; 112 px reduced by 2): each grid row spans
    # two or three stored rows and the next grid row reuses the last. A cache smaller
    # than those rows decodes tiles again; reserve_raster sizes it from the level's width.
    decodes, distinct = raster_decodes(wide_slide, region, factor, reserve=False)
    assert decodes > 1.3 * distinct  # the thrash the reservation exists for
    decodes, distinct = raster_decodes(wide_slide, region, factor, reserve=True)
    assert decodes == distinct


def test_reservation_is_capped_and_never_shrinks(wide_slide):
    from cscvision.slides import fastread

    with open_slide(wide_slide) as slide:
        reader = StoredTileReader.open(str(wide_slide), slide.info)
        floor = reader.cache_bytes
        reader.reserve_raster(0, 56)
        assert reader.cache_bytes == floor  # 2 rows of 42 small tiles: far under the floor
        reader.reserve_raster(0, 10**7)
        assert reader.cache_bytes == fastread.CACHE_MAX_BYTES
        reader.reserve_raster(0, 56)
        assert reader.cache_bytes == fastread.CACHE_MAX_BYTES
        reader.close()


def test_slide_reserves_for_the_plans_reduced_tiles(wide_slide):
    with open_slide(wide_slide) as slide:
        slide._fast.cache_bytes = 0
        plan = plan_read(slide.info, mpp=1.0, tile_px=56)  # the slide is 0.5 µm/px
        assert (plan.level, plan.read_px) == (0, 112)
        slide.reserve_raster(plan)
        # 112 px regions span up to 3 stored rows; 42 tiles each, reduced to 32 x 32 x 3.
        assert slide._fast.cache_bytes == 3 * 42 * 32 * 32 * 3


@pytest.mark.parametrize("name", ["generic", "aperio", "holey", "deflate"])
def test_read_tile_into_out_equals_the_plain_read(slides, name):
    # Aligned tiles are decoded straight into the slot; cached, unaligned, reduced and
    # OpenSlide (deflate) reads are written into it: the same pixels as without ``out``.
    with open_slide(slides[name]) as slide:
        plans = [
            plan_read(slide.info, mpp=m, tile_px=p) for m, p in ((0.5, 256), (0.5, 224), (1.0, 224))
        ]
        batch = np.zeros((6, 256, 256, 3), np.uint8)
        for plan in plans:
            side = plan.tile_px
            slots = (
                batch[:, :side, :side] if side == 256 else np.zeros((6, side, side, 3), np.uint8)
            )
            for k, xy in enumerate(
                [(0, 0), (768, 256), (1000, 800), (768, 512), (30, 40), (256, 0)]
            ):
                want = slide.read_tile(xy, plan)
                slot = slots[k]
                assert slide.read_tile(xy, plan, out=slot) is slot
                np.testing.assert_array_equal(slot, want)
        with pytest.raises(ValueError, match="out must be uint8 256 x 256 x 3"):
            slide.read_tile((0, 0), plans[0], out=np.zeros((224, 224, 3), np.uint8))


def test_out_that_is_not_contiguous_is_still_filled(slides):
    with open_slide(slides["generic"]) as slide:
        plan = plan_read(slide.info, mpp=0.5, tile_px=256)
        wide = np.zeros((256, 512, 3), np.uint8)
        slide.read_tile((256, 256), plan, out=wide[:, ::2])
        np.testing.assert_array_equal(wide[:, ::2], slide.read_tile((256, 256), plan))


def regions_and_refs(path: Path, n: int):
    rng = np.random.default_rng(11)
    regions = [((int(x), int(y)), 0, (224, 224)) for x, y in rng.integers(0, 800, (n, 2))]
    with open_slide(path, fast=False) as slide:
        refs = [slide.read_region(*r) for r in regions]
    return regions, refs


def test_two_threads_share_one_slide(slides):
    regions, refs = regions_and_refs(slides["aperio"], 40)
    errors: list[str] = []
    with open_slide(slides["aperio"]) as slide:

        def work(order: list[int]) -> None:
            for _ in range(3):
                for i in order:
                    if not np.array_equal(slide.read_region(*regions[i]), refs[i]):
                        errors.append(f"region {regions[i]}")

        order = list(range(len(regions)))
        threads = [threading.Thread(target=work, args=(o,)) for o in (order, order[::-1])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_reading_after_fork(slides):
    regions, refs = regions_and_refs(slides["generic"], 6)
    want = hashlib.sha256(b"".join(r.tobytes() for r in refs)).hexdigest()
    with open_slide(slides["generic"]) as slide:
        slide.read_region(*regions[0])  # the parent has used it: fd open, cache filled
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: read, report a digest, leave without running pytest's exit
            try:
                got = b"".join(slide.read_region(*r).tobytes() for r in regions)
                os.write(write_fd, hashlib.sha256(got).hexdigest().encode())
            finally:
                os._exit(0)
        os.close(write_fd)
        child_digest = os.read(read_fd, 64).decode()
        os.waitpid(pid, 0)
        os.close(read_fd)
        assert child_digest == want
        np.testing.assert_array_equal(slide.read_region(*regions[1]), refs[1])  # parent too


# --- pure parts and the writer ------------------------------------------------------------


def test_level_rect_accepts_only_whole_level_pixels():
    assert level_rect((512, 256), 2.0, (10, 20)) == (256, 128, 10, 20)
    assert level_rect((513, 256), 2.0, (10, 20)) is None
    assert level_rect((400, 0), 1.99823, (10, 20)) is None
    assert level_rect((0, 0), 1.0, (0, 20)) is None


def test_paste_plan_known_answer():
    # 224 px at (100, 30) of 128 px tiles: columns 0-2 (28 + 128 + 68 px), rows 0-1 (98 + 126)
    plan = paste_plan(100, 30, 224, 224, 128, 128)
    assert [(r, c) for r, c, *_ in plan] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    _, _, dst_y, dst_x, src_y, src_x = plan[2]
    assert (dst_y, dst_x) == (slice(0, 98), slice(156, 224))
    assert (src_y, src_x) == (slice(30, 128), slice(0, 68))
    _, _, dst_y, dst_x, src_y, src_x = plan[4]
    assert (dst_y, dst_x, src_y, src_x) == (
        slice(98, 224),
        slice(28, 156),
        slice(0, 126),
        slice(0, 128),
    )
    assert paste_plan(0, 0, 128, 128, 128, 128) == ((0, 0, *(slice(0, 128),) * 4),)


def test_jpeg_header_merges_tables_and_marks_rgb():
    tables = b"\xff\xd8" + b"\xff\xdb\x00\x03\x00" + b"\xff\xd9"
    assert jpeg_header(None, "YCBCR") == b""
    assert jpeg_header(tables, "YCBCR") == b"\xff\xd8\xff\xdb\x00\x03\x00"
    rgb = jpeg_header(tables, "RGB")
    assert rgb.startswith(b"\xff\xd8\xff\xeeAdobe"[:4]) and b"Adobe" in rgb
    assert rgb.endswith(b"\xff\xdb\x00\x03\x00")


@pytest.mark.parametrize(("aperio", "mpp"), [(False, 0.5), (True, 0.25), (False, None)])
def test_write_pyramid_is_read_by_openslide(tmp_path, aperio, mpp):
    import openslide

    path = write_pyramid(tmp_path / "p.tif", textured(600, 500), mpp=mpp, aperio=aperio, levels=2)
    with openslide.OpenSlide(str(path)) as osr:
        assert osr.properties["openslide.vendor"] == ("aperio" if aperio else "generic-tiff")
        assert osr.level_dimensions == ((600, 500), (300, 250))
        reported = osr.properties.get("openslide.mpp-x")
        assert (float(reported) if reported else None) == mpp


def test_read_tile_box_averages_whole_number_factors(slides):
    with open_slide(slides["generic"]) as slide:
        # 1 µm/px from level 0 (0.5 µm/px), although level 1 would serve it as is
        plan = ReadPlan(mpp=1.0, tile_px=100, level=0, downsample=1.0, read_px=200, tile_l0=200)
        tile = slide.read_tile((300, 200), plan)
        region = slide.read_region((300, 200), 0, (200, 200)).astype(np.float64)
        box = region.reshape(100, 2, 100, 2, 3).mean(axis=(1, 3))
        assert tile.shape == (100, 100, 3)
        assert np.abs(tile - box).max() <= 1  # rounding only


@pytest.mark.parametrize("name", ["generic", "aperio", "holey"])
@pytest.mark.parametrize("factor", [2, 3, 4])
def test_reduced_tiles_equal_openslide_region_reduced(slides, name, factor):
    # Stored tiles reduced once each must give what reducing OpenSlide's region gives, bit
    # for bit: inside, across tile seams, over the right and bottom edges (boxes mixing
    # pixels and white), past them, and at odd positions (where the fast path declines).
    tile_px = 64
    side = tile_px * factor
    plan = ReadPlan(
        mpp=0.5 * factor, tile_px=tile_px, level=0, downsample=1.0, read_px=side, tile_l0=side
    )
    spots = [(0, 0), (240, 120), (WIDTH - side + 6, 300), (1000, HEIGHT - 40), (1200, 1000)]
    spots += [(3, 0), (WIDTH - 50, HEIGHT - 7)]
    with open_slide(slides[name]) as fast, open_slide(slides[name], fast=False) as ref:
        for xy in spots:
            want = ref.read_tile(xy, plan)
            np.testing.assert_array_equal(fast.read_tile(xy, plan), want, err_msg=f"{xy}")
        exact = fast._fast.read_reduced((240, 120), 0, (side, side), factor)
        assert (exact is None) == (TILE % factor != 0)  # 256 px tiles do not split in 3s
        assert fast._fast.read_reduced((3, 0), 0, (side, side), factor) is None


def test_reduce_tile_is_pils_reduce_bit_for_bit():
    # OpenCV's INTER_AREA serves factor 2 where installed: it must round as PIL does.
    from cscvision.slides.storedtiles import _cv2, reduce_tile

    rng = np.random.default_rng(8)
    tiles = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), textured(320, 192)]
    for rgb in tiles:
        for factor in (2, 4):
            want = np.asarray(Image.fromarray(rgb).reduce(factor))
            np.testing.assert_array_equal(reduce_tile(rgb, factor), want)
    if _cv2() is None:
        pytest.skip("OpenCV not installed (the speed extra): PIL served factor 2 too")

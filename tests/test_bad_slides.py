"""Bad slides fail clearly, one by one, and the rest of the batch finishes (issue 12, 6-7).

Each corpus case runs ``cscvision tile`` (or ``infer``) in-process on a good slide done
earlier, the bad slide and a new good slide, and checks the exit status, the message in
``errors.csv``, that the new good slide finished and that the earlier outputs are
byte-identical. The bad slides are made here: an Aperio SVS claiming ``MPP = 1000`` or
``1e-9``, headers claiming 1,000,000 x 1,000,000 px in a few hundred bytes, a corrupt
stored JPEG tile, and more.
"""

from __future__ import annotations

import csv
import json
import re
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cscvision.cli import main
from cscvision.slides.batch import SlideJob, run_batch
from cscvision.slides.grid import GridSpec, make_grid
from cscvision.slides.info import MEMORY_BUDGET_BYTES, MPP_FROM_TIFF, CorruptTileError, SlideError
from cscvision.slides.slide import ReadPlan, open_slide
from cscvision.testing import output_snapshot, texture_tile_fn, write_pyramid

SIZE = (1100, 900)  # 5 x 4 stored tiles of 256 px; grids of 224 px tiles
CORRUPT_TILE = (1, 1)  # stored (column, row) of level 0 overwritten in the corrupt slides
DEMO_MODEL = Path(__file__).resolve().parents[1] / "models" / "demo-synthetic"


# --- making bad slides ---------------------------------------------------------------------


def good_svs(path: Path, seed: int = 0) -> Path:
    rgb = texture_tile_fn(seed)(0, 0, 0, *SIZE)
    return write_pyramid(path, rgb, aperio=True, levels=3)


def with_aperio_mpp(path: Path, mpp_text: str) -> Path:
    """An Aperio SVS whose ImageDescription says ``MPP = mpp_text``."""
    good_svs(path)
    description = tifffile.TiffFile(path).pages[0].description
    tifffile.tiffcomment(path, description.replace("MPP = 0.5000", f"MPP = {mpp_text}"), 0)
    return path


def claimed_size_tiff(path: Path, width: int, height: int, *, description=None, pad=0) -> Path:
    """A tiled RGB TIFF whose header claims ``width x height`` px; its few tiles all point
    at one 64-byte run of data (plus ``pad`` bytes of zeros): nothing close to the pixels."""
    tile = 250_000  # a multiple of 16, so 1,000,000 px is 4 x 4 tiles
    n = -(-width // tile) * -(-height // tile)
    desc = (description + "\0").encode() if description else b""
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1)]
    tags += [(262, 3, 1, 2), (277, 3, 1, 3), (284, 3, 1, 1), (322, 4, 1, tile), (323, 4, 1, tile)]
    ifd_end = 8 + 2 + 12 * (len(tags) + 2 + bool(desc)) + 4
    offsets_at, counts_at = ifd_end, ifd_end + 4 * n
    desc_at = counts_at + 4 * n
    data_at = desc_at + len(desc)
    tags += [(324, 4, n, offsets_at), (325, 4, n, counts_at)]
    if desc:
        tags.append((270, 2, len(desc), desc_at))
    body = b"II*\x00" + struct.pack("<IH", 8, len(tags))
    for tag, kind, count, value in sorted(tags):
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        body += struct.pack("<HHI", tag, kind, count) + packed
    body += struct.pack("<I", 0) + struct.pack(f"<{n}I", *[data_at] * n)
    body += struct.pack(f"<{n}I", *[64] * n) + desc + b"\x80" * 64 + b"\0" * pad
    path.write_bytes(body)
    return path


def png_claiming(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat))
    return path


def corrupt_stored_tile(path: Path, col: int, row: int, page: int = 0) -> Path:
    """Overwrite one stored JPEG tile's bytes with zeros (it no longer decodes)."""
    with tifffile.TiffFile(path) as tif:
        level = tif.pages[page]
        index = row * -(-level.imagewidth // level.tilewidth) + col
        offset, count = level.dataoffsets[index], level.databytecounts[index]
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(b"\0" * count)
    return path


def corrupt_svs(path: Path) -> Path:
    return corrupt_stored_tile(good_svs(path, seed=4), *CORRUPT_TILE)


def junk_dicom_folder(path: Path) -> Path:
    path.mkdir()
    for name in ("a.dcm", "b.dcm"):
        (path / name).write_bytes(b"\0" * 128 + b"DICM" + b"\x01" * 200)
    return path


APERIO_HEADER = "Aperio Image Library v1.0\r\n1000000x1000000 |AppMag = 20|MPP = 0.5"


def corrupt_tile_xy(xy_l0: np.ndarray, tile_l0: float) -> set[tuple[int, int]]:
    """Grid tiles whose box meets the corrupted stored tile (level 0, 256 px)."""
    x0, y0 = CORRUPT_TILE[0] * 256, CORRUPT_TILE[1] * 256
    hit = (
        (xy_l0[:, 0] < x0 + 256)
        & (xy_l0[:, 0] + tile_l0 > x0)
        & (xy_l0[:, 1] < y0 + 256)
        & (xy_l0[:, 1] + tile_l0 > y0)
    )
    return {(int(x), int(y)) for x, y in xy_l0[hit]}


# --- running the CLI in-process ------------------------------------------------------------


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("good")
    return {"earlier": good_svs(root / "earlier.svs", 1), "new": good_svs(root / "new.svs", 2)}


def errors(out: Path) -> dict[str, str]:
    with (out / "errors.csv").open(newline="") as f:
        return {row["slide_id"]: row["error"] for row in csv.DictReader(f)}


def run_batch_with(good, out: Path, command: str, bad: Path, *extra: str) -> int:
    """Run ``command`` on the earlier slide alone, then on earlier + bad + new; return the
    second run's exit status after checking the earlier outputs did not change."""
    common = ["--out", str(out), *extra]
    if command == "infer":
        common += ["--model", str(DEMO_MODEL), "--workers", "0", "--threads", "1"]
    assert main([command, str(good["earlier"]), *common]) == 0
    before = output_snapshot(out / "earlier")
    status = main([command, str(good["earlier"]), str(bad), str(good["new"]), *common])
    assert output_snapshot(out / "earlier") == before, "an earlier output changed"
    done = "summary.json" if command == "infer" else "tiles.json"
    assert (out / "new" / done).is_file(), "the rest of the batch did not finish"
    return status


# (case id, how to make the bad slide, extra flags, the message in errors.csv)
CASES: list[tuple[str, Callable[[Path], Path], tuple[str, ...], str]] = [
    (
        "svs_mpp_1000",
        lambda d: with_aperio_mpp(d / "mpp_1000.svs", "1000"),
        (),
        r"metadata says 1000 µm/px, outside the plausible 0.05-20 µm/px.*--slide-mpp",
    ),
    (
        "svs_mpp_1e-9",
        lambda d: with_aperio_mpp(d / "mpp_tiny.svs", "1e-9"),
        (),
        r"metadata says 1e-09 µm/px, outside the plausible",
    ),
    (
        "svs_mpp_zero",
        lambda d: with_aperio_mpp(d / "mpp_zero.svs", "0"),
        (),
        r"metadata says 0 µm/px, outside the plausible",
    ),
    (
        "tiff_megapixel_header_in_bytes",
        lambda d: claimed_size_tiff(d / "huge.tif", 1_000_000, 1_000_000),
        (),
        r"claims 1,000,000 x 1,000,000 px in a file of \d{3} bytes.*truncated or its header",
    ),
    (
        "svs_megapixel_header_in_bytes",
        lambda d: claimed_size_tiff(
            d / "huge.svs", 1_000_000, 1_000_000, description=APERIO_HEADER
        ),
        (),
        r"claims 1,000,000 x 1,000,000 px in a file of",
    ),
    (
        "svs_thumbnail_over_memory_budget",  # 1.1 MB passes the byte check; 11 GiB thumbnail
        lambda d: claimed_size_tiff(
            d / "big.svs", 1_000_000, 1_000_000, description=APERIO_HEADER, pad=1_100_000
        ),
        (),
        r"62500 x 62500 px thumbnail at 8 µm/px would need 10.9 GiB, over the 2.0 GiB memory",
    ),
    (
        "png_decompression_bomb_header",
        lambda d: png_claiming(d / "bomb.png", 1_000_000, 1_000_000),
        (),
        r"bomb.png: Image size \(1000000000000 pixels\) exceeds.*tiled, pyramidal slide",
    ),
    (
        "tiff_72_dpi_from_an_image_editor",
        lambda d: write_pyramid(
            d / "dpi72.tif", texture_tile_fn(5)(0, 0, 0, 600, 500), mpp=25400 / 72
        ),
        (),
        r"dpi72.tif: no µm/px in the slide metadata or TIFF resolution tags; pass --slide-mpp",
    ),
    (
        "corrupt_tile_export",
        lambda d: corrupt_svs(d / "corrupt.svs"),
        ("--export-tiles",),
        r"corrupt.svs: corrupt tile at level 0, level-0 x=\d+ y=\d+ \(stored tile column 1, "
        r"row 1: .*\); pass --on-corrupt-tile skip",
    ),
    (
        "dicom_folder_of_junk",
        lambda d: junk_dicom_folder(d / "junk_dicom"),
        (),
        r"junk_dicom: OpenSlide opens none of its 2 .dcm files as a WSI",
    ),
    (
        "svs_mpp_25",
        lambda d: with_aperio_mpp(d / "mpp_25.svs", "25"),
        (),
        r"metadata says 25 µm/px, outside the plausible",
    ),
    (
        "corrupt_tile_in_the_thumbnail_level",
        lambda d: corrupt_stored_tile(good_svs(d / "thumb.svs", seed=6), 0, 0, page=2),
        (),
        r"thumb.svs: cannot read a thumbnail \(",
    ),
]


@pytest.mark.parametrize(("name", "make", "extra", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_slide_fails_alone_with_a_clear_message(good, tmp_path, name, make, extra, message):
    bad = make(tmp_path)
    status = run_batch_with(good, tmp_path / "out", "tile", bad, *extra)
    assert status == 1
    reasons = errors(tmp_path / "out")
    assert len(reasons) == 1, reasons
    (reason,) = reasons.values()
    assert " | " not in reason, f"a traceback reached errors.csv: {reason}"
    assert re.match(r"(Slide|CorruptTile)Error: ", reason), reason
    assert re.search(message, reason), reason


def test_implausible_vendor_mpp_is_replaced_by_an_override(good, tmp_path):
    bad = with_aperio_mpp(tmp_path / "mpp_1000.svs", "1000")
    table = tmp_path / "mpp.csv"
    table.write_text("slide,mpp\nmpp_1000.svs,0.5\n")
    with pytest.warns(UserWarning, match="says 1000 µm/px.*the override 0.5 is used"):
        status = run_batch_with(good, tmp_path / "out", "tile", bad, "--mpp-override", str(table))
    assert status == 0
    sidecar = json.loads((tmp_path / "out" / "mpp_1000" / "tiles.json").read_text())
    assert (sidecar["slide_mpp"], sidecar["mpp_source"]) == (0.5, "override")


def test_implausible_override_is_refused_up_front(good, tmp_path, capsys):
    table = tmp_path / "mpp.csv"
    table.write_text("slide,mpp\nearlier.svs,1000\n")
    out = tmp_path / "out"
    status = main(["tile", str(good["earlier"]), "--out", str(out), "--mpp-override", str(table)])
    assert status == 2
    assert "mpp.csv:2: mpp 1000 lies outside the plausible 0.05-20 µm/px" in capsys.readouterr().err
    assert not (tmp_path / "out" / "earlier").exists()


def full_grid(slide_path: Path) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    """Every tissue tile of the grid ``tile`` and ``infer`` cut, and those meeting the
    corrupted stored tile (the thumbnail level is intact, so the grid is the usual one)."""
    with open_slide(slide_path) as slide:
        grid = make_grid(slide, GridSpec(mpp=0.5, tile_px=224))
    every = {(int(x), int(y)) for x, y in grid.xy_l0}
    return every, corrupt_tile_xy(grid.xy_l0, grid.plan.tile_l0)


def read_xy(table: Path) -> set[tuple[int, int]]:
    with table.open(newline="") as f:
        return {(int(r["x"]), int(r["y"])) for r in csv.DictReader(f)}


def test_corrupt_tile_skipped_on_export_is_listed(good, tmp_path, capsys):
    bad = corrupt_svs(tmp_path / "corrupt.svs")
    out = tmp_path / "out"
    flags = ("--export-tiles", "--on-corrupt-tile", "skip")
    assert run_batch_with(good, out, "tile", bad, *flags) == 0
    assert "corrupt tiles skipped: 4 in 1 slide(s) (corrupt 4)" in capsys.readouterr().out
    every, hit = full_grid(bad)
    assert hit == {(224, 224), (448, 224), (224, 448), (448, 448)}
    sidecar = json.loads((out / "corrupt" / "tiles.json").read_text())
    assert {tuple(xy) for xy in sidecar["corrupt_tiles"]["xy_l0"]} == hit
    assert sidecar["corrupt_tiles"]["count"] == 4 and sidecar["n_tiles"] == len(every) - 4
    assert read_xy(out / "corrupt" / "tiles.csv") == every - hit
    pngs = {p.name for p in (out / "corrupt" / "tiles").iterdir()}
    assert pngs == {f"corrupt_x{x}_y{y}.png" for x, y in every - hit}


def _plan() -> ReadPlan:
    return ReadPlan(mpp=0.5, tile_px=224, level=0, downsample=1.0, read_px=224, tile_l0=224.0)


@pytest.mark.slow
def test_infer_fails_a_slide_with_a_corrupt_tile_naming_it(good, tmp_path):
    bad = corrupt_svs(tmp_path / "corrupt.svs")
    assert run_batch_with(good, tmp_path / "out", "infer", bad) == 1
    reason = errors(tmp_path / "out")["corrupt"]
    # the first tile in raster order that meets the corrupted stored tile
    assert "corrupt.svs: corrupt tile at level 0, level-0 x=224 y=224" in reason
    assert " | " not in reason
    assert not (tmp_path / "out" / "corrupt" / "summary.json").exists()


@pytest.mark.slow
def test_infer_skips_corrupt_tiles_and_completes_the_slide(good, tmp_path, capsys):
    bad = corrupt_svs(tmp_path / "corrupt.svs")
    out = tmp_path / "out"
    assert run_batch_with(good, out, "infer", bad, "--on-corrupt-tile", "skip") == 0
    assert "corrupt tiles skipped: 4 in 1 slide(s) (corrupt 4)" in capsys.readouterr().out
    summary = json.loads((out / "corrupt" / "summary.json").read_text())
    every, hit = full_grid(bad)
    assert {tuple(xy) for xy in summary["corrupt_tiles"]["xy_l0"]} == hit and len(hit) == 4
    assert read_xy(out / "corrupt" / "tiles.csv") == every - hit
    assert summary["corrupt_tiles"]["count"] == 4 and summary["n_tiles"] == len(every) - 4
    earlier = json.loads((out / "earlier" / "summary.json").read_text())
    assert earlier["corrupt_tiles"] == {"count": 0, "xy_l0": []}


# --- the reader itself ---------------------------------------------------------------------


def test_corrupt_tile_on_the_openslide_path_names_it_and_later_reads_work(tmp_path):
    bad = corrupt_svs(tmp_path / "corrupt.svs")
    good_xy = (600, 600)
    with open_slide(bad, fast=False) as slide:
        assert not slide.uses_fast_path
        before = slide.read_tile(good_xy, _plan())
        with pytest.raises(CorruptTileError, match=r"level 0, level-0 x=300 y=260") as caught:
            slide.read_tile((300, 260), _plan())
        assert (caught.value.level, caught.value.xy_l0) == (0, (300, 260))
        # OpenSlide's errors are sticky; the slide reopens its handle, so reading goes on.
        assert np.array_equal(slide.read_tile(good_xy, _plan()), before)
    with open_slide(bad) as fast:
        assert fast.uses_fast_path
        assert np.array_equal(fast.read_tile(good_xy, _plan()), before)
        with pytest.raises(CorruptTileError, match="stored tile column 1, row 1"):
            fast.read_tile((300, 260), _plan())


def test_reads_over_the_memory_budget_are_refused_before_allocating(good):
    with open_slide(good["earlier"], memory_budget=1_000_000) as slide:
        with pytest.raises(SlideError, match=r"a 1000 x 1000 px region would need .* budget"):
            slide.read_region((0, 0), 0, (1000, 1000))
        with pytest.raises(SlideError, match=r"thumbnail at 0.5 µm/px would need"):
            slide.thumbnail(0.5)
    with open_slide(good["earlier"]) as slide:
        assert slide.memory_budget == MEMORY_BUDGET_BYTES == 2 * 2**30
        with pytest.raises(SlideError, match=r"200000 x 200000 px region would need 149.0 GiB"):
            slide.read_region((0, 0), 0, (200_000, 200_000))


def test_thumbnail_strips_shrink_to_the_budget_with_the_same_pixels(tmp_path):
    rgb = texture_tile_fn(7)(0, 0, 0, 1024, 896)
    single = write_pyramid(tmp_path / "single.tif", rgb, levels=1)  # read in strips
    with open_slide(single) as slide:
        reference = slide.thumbnail(8.0)  # 16 level rows a thumbnail row; one strip
    assert reference.shape == (56, 64, 3)
    row_bytes = 7 * 1024  # an RGBA level row read plus its RGB copy
    with open_slide(single, memory_budget=row_bytes * 16 + 100) as slide:  # 56 strips
        assert np.array_equal(slide.thumbnail(8.0), reference)
    with open_slide(single, memory_budget=row_bytes * 15) as slide:  # not one thumbnail row
        with pytest.raises(SlideError, match=r"thumbnail strip of level 0 \(1024 px wide\) would"):
            slide.thumbnail(8.0)


def test_tiff_tags_in_the_plausible_range_count_and_outside_do_not(tmp_path):
    rgb = texture_tile_fn(8)(0, 0, 0, 600, 500)
    plain = tmp_path / "plain.tif"  # untiled: OpenSlide refuses it, tifffile reads the tags
    per_cm = 10_000 / 15.0
    tifffile.imwrite(plain, rgb, resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
    with open_slide(plain) as slide:  # 10-20 µm/px was ignored before one range ruled all
        assert (round(slide.info.mpp, 6), slide.info.mpp_source) == (15.0, MPP_FROM_TIFF)
    for name, mpp in (("editor.tif", 25400 / 300), ("coarse.tif", 20.5)):  # 300 dpi; 20.5
        tiled = write_pyramid(tmp_path / name, rgb, mpp=mpp, levels=1)  # OpenSlide reads tags
        with pytest.raises(SlideError, match="no µm/px in the slide metadata"):
            open_slide(tiled)
        with open_slide(tiled, mpp=0.5) as slide:  # the override fills in, with no warning
            assert slide.info.mpp_source == "override"


def test_memory_error_in_a_slide_is_a_message_and_the_batch_goes_on(tmp_path):
    jobs = [SlideJob(Path("a.svs"), "a"), SlideJob(Path("b.svs"), "b")]

    def process(job: SlideJob) -> None:
        if job.slide_id == "a":
            raise MemoryError()

    report = run_batch(jobs, process, lambda job: False)
    assert report.done == ["b"]
    ((slide_id, _, reason),) = report.failed
    assert slide_id == "a" and " | " not in reason
    assert reason.startswith("MemoryError: a.svs: ran out of memory on this slide")


def test_folder_listing_takes_a_dicom_folder_as_one_slide(tmp_path):
    from cscvision.slides.batch import collect_slides

    cohort = tmp_path / "cohort"
    (cohort / "dicom_slide").mkdir(parents=True)
    for name in ("level0.dcm", "level1.dcm", "label.DCM"):
        (cohort / "dicom_slide" / name).write_bytes(b"")
    (cohort / "loose.dcm").write_bytes(b"")
    (cohort / "a.svs").write_bytes(b"")
    (cohort / "notes").mkdir()
    assert collect_slides([cohort]) == [cohort / "a.svs", cohort / "dicom_slide"]
    assert collect_slides([cohort / "dicom_slide"]) == [cohort / "dicom_slide"]


def test_corrupt_tiles_cross_reader_processes_and_threads_alike(tmp_path):
    import pickle

    torch = pytest.importorskip("torch")
    from cscvision.inference.predict import predict_tiles
    from cscvision.models.export import load_model

    torch.set_num_threads(1)
    bad = corrupt_svs(tmp_path / "corrupt.svs")
    with open_slide(bad) as slide:
        grid = make_grid(slide, GridSpec(mpp=0.5, tile_px=224))
    hit = corrupt_tile_xy(grid.xy_l0, grid.plan.tile_l0)
    model = load_model(DEMO_MODEL, "cpu")
    kw = dict(batch_size=8, progress=False)
    with pytest.raises(CorruptTileError) as caught:  # raised in a DataLoader worker process
        predict_tiles(grid, model, workers=1, reader="processes", **kw)
    assert (caught.value.level, caught.value.xy_l0) == (0, (224, 224))  # first in raster order
    again = pickle.loads(pickle.dumps(caught.value))  # how Ray hands it to the driver
    assert (str(again), again.xy_l0) == (str(caught.value), (224, 224))
    runs = [
        predict_tiles(grid, model, workers=w, reader=r, on_corrupt_tile="skip", **kw)
        for w, r in ((0, "threads"), (2, "threads"), (1, "processes"))
    ]
    for probs in runs:
        dropped = {(int(x), int(y)) for x, y in grid.xy_l0[np.isnan(probs).any(axis=1)]}
        assert dropped == hit
        np.testing.assert_array_equal(probs, runs[0])

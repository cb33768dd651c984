"""DICOM WSI (issue 12, item 11): a slide converted from a TIFF, its JPEG bitstreams copied,
tiles and infers through OpenSlide to the same bytes as the TIFF it came from.

The DICOM is written here from a synthetic Aperio-layout SVS with ``wsidicomizer`` (the
``dicom`` extra; its JPEG handling needs the system libturbojpeg). OpenSlide (4.0 or
later) reads the DICOM folder itself; cscvision treats the folder as one slide.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from cscvision.cli import main
from cscvision.slides.batch import collect_slides
from cscvision.slides.formats import dicom_files
from cscvision.slides.slide import open_slide
from cscvision.testing import output_snapshot, texture_tile_fn, write_pyramid

DEMO_MODEL = Path(__file__).resolve().parents[1] / "models" / "demo-synthetic"
SIZE = (1100, 900)

pytestmark = pytest.mark.skipif(
    int(openslide.__library_version__.split(".")[0]) < 4,
    reason=f"OpenSlide {openslide.__library_version__} reads no DICOM (4.0 does)",
)


def tissue_rgb() -> np.ndarray:
    """H&E-like texture on a band of glass, so tissue detection has something to do."""
    rgb = texture_tile_fn(11)(0, 0, 0, *SIZE)
    rgb[:, 850:] = 243
    rgb[700:, :] = 243
    return rgb


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    """``sample.svs`` and the DICOM folder ``sample/`` written from it (same slide id)."""
    wsidicomizer = pytest.importorskip("wsidicomizer", reason='needs "cscvision[dicom]"')
    root = tmp_path_factory.mktemp("dicom")
    (root / "tiff").mkdir()
    svs = write_pyramid(root / "tiff" / "sample.svs", tissue_rgb(), aperio=True, thumbnail_px=128)
    folder = root / "dicom" / "sample"
    folder.mkdir(parents=True)
    try:
        wsidicomizer.WsiDicomizer.convert(
            svs,
            folder,
            tile_size=256,  # the stored tiles' size: frames are the TIFF tiles, not re-cut
            include_label=False,
            include_overview=False,
            include_thumbnail=False,
            workers=1,
        )
    except FileNotFoundError as e:  # opentile finds no libturbojpeg
        pytest.skip(f"wsidicomizer cannot run here: {e}")
    return {"svs": svs, "dicom": folder}


def scan_data(jpeg: bytes) -> bytes:
    """The entropy-coded scan of a JPEG stream: from its SOS marker to its EOI (a DICOM
    frame is padded to an even length after the EOI)."""
    return jpeg[jpeg.index(b"\xff\xda") : jpeg.rindex(b"\xff\xd9")]


def test_jpeg_bitstreams_are_copied_not_re_encoded(pair):
    import pydicom
    from pydicom.encaps import generate_frames

    with tifffile.TiffFile(pair["svs"]) as tif:
        levels = [p for p in tif.pages if p.is_tiled]
        stored = {}
        for page in levels:
            streams = []
            for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True):
                tif.filehandle.seek(offset)
                streams.append(scan_data(tif.filehandle.read(count)))
            stored[(page.imagewidth, page.imagelength)] = streams
    found = {}
    for file in dicom_files(pair["dicom"]):
        ds = pydicom.dcmread(file)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"  # JPEG baseline
        frames = generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames))
        found[(ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows)] = [
            scan_data(f) for f in frames
        ]
    assert found.keys() == stored.keys() and len(found) == 3
    for size, streams in stored.items():
        assert found[size] == streams, f"level {size}: the scans differ (re-encoded?)"


def test_openslide_reads_the_dicom_folder_as_the_tiff(pair):
    with open_slide(pair["svs"]) as tiff, open_slide(pair["dicom"]) as dicom:
        assert dicom.info.vendor == "dicom" and tiff.info.vendor == "aperio"
        assert dicom.info.level_dimensions == tiff.info.level_dimensions
        assert dicom.info.mpp == pytest.approx(tiff.info.mpp) == pytest.approx(0.5)
        for level in range(3):
            for xy, size in (
                ((0, 0), (256, 256)),
                ((300, 132), (224, 224)),
                ((900, 700), (300, 300)),
            ):
                a = dicom.read_region(xy, level, size)
                b = tiff.read_region(xy, level, size)
                assert np.array_equal(a, b), f"level {level} at {xy}"
        assert np.array_equal(dicom.thumbnail(8.0), tiff.thumbnail(8.0))
        for file in dicom_files(pair["dicom"]):  # any one file opens the whole slide
            with open_slide(file) as one:
                assert one.info.level_dimensions == tiff.info.level_dimensions


def test_wsidicom_reads_the_dicom_folder_as_the_tiff(pair):
    """wsidicom (the DICOM WSI library) parses the converted folder: its levels, pixel
    spacing and pixels are the TIFF's."""
    wsidicom = pytest.importorskip("wsidicom")
    with wsidicom.WsiDicom.open(pair["dicom"]) as wsi, open_slide(pair["svs"]) as tiff:
        sizes = [(lv.size.width, lv.size.height) for lv in wsi.levels]
        assert sizes == list(tiff.info.level_dimensions)
        assert wsi.mpp.width == pytest.approx(tiff.info.mpp, rel=1e-6)
        for level, (w, h) in enumerate(sizes):
            ours = tiff.read_region((0, 0), level, (w, h))
            theirs = np.asarray(wsi.read_region((0, 0), level, (w, h)).convert("RGB"))
            assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 2, f"level {level}"
        inner = np.asarray(wsi.read_region((300, 132), 0, (224, 224)).convert("RGB"))
        assert np.abs(inner.astype(int) - tiff.read_region((300, 132), 0, (224, 224))).max() <= 2


def test_a_folder_of_dicom_slides_lists_each_folder_once(pair):
    assert collect_slides([pair["dicom"].parent]) == [pair["dicom"]]
    assert collect_slides([pair["dicom"]]) == [pair["dicom"]]


def _compare_outputs(tiff_out: Path, dicom_out: Path, differ: set[str]) -> None:
    a, b = output_snapshot(tiff_out / "sample"), output_snapshot(dicom_out / "sample")
    assert a.keys() == b.keys()
    same = [name for name in a if name not in differ]
    assert same and all(a[name] == b[name] for name in same), [n for n in same if a[n] != b[n]]


def test_tile_gives_the_same_tiles_from_dicom_and_tiff(pair, tmp_path):
    outs = {}
    for kind in ("svs", "dicom"):
        outs[kind] = tmp_path / kind
        args = ["tile", str(pair[kind]), "--out", str(outs[kind]), "--export-tiles"]
        assert main(args) == 0
    _compare_outputs(outs["svs"], outs["dicom"], differ={"tiles.json"})  # slide path, size
    meta = json.loads((outs["dicom"] / "sample" / "tiles.json").read_text())
    assert meta["slide_path"] == str(pair["dicom"].resolve()) and meta["n_tiles"] > 8


@pytest.mark.slow
def test_infer_gives_the_same_results_from_dicom_and_tiff(pair, tmp_path):
    outs = {}
    for kind in ("svs", "dicom"):
        outs[kind] = tmp_path / kind
        args = ["infer", str(pair[kind]), "--out", str(outs[kind]), "--model", str(DEMO_MODEL)]
        assert main([*args, "--workers", "0", "--threads", "1"]) == 0
    _compare_outputs(outs["svs"], outs["dicom"], differ={"summary.json"})
    a, b = (json.loads((outs[k] / "sample" / "summary.json").read_text()) for k in outs)
    for key in ("slide_path", "seconds", "predict_seconds"):
        a.pop(key), b.pop(key)
    assert a == b

"""mIF readers: OME-TIFF (tifffile's OME writer), qptiff-shaped files, one TIFF per channel;
the panel's channels against the image's; QuPath's measurement export."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest
import tifffile

from cscvision.cells.mif import read_qupath_measurements
from cscvision.cells.mif_panel import PanelError, channel_indices, parse_panel
from cscvision.cells.mif_read import MifReadError, open_mif, qpi_name
from cscvision.synth.mif import write_ome_pyramid, write_qptiff

NAMES = ["DAPI", "Opal 520", "Opal 570", "Opal 690"]


@pytest.fixture(scope="module")
def planes() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 4000, (4, 700, 1100)).astype(np.uint16)


def test_ome_tiff_channels_mpp_and_levels_agree_with_tifffile(tmp_path, planes):
    path = write_ome_pyramid(tmp_path / "a.ome.tiff", planes, NAMES, 0.325, min_side=300)
    image = open_mif(path)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and not tif.is_qpi
        root = ET.fromstring(tif.ome_metadata)
        ns = {"o": root.tag[1:].split("}")[0]}
        pixels = root.find("o:Image/o:Pixels", ns)
        assert [c.get("Name") for c in pixels.findall("o:Channel", ns)] == list(image.channels)
        assert float(pixels.get("PhysicalSizeX")) == image.mpp
        assert len(tif.series[0].levels) == len(image.level_dimensions) == 3
    assert image.kind == "ome" and image.channels == tuple(NAMES)
    assert image.dimensions == (1100, 700) and image.level_dimensions[1] == (550, 350)
    assert (image.plane("Opal 570") == planes[2]).all()
    assert image.plane(3, level=1).shape == (350, 550)
    assert image.level_mpp(1) == pytest.approx(0.65)


def test_qptiff_shaped_file_is_qpi_to_tifffile_and_named_by_its_xml(tmp_path, planes):
    path = write_qptiff(tmp_path / "a.qptiff", planes, NAMES, 0.4977, min_side=300)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_qpi and not tif.is_ome
        series = tif.series[0]
        assert series.kind == "qpi" and series.shape == (4, 700, 1100)
        names = [qpi_name(p.description) for p in series.pages]
        assert tif.series[1].name == "Thumbnail"
    image = open_mif(path)
    assert image.kind == "qptiff" and image.channels == tuple(NAMES) == tuple(names)
    assert image.mpp == pytest.approx(0.4977)
    assert (image.plane("Opal 690") == planes[3]).all()
    assert image.plane("DAPI", level=1).shape == (350, 550)


def test_one_tiff_per_channel(tmp_path, planes):
    res = {"resolution": (1e4 / 0.5, 1e4 / 0.5), "resolutionunit": "CENTIMETER"}
    for name, plane in zip(["DAPI", "CD8"], planes[:2], strict=True):
        tifffile.imwrite(tmp_path / f"{name}.tif", plane, **res)
    image = open_mif(tmp_path)
    assert image.kind == "channels" and set(image.channels) == {"DAPI", "CD8"}
    assert (image.plane("CD8") == planes[1]).all() and image.mpp == pytest.approx(0.5)
    tifffile.imwrite(tmp_path / "CD4.tif", planes[2, :100], **res)
    with pytest.raises(MifReadError, match="differ in size"):
        open_mif(tmp_path)


def test_no_mpp_and_not_mif_are_clear_errors(tmp_path, planes):
    tifffile.imwrite(tmp_path / "plain.tif", planes[0])
    with pytest.raises(MifReadError, match=r"neither an OME-TIFF nor a \.qptiff"):
        open_mif(tmp_path / "plain.tif")
    with pytest.raises(MifReadError, match="no such mIF image"):
        open_mif(tmp_path / "missing.ome.tiff")


PANEL = {
    "markers": [
        {"channel": "DAPI", "marker": "DAPI", "compartment": "nucleus"},
        {"channel": "Opal 520", "marker": "FOXP3", "compartment": "nucleus"},
        {"channel": "Opal 570", "marker": "CD4", "compartment": "membrane"},
    ],
    "phenotypes": [{"type": "treg", "all": ["CD4", "FOXP3"]}],
}


def test_panel_channels_against_the_image():
    panel = parse_panel(PANEL, "panel.yaml")
    assert channel_indices(panel, ("dapi ", "X", "OPAL 570", "Opal 520"), "img") == {
        "DAPI": 0, "FOXP3": 3, "CD4": 2,
    }  # fmt: skip
    with pytest.raises(
        PanelError, match=r"img.ome.tiff: no channel 'Opal 570'.*markers\[2\] \(CD4\)"
    ):
        channel_indices(panel, ("DAPI", "Opal 520"), "img.ome.tiff")
    with pytest.raises(PanelError, match=r"'Opal 520' \(panel.yaml: markers\[1\].*2 times"):
        channel_indices(panel, ("DAPI", "Opal 520", "Opal 570", "Opal 520"), "img")


def test_qupath_measurement_export(tmp_path, planes):
    image = open_mif(write_ome_pyramid(tmp_path / "a.ome.tiff", planes[:3], NAMES[:3], 0.5))
    panel = parse_panel(PANEL, "panel.yaml")
    header = ["Image", "Name", "Class", "Parent", "ROI", "Centroid X µm", "Centroid Y µm",
              "Nucleus: DAPI mean", "Nucleus: Opal 520 mean", "Cell: Opal 570 mean"]  # fmt: skip
    rows = [["a", "", "", "Annotation", "Polygon", "10.5", "20", "900", "1500", "40"],
            ["a", "", "", "Annotation", "Polygon", "100", "5.25", "800", "30", "2000"]]  # fmt: skip
    path = tmp_path / "measurements.tsv"
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")
    cells = read_qupath_measurements(path, image, panel)
    assert cells.x.tolist() == [21.0, 200.0] and cells.y.tolist() == [40.0, 10.5]
    assert cells.intensity["FOXP3"].tolist() == [1500.0, 30.0]
    assert cells.intensity["CD4"].tolist() == [40.0, 2000.0]  # Membrane: falls back to Cell:
    path.write_text("\n".join("\t".join(r[:-1]) for r in [header, *rows]), encoding="utf-8")
    with pytest.raises(PanelError, match=r"Membrane: Opal 570 mean.*markers\[2\] \(CD4\)"):
        read_qupath_measurements(path, image, panel)

"""The mIF road end to end on one small synthetic section, against its truth: cells,
phenotypes, the registration against the true transform, the tile labels, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.spatial import cKDTree

from cscvision.cells.mif import mif_cell_table
from cscvision.cells.mif_panel import read_panel
from cscvision.cells.mif_read import open_mif
from cscvision.cells.table import read_cell_table
from cscvision.cli import main
from cscvision.slides.slide import open_slide
from cscvision.synth.mif import MifTransform
from cscvision.synth.writer import write_cohort

SLIDE = "SYN-P001-S01"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("mif")
    write_cohort(out, n_slides=1, n_patients=1, size_px=1536, seed=5, mif=True,
                 infiltration="phenotype")  # fmt: skip
    return out


@pytest.fixture(scope="module")
def result(cohort):
    image = open_mif(cohort / f"{SLIDE}_mif.ome.tiff")
    with open_slide(cohort / f"{SLIDE}.tiff") as he:
        return mif_cell_table(image, read_panel(cohort / "mif_panel.yaml"), he_slide=he,
                              slide_id=SLIDE)  # fmt: skip


def test_synthetic_mif_is_an_ome_pyramid_with_its_truth(cohort):
    image = open_mif(cohort / f"{SLIDE}_mif.ome.tiff")
    assert image.kind == "ome" and len(image.channels) == 8 and image.channels[0] == "DAPI"
    assert len(image.level_dimensions) >= 2 and image.mpp == pytest.approx(0.5)
    truth = read_cell_table(cohort / f"{SLIDE}_mif_truth.cells.parquet")
    he_cells = read_cell_table(cohort / f"{SLIDE}.cells.parquet")
    assert np.allclose(truth.x, he_cells.x) and len(truth) > 500  # the same cells
    treg = truth.cell_type == "treg"
    assert treg.any() and truth.markers["FOXP3_pos"][treg].all()
    assert not truth.markers["FOXP3_pos"][~treg].any()
    assert (cohort / "mif_manifest.csv").read_text().splitlines()[0].endswith("mif_path")


def test_synthetic_ome_xml_is_read_by_tifffile_and_ome_types(cohort):
    """The OME-XML synth writes, parsed by tifffile and by ome-types (the OME data model):
    channel names as the panel file names them, physical pixel size in µm, a CYX pyramid."""
    import tifffile
    import yaml

    ome_types = pytest.importorskip("ome_types")
    record = json.loads((cohort / f"{SLIDE}_mif_truth.json").read_text())
    with tifffile.TiffFile(cohort / f"{SLIDE}_mif.ome.tiff") as tif:
        assert tif.is_ome and not tif.is_qpi
        series = tif.series[0]
        assert series.axes == "CYX" and series.shape == (8, record["height_px"],
                                                         record["width_px"])  # fmt: skip
        assert len(series.levels) >= 2
        assert series.levels[1].shape[1:] == tuple(-(-n // 2) for n in series.shape[1:])
        ome = ome_types.from_xml(tif.ome_metadata)
        dapi = series.levels[0].asarray()[0]
    pixels = ome.images[0].pixels
    names = [c.name for c in pixels.channels]
    assert pixels.size_c == len(names) == 8
    assert names == [c["name"] for c in record["channels"]]
    assert pixels.physical_size_x == pixels.physical_size_y == pytest.approx(record["mpp"])
    assert pixels.physical_size_x_unit.value == "µm"
    panel = yaml.safe_load((cohort / "mif_panel.yaml").read_text())
    assert [m["channel"] for m in panel["markers"]] == names  # the panel names them so
    assert dapi.std() > 0


def test_phenotypes_and_registration_against_the_truth(cohort, result):
    truth = read_cell_table(cohort / f"{SLIDE}_mif_truth.cells.parquet")
    record = json.loads((cohort / f"{SLIDE}_mif_truth.json").read_text())
    true_map = MifTransform(np.asarray(record["transform"]["matrix"]))
    # registration: tool's H&E px of true mIF cell positions vs the true ones, on tissue
    from cscvision.cells.mif_register import mif_to_he_l0

    mx, my = true_map.inverse(truth.x, truth.y)
    est = mif_to_he_l0(result.registration, np.column_stack([mx, my]))
    err_um = np.hypot(est[:, 0] - truth.x, est[:, 1] - truth.y) * 0.5
    assert np.median(err_um) < 3.0 and np.percentile(err_um, 90) < 5.0
    # cells: found ones sit on true ones, most true ones are found
    dist, idx = cKDTree(np.column_stack([truth.x, truth.y])).query(
        np.column_stack([result.table.x, result.table.y]))  # fmt: skip
    hit = dist < 6  # px = 3 µm
    assert hit.mean() > 0.95 and len(np.unique(idx[hit])) / len(truth) > 0.75
    called, true = result.table.cell_type[hit], truth.cell_type[idx[hit]]
    for kind in ("tumour", "csc_like", "treg"):
        a, b = called == kind, true == kind
        bacc = ((a & b).sum() / b.sum() + (~a & ~b).sum() / (~b).sum()) / 2
        assert bacc > 0.9, (kind, bacc)


def test_labels_mif_cli_writes_labels_train_reads(cohort, tmp_path):
    out = tmp_path / "labels"
    argv = ["labels", "mif", str(cohort / "mif_manifest.csv"), "--panel",
            str(cohort / "mif_panel.yaml"), "--out", str(out), "--feature", "density_treg",
            "--feature", "share_CD44_pos"]  # fmt: skip
    assert main(argv) == 0
    from cscvision.labels.table import read_label_table

    labels = read_label_table(out / f"{SLIDE}.labels.csv")
    assert labels.targets == ("density_treg", "share_CD44_pos") and len(labels.xy_l0) > 10
    assert np.nanmax(labels.values[:, 0]) > 0
    cells = read_cell_table(out / "cells" / f"{SLIDE}.cells.parquet")
    assert {"FOXP3_pos", "CD44_pos", "panCK"} <= set(cells.markers)
    assert (out / "cohort.csv").read_text().startswith("slide_id,patient_id,slide_path,label_path")
    record = json.loads((out / "cells" / f"{SLIDE}_mif.json").read_text())
    assert record["registration"]["ok"] and set(record["thresholds"]) >= {"FOXP3", "CD8"}


def test_labels_mif_names_the_missing_channel(cohort, tmp_path, capsys):
    panel = tmp_path / "panel.yaml"
    panel.write_text((cohort / "mif_panel.yaml").read_text().replace("Opal 540", "Opal 545"))
    out = tmp_path / "labels"
    argv = ["labels", "mif", str(cohort / "mif_manifest.csv"), "--panel", str(panel),
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "no channel 'Opal 545'" in err and "markers[2] (CD8)" in err and "_mif.ome.tiff" in err


def test_register_cli_takes_an_mif_image_with_its_panel(cohort, tmp_path):
    out = tmp_path / "reg"
    argv = ["register", str(cohort / f"{SLIDE}.tiff"), str(cohort / f"{SLIDE}_mif.ome.tiff"),
            "--out", str(out), "--panel", str(cohort / "mif_panel.yaml")]  # fmt: skip
    assert main(argv) == 0
    from cscvision.labels.registration import Registration

    reg = Registration.from_dict(json.loads((out / "registration.json").read_text()))
    record = json.loads((cohort / f"{SLIDE}_mif_truth.json").read_text())
    true_map = MifTransform(np.asarray(record["transform"]["matrix"]))
    he_xy = np.array([[400.0, 500.0], [1000.0, 900.0], [700.0, 300.0]])
    true_mif = np.column_stack(true_map.inverse(he_xy[:, 0], he_xy[:, 1]))
    err_um = np.linalg.norm(reg.map_l0(he_xy) - true_mif, axis=1) * 0.5
    assert err_um.max() < 5.0

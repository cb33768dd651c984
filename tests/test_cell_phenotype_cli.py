"""``cscvision cells`` phenotypes and ``cscvision labels cells`` on slides with known cells."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from cscvision.cells.labels import CellLabelError, canonical_feature
from cscvision.cells.table import make_table, write_cell_table
from cscvision.cli import main
from cscvision.labels.table import read_label_table
from cscvision.synth import write_cohort

SIZE = 2048  # px at 0.5 µm/px: 1,024 µm square
TILE_MM2 = (224 * 0.5 / 1000) ** 2


def lattice(x0_um, x1_um, step_um):
    xs = np.arange(x0_um + step_um / 2, x1_um, step_um)
    ys = np.arange(step_um / 2, SIZE * 0.5, step_um)
    gx, gy = np.meshgrid(xs, ys)
    return gx.ravel() / 0.5, gy.ravel() / 0.5


def made_up_table(slide_id, tumour_step, stroma_step):
    """Tumour cells on x < 400 µm, stroma cells beyond, lymphocytes at the given steps."""
    parts = [(*lattice(0, 400, 15.0), "tumour"), (*lattice(400, 1024, 25.0), "stroma")]
    if tumour_step:
        parts.append((*lattice(0, 400, tumour_step), "lymphocyte"))
    if stroma_step:
        parts.append((*lattice(400, 900, stroma_step), "lymphocyte"))
    x = np.concatenate([p[0] for p in parts]) + 0.3
    y = np.concatenate([p[1] for p in parts]) + 0.3
    kind = np.concatenate([np.full(len(p[0]), p[2], dtype=object) for p in parts])
    return make_table(x, y, kind, source="test", mpp=0.5, slide_id=slide_id)


DESIGNS = {"S-INF": (15.0, 15.0), "S-EXC": (None, 15.0), "S-DES": (60.0, 60.0)}
EXPECTED = {"S-INF": "inflamed", "S-EXC": "excluded", "S-DES": "desert"}


@pytest.fixture(scope="module")
def made_up(tmp_path_factory):
    """Three real synthetic slides, each given a hand-made cell table of a known phenotype."""
    root = tmp_path_factory.mktemp("phenotype_cli")
    cohort = write_cohort(root / "cohort", n_slides=1, n_patients=1, size_px=SIZE, seed=31)
    slide = next(cohort.parent.glob("*.tiff"))
    slides, cells = root / "slides", root / "cells"
    slides.mkdir()
    cells.mkdir()
    for sid, (t, s) in DESIGNS.items():
        shutil.copyfile(slide, slides / f"{sid}.tiff")  # a link would be the same slide
        write_cell_table(cells / f"{sid}.cells.parquet", made_up_table(sid, t, s))
    return {"root": root, "slides": slides, "cells": cells}


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_calls_each_made_up_slide(made_up):
    out = made_up["root"] / "out"
    args = ["cells", str(made_up["slides"]), "--cells", str(made_up["cells"]), "--out", str(out)]
    assert main([*args, "--min-tissue", "0.1"]) == 0
    rows = {r["slide_id"]: r for r in _rows(out / "cells_results.csv")}
    assert {k: rows[k]["phenotype"] for k in DESIGNS} == EXPECTED
    inf = json.loads((out / "S-INF" / "summary.json").read_text())["immune"]
    assert inf["source"]["name"] == "he_lymphocyte" and inf["slide"]["phenotype"] == "inflamed"
    # 15 µm lattice: 4,444 lymphocytes / mm² in the tumour (a unit slip is off by 1e6)
    assert inf["slide"]["immune_density_mm2"]["tumour"] == pytest.approx(4444, rel=0.05)
    assert float(rows["S-INF"]["immune_density_tumour"]) == pytest.approx(4444, rel=0.05)
    exc = rows["S-EXC"]
    # the cells' tumour border is as sharp as its 25 µm smoothing: a few stromal
    # lymphocytes by the border fall in it
    assert float(exc["immune_density_tumour"]) < 0.05 * 4444
    assert float(exc["til_density_mm2"]) == pytest.approx(4444, rel=0.1)
    scopes = _rows(out / "immune_phenotypes.csv")
    assert {(r["slide_id"], r["scope"]) for r in scopes} == {(k, "slide") for k in DESIGNS}


def test_annotations_replace_the_cells_tumour_and_add_regions(made_up, tmp_path):
    ann = tmp_path / "ann"
    ann.mkdir()
    w = SIZE

    def feature(name, x0, x1):
        ring = [[x0, 0], [x1, 0], [x1, w], [x0, w], [x0, 0]]
        props = {"objectType": "annotation", "classification": {"name": name}}
        return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": props}  # fmt: skip

    # the "tumour" is annotated on x 400-800 µm (where only stroma cells and, for S-EXC,
    # lymphocytes lie), and a region of interest covers the left half
    doc = {"type": "FeatureCollection",
           "features": [feature("Tumor", 800, 1600), feature("ROI", 0, 1024)]}  # fmt: skip
    (ann / "S-EXC.geojson").write_text(json.dumps(doc))
    out = tmp_path / "out"
    args = ["cells", str(made_up["slides"] / "S-EXC.tiff"), "--cells", str(made_up["cells"]),
            "--out", str(out), "--annotations", str(ann), "--min-tissue", "0.1"]  # fmt: skip
    assert main(args) == 0
    imm = json.loads((out / "S-EXC" / "summary.json").read_text())["immune"]
    assert imm["slide"]["compartments_from"] == "annotations:S-EXC.geojson"
    assert imm["slide"]["phenotype"] == "inflamed"  # lymphocytes now lie in the "tumour"
    assert imm["slide"]["areas_mm2"]["tumour"] == pytest.approx(0.4 * 1.024, rel=0.05)
    assert "region:ROI" in imm["regions"]
    scopes = {r["scope"] for r in _rows(out / "immune_phenotypes.csv")}
    assert scopes == {"slide", "region:ROI"}
    # a changed annotation file makes the slide's outputs stale: the rerun redoes it
    doc["features"][0] = feature("Tumor", 0, 800)  # now where the tumour cells are
    (ann / "S-EXC.geojson").write_text(json.dumps(doc))
    assert main(args) == 0
    imm = json.loads((out / "S-EXC" / "summary.json").read_text())["immune"]
    assert imm["slide"]["phenotype"] == "excluded"


def test_cd8_source_without_cut_offs_is_refused(made_up, tmp_path, capsys):
    code = main(["cells", str(made_up["slides"]), "--cells", str(made_up["cells"]), "--out",
                 str(tmp_path / "o"), "--immune-source", "cd8"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "cd8" in err and "tumour_min_mm2" in err and "--phenotype-config" in err
    assert not (tmp_path / "o").exists()


def test_table_without_lymphocytes_names_the_inflammatory_source(made_up, tmp_path):
    table = made_up_table("S-PAN", None, None)
    x = np.concatenate([table.x, table.x[:50] + 1])
    y = np.concatenate([table.y, table.y[:50]])
    kind = np.concatenate([table.cell_type, np.full(50, "inflammatory", dtype=object)])
    cells = tmp_path / "cells"
    cells.mkdir()
    write_cell_table(cells / "S-PAN.cells.parquet",
                     make_table(x, y, kind, source="t", mpp=0.5, slide_id="S-PAN"))  # fmt: skip
    shutil.copyfile(made_up["slides"] / "S-INF.tiff", tmp_path / "S-PAN.tiff")
    out = tmp_path / "out"
    assert main(["cells", str(tmp_path / "S-PAN.tiff"), "--cells", str(cells), "--out",
                 str(out), "--min-tissue", "0.1"]) == 0  # fmt: skip
    imm = json.loads((out / "S-PAN" / "summary.json").read_text())["immune"]
    assert "he_inflammatory" in imm["skipped"] and "slide" not in imm
    assert _rows(out / "cells_results.csv")[0]["phenotype"] == "none"


def test_labels_cells_writes_the_tile_densities_train_reads(tmp_path):
    cohort = write_cohort(tmp_path / "c", n_slides=2, n_patients=2, size_px=1536, seed=33,
                          infiltration=True)  # fmt: skip
    out = tmp_path / "labels"
    args = ["labels", "cells", str(cohort), "--feature", "lymphocyte_density", "--out", str(out)]
    assert main(args) == 0
    entries = _rows(out / "cohort.csv")
    assert len(entries) == 2 and all(e["label_path"].endswith(".labels.csv") for e in entries)
    sid = entries[0]["slide_id"]
    table = read_label_table(out / f"{sid}.labels.csv")
    assert table.targets == ("density_lymphocyte",) and table.source == "cells"
    assert table.provenance["cell_source"] == "cscvision synth"
    assert table.provenance["class_map"]["fibroblast"] == "stroma"
    assert table.provenance["units"] == "cells / mm² of tissue"
    truth = {(int(r["x"]), int(r["y"])): r for r in _rows(cohort.parent / f"{sid}_cells_truth.csv")}
    cells_out = tmp_path / "cells_out"
    assert main(["cells", str(cohort.parent / f"{sid}.tiff"), "--cells", str(cohort.parent),
                 "--out", str(cells_out), "--no-phenotype"]) == 0  # fmt: skip
    tiles = {(int(r["x"]), int(r["y"])): r for r in _rows(cells_out / sid / "tiles.csv")}
    assert len(table) == len(tiles) > 10
    for (x, y), value in zip(table.xy_l0.tolist(), table.values[:, 0], strict=True):
        t = tiles[x, y]
        # the generator's count over the tile's tissue area in mm² (not µm², not px)
        expected = int(truth[x, y]["count_lymphocyte"]) / (float(t["tissue"]) * TILE_MM2)
        assert value == pytest.approx(expected, rel=1e-4)
    assert main([*args[:-1], str(tmp_path / "hi"), "--threshold", "1000"]) == 0
    high = read_label_table(tmp_path / "hi" / f"{sid}.labels.csv")
    assert high.targets == ("density_lymphocyte_high",)
    assert np.array_equal(high.values[:, 0], (table.values[:, 0] >= 1000).astype(np.float32))


def test_feature_names():
    assert canonical_feature("lymphocyte_density") == "density_lymphocyte"
    assert canonical_feature("macrophage_share") == "share_macrophage"
    assert canonical_feature("share_CD8_pos") == "share_CD8_pos"
    from cscvision.cells.labels import feature_values

    table = made_up_table("x", None, None)
    xy = np.array([[0, 0]])
    with pytest.raises(ValueError, match="lymphocite"):
        feature_values(table, xy, np.ones(1), 224.0, 0.5, "density_lymphocite")
    with pytest.raises(CellLabelError, match="CD8_pos"):
        feature_values(table, xy, np.ones(1), 224.0, 0.5, "share_CD8_pos")


def test_phenotype_design_of_synth():
    from cscvision.synth.cells import DESIGN_RANGES, PHENOTYPE_DESIGN, draw_infiltration

    drawn = [draw_infiltration(np.random.default_rng([s, 9]), "phenotype") for s in range(60)]
    assert {d.design for d in drawn} == set(PHENOTYPE_DESIGN)
    for d in drawn:
        for value, level in zip((d.tumour, d.stroma), PHENOTYPE_DESIGN[d.design], strict=True):
            lo, hi = DESIGN_RANGES[level]
            assert lo <= value <= hi
        assert d.as_dict()["design"] == d.design
    # the "high" level clears the stroma cut-off of he_lymphocyte with room for the
    # immunosuppressive regions' aggregates; "low" stays far under both cut-offs
    from cscvision.cells.phenotype import source_rule

    rule, per_keep = source_rule("he_lymphocyte"), 1e6 / 9.5**2  # candidates / mm²
    assert DESIGN_RANGES["high"][0] * per_keep > rule.stroma_min_mm2
    assert DESIGN_RANGES["low"][1] * per_keep < 0.1 * rule.tumour_min_mm2
    with pytest.raises(ValueError, match="uniform, phenotype"):
        draw_infiltration(np.random.default_rng(0), "inflamed")


def test_infer_maps_give_the_tumour_and_the_stemness_rich_phenotype(demo_batch, tmp_path):
    """The demo model's maps: its stemness map stands in for a tumour map here (the demo
    model has no tumour target), and is also the stemness-rich region phenotyped alone."""
    out = tmp_path / "out"
    code = main(["cells", *demo_batch["slides"], "--cells", str(demo_batch["cohort"].parent),
                 "--out", str(out), "--infer", str(demo_batch["out"]),
                 "--tumour-target", "stemness"])  # fmt: skip
    assert code == 0
    sid = json.loads(next(out.glob("*/summary.json")).read_text())["slide_id"]
    imm = json.loads((out / sid / "summary.json").read_text())["immune"]
    assert imm["slide"]["compartments_from"] == "infer:stemness"
    tiles = _rows(demo_batch["out"] / sid / "tiles.csv")
    high = sum(float(t["prob_stemness"]) >= 0.5 for t in tiles) * TILE_MM2  # no overlap
    assert high > 0
    assert imm["slide"]["areas_mm2"]["tumour"] == pytest.approx(high, rel=0.3, abs=0.02)
    stem = imm["regions"]["stemness_rich"]
    assert stem["areas_mm2"]["tumour"] == pytest.approx(imm["slide"]["areas_mm2"]["tumour"])
    rows = {(r["slide_id"], r["scope"]) for r in _rows(out / "immune_phenotypes.csv")}
    assert (sid, "stemness_rich") in rows
    res = {r["slide_id"]: r for r in _rows(out / "cells_results.csv")}
    assert res[sid]["phenotype_stemness_rich"] == stem["phenotype"]

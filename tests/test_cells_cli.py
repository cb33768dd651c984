"""``cscvision cells`` end to end on synthetic slides whose cell counts are known."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
import tifffile

from cscvision.cells.table import read_cell_table, write_cell_table
from cscvision.cli import main
from cscvision.synth import write_cohort

TILE_MM2 = (224 * 0.5 / 1000) ** 2  # 224 px at 0.5 µm/px


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cells_cli")
    cohort = write_cohort(root / "cohort", n_slides=2, n_patients=2, size_px=1536, seed=21,
                          infiltration=True)  # fmt: skip
    out = root / "out"
    code = main(["cells", str(cohort.parent), "--cells", str(cohort.parent), "--out", str(out)])
    assert code == 0
    return {"root": root, "cohort": cohort.parent, "out": out}


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_counts_match_the_generators_truth_tile_by_tile(run):
    for truth_path in sorted(run["cohort"].glob("*_cells_truth.csv")):
        slide_id = truth_path.name[: -len("_cells_truth.csv")]
        truth = {(r["x"], r["y"]): r for r in _rows(truth_path)}
        tiles = _rows(run["out"] / slide_id / "tiles.csv")
        assert len(tiles) > 10
        for t in tiles:
            true = truth[(t["x"], t["y"])]
            for kind in ("lymphocyte", "macrophage", "tumour", "csc_like", "stroma"):
                assert float(t.get(f"count_{kind}") or 0) == int(true[f"count_{kind}"])
            # cells per mm² of the tile's detected tissue (not per µm², not per tile area)
            expected = int(true["count_lymphocyte"]) / (float(t["tissue"]) * TILE_MM2)
            assert float(t["density_lymphocyte"]) == pytest.approx(expected, rel=1e-4)


def test_maps_geojson_tiff_and_summary(run):
    folder = next(p for p in run["out"].iterdir() if p.is_dir())
    sid = folder.name
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["kind"] == "cscvision cells" and summary["cells"]["outside_tiles"] >= 0
    assert set(summary["outputs"]) >= {"tiles.csv", f"{sid}.geojson", "maps.npz"}
    top = summary["maps"]["lymphocyte"]["value_range"][1]
    doc = json.loads((folder / f"{sid}.geojson").read_text())
    tile = doc["features"][0]
    assert tile["properties"]["objectType"] == "tile"
    assert "density_lymphocyte" in tile["properties"]["measurements"]
    with tifffile.TiffFile(folder / f"{sid}_density_lymphocyte.tif") as tif:
        level0 = tif.pages[0].asarray()
    maps = np.load(folder / "maps.npz", allow_pickle=False)
    densest = np.nanmax(maps["density_lymphocyte"])
    # the TIFF's 255 is the colour bar's top: the densest tile reads densest / top × 255
    # (less the bilinear smoothing between tile centres, a few levels)
    assert densest < top and abs(int(level0.max()) - round(densest / top * 255)) <= 8
    assert (folder / "overlay_density_lymphocyte.png").stat().st_size > 10_000


def test_rerun_skips_and_a_slide_without_table_is_an_error(run, tmp_path):
    code = main(["cells", str(run["cohort"]), "--cells", str(run["cohort"]), "--out",
                 str(run["out"])])  # fmt: skip
    assert code == 0  # both complete: skipped
    table = next(run["cohort"].glob("*.cells.parquet"))
    out = tmp_path / "one"
    code = main(["cells", str(run["cohort"]), "--cells", str(table), "--out", str(out)])
    assert code == 1
    errors = _rows(out / "errors.csv")
    assert len(errors) == 1 and "no cell table named" in errors[0]["error"]


def test_refuses_an_infer_folder_and_a_table_of_another_scale(run, tmp_path, capsys):
    infer = tmp_path / "infer"
    infer.mkdir()
    (infer / "results.csv").write_text("slide_id\n")
    code = main(["cells", str(run["cohort"]), "--cells", str(run["cohort"]), "--out", str(infer)])
    assert code == 2 and "infer" in capsys.readouterr().err
    assert sorted(p.name for p in infer.iterdir()) == ["results.csv"]
    slide = next(run["cohort"].glob("*.tiff"))
    table = read_cell_table(run["cohort"] / f"{slide.stem}.cells.parquet")
    halved = dataclasses.replace(table, mpp=0.25, x=table.x * 2, y=table.y * 2)
    write_cell_table(tmp_path / "t" / f"{slide.stem}.cells.parquet", halved)
    out = tmp_path / "o"
    code = main(["cells", str(slide), "--cells", str(tmp_path / "t"), "--out", str(out)])
    assert code == 1
    reason = _rows(out / "errors.csv")[0]["error"]
    assert "cells at 0.25 µm/px" in reason and "rescale" in reason
    assert not (out / slide.stem / "summary.json").exists()


def test_python_api_beside_the_cli(run, tmp_path):
    import cscvision

    settings = cscvision.CellSettings(maps=("lymphocyte",), tile_px=112)
    report, jobs = cscvision.run_cells([run["cohort"]], [run["cohort"]], tmp_path / "api", settings)
    assert sorted(report.done) == sorted(j.slide_id for j in jobs) and len(jobs) == 2
    tiles = _rows(tmp_path / "api" / jobs[0].slide_id / "tiles.csv")
    # 112 px tiles at 0.5 µm/px: 56 µm, 0.003136 mm² of tile
    t = next(r for r in tiles if float(r["tissue"]) == 1.0 and float(r["count_all"]) > 0)
    assert float(t["density_all"]) == pytest.approx(float(t["count_all"]) / 0.003136, rel=1e-4)
    assert not (tmp_path / "api" / jobs[0].slide_id / "overlay_density_tumour.png").exists()


def test_read_outputs_reads_a_cells_folder(run):
    from cscvision import read_outputs

    slides = read_outputs(run["out"])
    one = next(iter(slides.values()))
    assert "density_lymphocyte" in one.maps and one.summary["kind"] == "cscvision cells"
    corner = one.tiles.iloc[0]
    col, row = one.transform.to_map(corner["x"] + 1, corner["y"] + 1)
    assert one.maps["density_lymphocyte"][int(row), int(col)] == pytest.approx(
        corner["density_lymphocyte"], rel=1e-5
    )


def test_the_viewer_shows_density_layers(run):
    """`cscvision view` on a cells folder: one layer per density map, drawn over its colour
    bar (a tile at the bar's top is fully opaque, an empty tile transparent)."""
    from cscvision.views.server import HEATMAP_ALPHA, Catalogue

    catalogue = Catalogue(run["out"])
    sid = sorted(catalogue.slides)[0]
    info = catalogue.describe(sid)
    names = [t["name"] for t in info["targets"]]
    assert "density_lymphocyte" in names and info["mpp"] == 0.5
    summary = json.loads((run["out"] / sid / "summary.json").read_text())
    top = summary["maps"]["lymphocyte"]["value_range"][1]
    maps = catalogue.maps(sid)
    raw = np.load(run["out"] / sid / "maps.npz")["density_lymphocyte"]
    assert np.allclose(maps.maps["density_lymphocyte"], raw / top, equal_nan=True)
    image = np.asarray(maps.image("density_lymphocyte", 0.5))
    row, col = np.unravel_index(np.nanargmax(raw), raw.shape)
    s = maps.scale
    alpha = image[row * s + s // 2, col * s + s // 2, 3]
    assert alpha == int(np.nanmax(raw) / top * HEATMAP_ALPHA)

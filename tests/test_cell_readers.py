"""Readers of detector exports, each on a file in the tool's own format.

histolytics: real GeoParquet files from its wheel (tests/data/histolytics, BSD-3).
QuPath, HoVer-Net, CellViT: built here to each tool's published writer (QuPath's
PathObjectTypeAdapters, 0.2-0.3 and 0.4+ layouts; HoVer-Net's ``{"mag", "nuc"}`` JSON with
``type_info.json``; CellViT's per-class MultiPolygon / MultiPoint features), none of which
has a Python reader that installs from pip, so they are read back only by ours and checked
against the values written.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import shapely

from cscvision.cells.readers import CellReadError, read_cells
from cscvision.cells.table import read_cell_table, write_cell_table
from cscvision.cells.types import CellTypeError

HISTOLYTICS = Path(__file__).parent / "data" / "histolytics"


def _square(x, y, r=4.0):
    return [[[x - r, y - r], [x + r, y - r], [x + r, y + r], [x - r, y + r], [x - r, y - r]]]


def _qupath_cell(x, y, cls, measurements):
    """A cell as QuPath ≥ 0.4 writes it: nucleusGeometry beside geometry, measurements a map."""
    return {
        "type": "Feature",
        "id": "0b1c7a4e-93f5-4a3c-9e3f-2f8c9b1d7e11",
        "geometry": {"type": "Polygon", "coordinates": _square(x + 3, y + 3, 9)},
        "nucleusGeometry": {"type": "Polygon", "coordinates": _square(x, y)},
        "properties": {
            "objectType": "cell",
            "classification": {"name": cls, "color": [200, 0, 0]},
            "isLocked": False,
            "measurements": measurements,
        },
    }


def _write_qupath(path: Path) -> None:
    cells = [
        json.dumps(_qupath_cell(100, 200, "Tumor", {"Nucleus: Area µm^2": 25.5, "DAB": 0.1})),
        # QuPath writes a missing value as a bare NaN (not JSON): the reader must take it
        json.dumps(_qupath_cell(300, 400, "Immune cells", {"Nucleus: Area µm^2": 12.0}))
        .replace("12.0", "NaN"),
        json.dumps(_qupath_cell(500, 600, "Tumor: Positive", {"DAB": 0.9})),
        # QuPath 0.2-0.3: object_type, measurements as a name/value list, no nucleus
        json.dumps({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": _square(700, 800)},
            "properties": {"object_type": "detection", "classification": {"name": "Stroma"},
                           "measurements": [{"name": "DAB", "value": 0.3}]},
        }),
        # an annotation drawn by hand is not a cell
        json.dumps({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": _square(0, 0, 50)},
            "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}},
        }),
    ]  # fmt: skip
    path.write_text('{"type": "FeatureCollection", "features": [\n' + ",\n".join(cells) + "]}\n")


def test_qupath_geojson(tmp_path):
    path = tmp_path / "S1.geojson"
    _write_qupath(path)
    t = read_cells(path, "qupath", slide_id="S1")
    assert t.cell_type.tolist() == ["tumour", "inflammatory", "tumour", "stroma"]
    # the nucleus's centroid (cell outlines are shifted by +3 px here), level-0 px
    assert t.x.tolist() == [100, 300, 500, 700] and t.y.tolist() == [200, 400, 600, 800]
    assert np.allclose(t.markers["DAB"], [0.1, np.nan, 0.9, 0.3], equal_nan=True)
    area = t.markers["Nucleus: Area µm^2"]
    assert area[0] == 25.5 and np.isnan(area[1:]).all()
    assert t.source == "QuPath" and t.class_map["immune cells"] == "inflammatory"
    # a bare array of features (QuPath's other export layout) reads the same
    doc = json.loads(path.read_text().replace("NaN", "null"))
    (tmp_path / "S2.geojson").write_text(json.dumps(doc["features"]))
    assert len(read_cells(tmp_path / "S2.geojson", "qupath")) == 4
    # and the table written from it keeps the measurements
    back = read_cell_table(write_cell_table(tmp_path / "S1.cells.parquet", t))
    assert back.markers["DAB"][2] == 0.9


def test_qupath_unknown_class_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "x.geojson"
    path.write_text(json.dumps([_qupath_cell(1, 1, "Mitosis", {})]))
    with pytest.raises(CellTypeError, match=r"x\.geojson: classes 'Mitosis'.*class map"):
        read_cells(path, "qupath")
    cells = read_cells(path, "qupath", class_map={"Mitosis": "tumour"})
    assert cells.cell_type.tolist() == ["tumour"]
    path.write_text("not json")
    with pytest.raises(CellReadError, match="not GeoJSON"):
        read_cells(path, "qupath")


def test_hovernet_json_with_type_info(tmp_path):
    nuc = {
        "1": {"bbox": [[10, 20], [18, 28]], "centroid": [24.0, 14.5], "contour":
              [[20, 10], [28, 10], [28, 18], [20, 18]], "type_prob": 0.91, "type": 1},
        "2": {"bbox": [[40, 40], [46, 46]], "centroid": [43.0, 43.0], "contour":
              [[40, 40], [46, 40], [46, 46], [40, 46]], "type_prob": 0.66, "type": 2},
        "3": {"bbox": [[0, 0], [4, 4]], "centroid": [2.0, 2.0], "contour":
              [[0, 0], [4, 0], [4, 4], [0, 4]], "type_prob": 0.5, "type": 0},
    }  # fmt: skip
    path = tmp_path / "S.json"
    path.write_text(json.dumps({"mag": 40, "nuc": nuc}))
    t = read_cells(path, "hovernet")  # PanNuke's type_info: 1 neopla, 2 inflam, 0 nolabe
    assert t.cell_type.tolist() == ["tumour", "inflammatory"]  # type 0 (no label) dropped
    assert t.x.tolist() == [24.0, 43.0] and t.y.tolist() == [14.5, 43.0]  # centroid is [x, y]
    assert np.allclose(t.prob, [0.91, 0.66]) and t.source_version == "mag 40"
    info = tmp_path / "type_info.json"  # CoNSeP's, as HoVer-Net ships it
    info.write_text(json.dumps({"0": ["nolabe", [0, 0, 0]], "1": ["other", [255, 0, 0]],
                                "2": ["inflammatory", [0, 255, 0]]}))  # fmt: skip
    t = read_cells(path, "hovernet", type_info=info, class_map="consep")
    assert t.cell_type.tolist() == ["other", "inflammatory"]


def _cellvit_feature(kind, name, coords):
    return {
        "type": "Feature",
        "id": "4f6f8f1e-0000-4000-8000-000000000001",
        "geometry": {"type": kind, "coordinates": coords},
        "properties": {"objectType": "annotation",
                       "classification": {"name": name, "color": [255, 0, 0]}},
    }  # fmt: skip


def test_cellvit_geojson_polygons_and_points(tmp_path):
    polys = [_cellvit_feature("MultiPolygon", "Neoplastic", [_square(10, 10), _square(30, 50)]),
             _cellvit_feature("MultiPolygon", "Inflammatory", [_square(100, 120, 3)])]  # fmt: skip
    (tmp_path / "cells.geojson").write_text(json.dumps(polys))
    t = read_cells(tmp_path / "cells.geojson", "cellvit")
    assert t.cell_type.tolist() == ["tumour", "tumour", "inflammatory"]
    assert np.allclose(t.x, [10, 30, 100]) and np.allclose(t.y, [10, 50, 120])
    points = [_cellvit_feature("MultiPoint", "Connective", [[5.5, 6.5], [7.0, 8.0]]),
              _cellvit_feature("MultiPoint", "Dead", [[1.0, 2.0]])]  # fmt: skip
    (tmp_path / "cell_detection.geojson").write_text(json.dumps(points))
    t = read_cells(tmp_path / "cell_detection.geojson", "cellvit")
    assert t.cell_type.tolist() == ["stroma", "stroma", "dead"]
    assert t.x.tolist() == [5.5, 7.0, 1.0] and t.y.tolist() == [6.5, 8.0, 2.0]


def test_histolytics_real_geoparquet():
    t = read_cells(HISTOLYTICS / "hgsc_nest.parquet", "histolytics", polygons=True)
    assert t.counts() == {"inflammatory": 633, "stroma": 374, "tumour": 288}
    assert 0 <= t.x.min() and t.x.max() <= 1500 and 0 <= t.y.min() and t.y.max() <= 1500
    polys = shapely.from_wkb(t.polygons)
    assert shapely.contains_xy(polys, t.x, t.y).mean() > 0.95  # centroids inside nuclei
    areas = shapely.area(polys)
    # nuclei of 5-12 µm across at ~0.5 µm/px: median area ~100-400 px²
    assert 80 < np.median(areas) < 600
    stromal = read_cells(HISTOLYTICS / "hgsc_stromal_cells.parquet", "histolytics")
    assert stromal.counts() == {"inflammatory": 31, "stroma": 387, "tumour": 5}


def test_csv_cells(tmp_path):
    path = tmp_path / "S.csv"
    path.write_text("x,y,class,prob\n10,20,lymphocyte,0.8\n30.5,40,tumour,\n")
    t = read_cells(path, "csv")
    assert t.cell_type.tolist() == ["lymphocyte", "tumour"] and t.x.tolist() == [10, 30.5]
    assert t.prob[0] == pytest.approx(0.8) and np.isnan(t.prob[1])
    path.write_text("x,class\n1,tumour\n")
    with pytest.raises(CellReadError, match=r"\['y'\] missing"):
        read_cells(path, "csv")
    path.write_text("x,y,class\n1,abc,tumour\n")
    with pytest.raises(CellReadError, match="line 2"):
        read_cells(path, "csv")


def test_geojson_is_read_as_a_stream(tmp_path):
    """Peak Python memory while reading stays a small fraction of the file."""
    path = tmp_path / "big.geojson"
    rng = np.random.default_rng(0)
    with path.open("w") as f:
        f.write('{"type": "FeatureCollection", "features": [\n')
        n = 20000
        for i in range(n):
            m = {f"Measurement {k}": float(v) for k, v in enumerate(rng.random(12))}
            f.write(json.dumps(_qupath_cell(i % 5000, i // 5, "Tumor", m)))
            f.write(",\n" if i < n - 1 else "\n")
        f.write("]}\n")
    size = path.stat().st_size
    tracemalloc.start()
    t = read_cells(path, "qupath")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(t) == 20000 and len(t.markers) == 12
    # the columns themselves: 20000 × (12 + 3) × 8 bytes ≈ 2.4 MB; the file ≈ 14 MB
    assert peak < 0.5 * size, (peak, size)


def test_files_read_the_same_with_geopandas(tmp_path):
    """geopandas (the reader histolytics itself uses; GDAL for GeoJSON) agrees with ours:
    the GeoParquet is read as histolytics reads it, and the GeoJSON files built here are
    valid GeoJSON with the same polygons."""
    gpd = pytest.importorskip("geopandas", reason="geopandas is not installed (optional check)")
    frame = gpd.read_parquet(HISTOLYTICS / "hgsc_nest.parquet")
    ours = read_cells(HISTOLYTICS / "hgsc_nest.parquet", "histolytics")
    assert len(frame) == len(ours) == 1295
    assert np.allclose(frame.geometry.centroid.x, ours.x) and np.allclose(
        frame.geometry.centroid.y, ours.y
    )
    path = tmp_path / "S.geojson"
    _write_qupath(path)
    path.write_text(path.read_text().replace("NaN", "null"))  # GDAL rejects QuPath's bare NaN
    cells = gpd.read_file(path)
    cells = cells[cells["objectType"].fillna(cells.get("object_type")) != "annotation"]
    assert len(cells) == len(read_cells(path, "qupath")) == 4
    polys = [_cellvit_feature("MultiPolygon", "Neoplastic", [_square(10, 10), _square(30, 50)])]
    (tmp_path / "cells.geojson").write_text(
        json.dumps({"type": "FeatureCollection", "features": polys})
    )
    parts = gpd.read_file(tmp_path / "cells.geojson").set_crs(None, allow_override=True)
    parts = parts.explode(index_parts=False)  # pixels, not degrees: no CRS
    ours = read_cells(tmp_path / "cells.geojson", "cellvit")
    assert np.allclose(parts.geometry.centroid.x, ours.x)

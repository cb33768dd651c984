"""Files cscvision writes for other tools, read by those tools' own rules (issue 28 item 1).

- QuPath GeoJSON, as QuPath 0.4+ reads it (``qupath-core``: ``QuPathTypeAdapters.
  PathObjectTypeAdapter.parseObject``, ``GsonTools.PathClassTypeAdapter``,
  ``ROITypeAdapters.parseGeometry``, ``MeasurementListTypeAdapter.read``, checked against
  qupath/qupath at e7662d89e, 2026-08): a FeatureCollection's ``features``; each with a
  UUID ``id`` (else QuPath makes a new one), a geometry of a GeoJSON type with 2- or
  3-number coordinates, ``properties.objectType`` among QuPath's kinds (else it warns and
  makes an annotation), a ``classification`` that is a string or an object with ``name``
  (or ``names``) AND ``color`` (an object without color raises ``JsonParseException``),
  ``measurements`` an object of name → number (0.4+; "NaN"/"Infinity" as strings) or the
  0.3 list of {name, value}; strict JSON (no bare NaN). Applied to synth's annotations and
  to ``cscvision infer``'s and ``cscvision cells``' outputs.
- Cell tables: synth's Parquet read by pyarrow, carried through ``cscvision cells`` and
  ``cscvision export anndata --cells-out`` and read back by anndata and scanpy, cell for
  cell.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import numpy as np
import pytest

from cscvision.cli import main

GEOMETRY_DEPTH = {"Point": 1, "MultiPoint": 2, "LineString": 2, "MultiLineString": 3,
                  "Polygon": 3, "MultiPolygon": 4}  # fmt: skip
OBJECT_TYPES = {"annotation", "detection", "tile", "cell", "tmaCore", "tma_core", "root",
                "PathAnnotationObject", "PathDetectionObject", "PathTileObject",
                "PathCellObject", "TMACoreObject", "PathRootObject"}  # fmt: skip


def strict_json(path: Path) -> dict:
    """json.load refusing NaN/Infinity tokens, which are not JSON."""

    def refuse(token: str):
        raise AssertionError(f"{path}: bare {token} is not JSON; QuPath writes it as a string")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def check_coordinates(coords, depth: int, where: str) -> None:
    if depth == 1:
        assert isinstance(coords, list) and len(coords) in (2, 3), where
        assert all(isinstance(c, int | float) and math.isfinite(c) for c in coords), where
        return
    assert isinstance(coords, list), where
    for c in coords:
        check_coordinates(c, depth - 1, where)


def check_geometry(geom: dict, where: str) -> None:
    kind = geom.get("type")
    if kind == "GeometryCollection":
        for g in geom["geometries"]:
            check_geometry(g, where)
        return
    assert kind in GEOMETRY_DEPTH, f"{where}: geometry type {kind!r} QuPath cannot parse"
    check_coordinates(geom["coordinates"], GEOMETRY_DEPTH[kind], where)
    if kind in ("Polygon", "MultiPolygon"):
        import shapely.geometry

        assert shapely.geometry.shape(geom).is_valid, f"{where}: invalid polygon"


def check_classification(cls, where: str) -> None:
    if cls is None or isinstance(cls, str):
        return
    assert isinstance(cls, dict), where
    assert ("name" in cls or "names" in cls) and "color" in cls, (
        f"{where}: QuPath parses a classification object only with name(s) and color: {cls}"
    )
    color = cls["color"]
    assert len(color) in (3, 4) and all(isinstance(c, int) and 0 <= c <= 255 for c in color)


def check_measurements(m, where: str) -> None:
    if isinstance(m, list):  # QuPath 0.3's form, still read
        assert all(set(e) == {"name", "value"} for e in m), where
        return
    assert isinstance(m, dict), f"{where}: measurements must be an object (0.4+) or a list"
    for name, value in m.items():
        assert isinstance(name, str), where
        if isinstance(value, str):
            assert value.lower() in ("nan", "infinity", "-infinity", "inf", "-inf"), (
                f"{where}: measurement {name}={value!r} is no number QuPath reads"
            )
        else:
            assert isinstance(value, int | float) and not isinstance(value, bool), (
                f"{where}: measurement {name}={value!r} is no number (QuPath drops it)"
            )


def check_qupath_geojson(path: Path) -> dict[str, int]:
    """Every rule above; returns the count of each objectType."""
    doc = strict_json(path)
    assert doc.get("type") == "FeatureCollection" and isinstance(doc["features"], list)
    kinds: dict[str, int] = {}
    for i, f in enumerate(doc["features"]):
        where = f"{path.name} feature {i}"
        assert f.get("type") == "Feature", where
        uuid.UUID(f["id"])  # QuPath ≥ 0.4 keeps the object's id only when it is a UUID
        check_geometry(f["geometry"], where)
        if "nucleusGeometry" in f:
            check_geometry(f["nucleusGeometry"], where)
        props = f["properties"]
        kind = props["objectType"]
        assert kind in OBJECT_TYPES, f"{where}: objectType {kind!r} unknown to QuPath"
        check_classification(props.get("classification"), where)
        if "measurements" in props:
            check_measurements(props["measurements"], where)
        if "color" in props:
            assert isinstance(props["color"], int) or len(props["color"]) == 3, where
        if "name" in props:
            assert isinstance(props["name"], str), where
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def test_synth_annotations_follow_qupath_rules(demo_batch):
    folder = demo_batch["cohort"].parent
    paths = sorted(folder.glob("SYN-*.geojson"))
    assert len(paths) == 2
    for path in paths:
        kinds = check_qupath_geojson(path)
        assert set(kinds) == {"annotation"} and kinds["annotation"] > 3


def test_infer_geojson_follows_qupath_rules(demo_batch):
    paths = sorted(demo_batch["out"].glob("*/*.geojson"))
    assert len(paths) == 2
    measured = 0
    for path in paths:
        kinds = check_qupath_geojson(path)
        assert kinds, path
        doc = json.loads(path.read_text(encoding="utf-8"))
        measured += sum("measurements" in f["properties"] for f in doc["features"])
    assert measured > 0  # the rules on measurements were exercised


def test_qupath_rules_catch_what_qupath_refuses(tmp_path):
    """The checker fails on what QuPath would not read as written."""
    good = {"type": "Feature", "id": str(uuid.uuid4()),
            "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [4, 0], [4, 4], [0, 0]]]},
            "properties": {"objectType": "annotation",
                           "classification": {"name": "Tumor", "color": [200, 0, 0]},
                           "measurements": {"area": 8.0, "score": "NaN"}}}  # fmt: skip
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [good]}))
    assert check_qupath_geojson(path) == {"annotation": 1}
    bad_cases = [
        ("classification", {"name": "Tumor"}),  # no color: JsonParseException in QuPath
        ("measurements", {"area": None}),
        ("objectType", "region"),
    ]
    for key, value in bad_cases:
        feature = json.loads(json.dumps(good))
        feature["properties"][key] = value
        path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
        with pytest.raises(AssertionError):
            check_qupath_geojson(path)
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [good]})
                    .replace('"NaN"', "NaN"))  # fmt: skip
    with pytest.raises(AssertionError, match="bare NaN"):
        check_qupath_geojson(path)


def test_cell_table_round_trips_through_anndata_and_scanpy(demo_batch, tmp_path):
    anndata = pytest.importorskip("anndata")
    sc = pytest.importorskip("scanpy")
    import pyarrow.parquet as pq

    folder = demo_batch["cohort"].parent
    slide = Path(demo_batch["slides"][0])
    sid = slide.stem
    arrow = pq.read_table(folder / f"{sid}.cells.parquet").to_pandas()
    side = json.loads((folder / f"{sid}.cells.json").read_text(encoding="utf-8"))
    assert side["n_cells"] == len(arrow) > 100
    cells = tmp_path / "cells"
    assert main(["cells", str(slide), "--cells", str(folder), "--out", str(cells),
                 "--no-phenotype"]) == 0  # fmt: skip
    assert check_qupath_geojson(cells / sid / f"{sid}.geojson")  # its output, QuPath's rules
    h5ad = tmp_path / "cells.h5ad"
    argv = ["export", "anndata", str(demo_batch["out"]), "--out", str(tmp_path / "tiles.h5ad"),
            "--cells", str(cells), "--cells-out", str(h5ad), "--no-image"]  # fmt: skip
    assert main(argv) == 0
    for adata in (anndata.read_h5ad(h5ad), sc.read_h5ad(h5ad)):
        obs = adata.obs
        assert len(obs) == len(arrow)
        order = np.argsort(obs["cell_id"].to_numpy())
        ref = arrow.sort_values("cell_id")
        assert (obs["cell_id"].to_numpy()[order] == ref["cell_id"].to_numpy()).all()
        assert np.allclose(obs["x_l0"].to_numpy()[order], ref["x"].to_numpy())
        assert np.allclose(obs["y_l0"].to_numpy()[order], ref["y"].to_numpy())
        assert (obs["cell_type"].astype(str).to_numpy()[order] == ref["cell_type"].astype(str)
                .to_numpy()).all()  # fmt: skip
        assert np.allclose(adata.obsm["spatial"][order, 0], ref["x"].to_numpy() * side["mpp"])
        counts = obs["cell_type"].astype(str).value_counts().to_dict()
        assert counts == side["type_counts"]
    sq = pytest.importorskip("squidpy")
    sq.gr.spatial_neighbors_radius(adata, radius=30.0)
    assert adata.obsp["spatial_connectivities"].shape == (len(arrow), len(arrow))

"""The tile-label table contract: write, read back, and clear errors for broken files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cscvision.labels.table import (
    LabelTable,
    LabelTableError,
    read_label_table,
    sidecar_path,
    table_path,
    write_label_table,
)


def _table(**kw) -> LabelTable:
    base = dict(
        slide_id="s1",
        xy_l0=np.array([[0, 0], [224, 0], [448, 112]], np.int64),
        targets=("csc", "immune"),
        values=np.array([[0.5, -1.25], [np.nan, 3.0], [1.0, 0.0]], np.float32),
        tile_px=224,
        mpp=0.5,
        source="st",
        weight=np.array([1.0, 0.5, 2.0], np.float32),
        valid=np.array([True, False, True]),
        provenance={"panels": {"csc": ["CD44"]}},
    )
    return LabelTable(**{**base, **kw})


def test_round_trip_keeps_values_nan_weight_valid(tmp_path):
    path = write_label_table(table_path(tmp_path, "s1"), _table())
    assert path.name == "s1.labels.csv"
    assert sidecar_path(path).name == "s1.labels.json"
    back = read_label_table(path)
    assert back.xy_l0.dtype == np.int64 and back.xy_l0.tolist() == [[0, 0], [224, 0], [448, 112]]
    np.testing.assert_array_equal(back.values, _table().values)  # NaN stays NaN
    assert back.weight.tolist() == [1.0, 0.5, 2.0] and back.valid.tolist() == [True, False, True]
    assert (back.targets, back.tile_px, back.mpp) == (("csc", "immune"), 224, 0.5)
    assert back.source == "st"
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["n_tiles"] == 3 and meta["provenance"] == {"panels": {"csc": ["CD44"]}}
    header = path.read_text().splitlines()[0]
    assert header == "x,y,csc,immune,weight,valid"


def test_optional_columns_absent(tmp_path):
    path = write_label_table(tmp_path / "s1.labels.csv", _table(weight=None, valid=None))
    back = read_label_table(path)
    assert back.weight is None and back.valid is None


def test_missing_sidecar_names_file(tmp_path):
    path = write_label_table(tmp_path / "s1.labels.csv", _table())
    sidecar_path(path).unlink()
    with pytest.raises(LabelTableError, match=r"s1\.labels\.json"):
        read_label_table(path)


def test_missing_column_and_non_numeric(tmp_path):
    path = write_label_table(tmp_path / "s1.labels.csv", _table())
    text = path.read_text()
    path.write_text(text.replace("immune", "other", 1))
    with pytest.raises(LabelTableError, match=r"column\(s\) \['immune'\] missing"):
        read_label_table(path)
    path.write_text(text.replace("-1.25", "abc"))
    with pytest.raises(LabelTableError, match="line 2: column 'immune' holds 'abc'"):
        read_label_table(path)


def test_shape_checks():
    with pytest.raises(ValueError, match="values"):
        _table(values=np.zeros((3, 1), np.float32))
    with pytest.raises(ValueError, match="distinct"):
        _table(targets=("x", "immune"))

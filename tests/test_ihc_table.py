"""Tile-label tables as IHC writes them (NaN, weight, valid), and train taking their tiles."""

from __future__ import annotations

import numpy as np
import pytest

from cscvision.labels.cohort import read_cohort
from cscvision.labels.table import (
    LabelTable,
    LabelTableError,
    read_label_table,
    sidecar_path,
    table_path,
    write_label_table,
)
from cscvision.slides.grid import GridSpec
from cscvision.testing import write_toy_cohort
from cscvision.training.tilecache import DataError, table_tiles


def _table(**kw) -> LabelTable:
    args = dict(
        slide_id="toy_00",
        xy_l0=np.array([[0, 0], [64, 0], [0, 64]]),
        targets=("stemness", "immunosuppressive", "CD44_positive"),
        values=np.array([[0.5, np.nan, 0.1], [1.0, 0.0, 2.5], [0.0, 0.25, 0.0]], np.float32),
        tile_px=32,
        mpp=2.0,
        source="ihc",
        weight=np.array([1.0, 0.5, 2.0], np.float32),
        valid=np.array([True, False, True]),
        provenance={"markers": {"CD44": "stemness"}},
    )
    args.update(kw)
    return LabelTable(**args)


def test_round_trip_keeps_everything(tmp_path):
    path = write_label_table(table_path(tmp_path, "toy_00"), _table())
    assert path.name == "toy_00.labels.csv" and sidecar_path(path).name == "toy_00.labels.json"
    back = read_label_table(path)
    want = _table()
    np.testing.assert_array_equal(back.xy_l0, want.xy_l0)
    np.testing.assert_array_equal(back.values, want.values)  # NaN stays NaN
    np.testing.assert_array_equal(back.valid, want.valid)
    np.testing.assert_array_equal(back.weight, want.weight)
    assert (back.targets, back.tile_px, back.mpp, back.source) == (want.targets, 32, 2.0, "ihc")
    assert back.provenance == want.provenance and back.n_valid == 2


def test_errors_name_the_file(tmp_path):
    path = write_label_table(tmp_path / "a.labels.csv", _table())
    text = path.read_text().replace("0.25", "lots")
    path.write_text(text)
    with pytest.raises(LabelTableError, match=r"a\.labels\.csv.*'immunosuppressive'.*'lots'"):
        read_label_table(path)
    path.write_text("x,y,stemness\n0,0,1\n")
    with pytest.raises(LabelTableError, match="missing"):
        read_label_table(path)
    sidecar_path(path).unlink()
    with pytest.raises(LabelTableError, match=r"sidecar a\.labels\.json is missing"):
        read_label_table(path)


@pytest.fixture(scope="module")
def toy_entry(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    return read_cohort(write_toy_cohort(folder, n_slides=1, n_patients=1, size_px=256))[0]


def test_train_takes_the_tables_tiles(toy_entry, tmp_path):
    path = write_label_table(tmp_path / "toy_00.labels.csv", _table())
    entry = toy_entry.__class__(**{**toy_entry.__dict__, "label_path": path})
    tiles = table_tiles(entry, split="train", spec=GridSpec(mpp=2.0, tile_px=32),
                        targets=("stemness", "CD44_positive"))  # fmt: skip
    # row 1 is invalid; row 0's NaN is in a target not asked for
    np.testing.assert_array_equal(tiles.xy_l0, [[0, 0], [0, 64]])
    np.testing.assert_allclose(tiles.targets, [[0.5, 0.1], [0.0, 0.0]], rtol=1e-6)
    assert tiles.n_excluded == 1 and tiles.plan.tile_px == 32
    both = table_tiles(entry, split="train", spec=GridSpec(mpp=2.0, tile_px=32),
                       targets=("stemness", "immunosuppressive"))  # fmt: skip
    # row 0 lacks immunosuppressive but has stemness: kept, its NaN masked in the loss
    np.testing.assert_array_equal(both.xy_l0, [[0, 0], [0, 64]])
    np.testing.assert_array_equal(both.targets, [[0.5, np.nan], [0.0, 0.25]])
    assert both.n_excluded == 1
    lacking = table_tiles(entry, split="train", spec=GridSpec(mpp=2.0, tile_px=32),
                          targets=("immunosuppressive",))  # fmt: skip
    assert len(lacking) == 1 and lacking.n_excluded == 2  # no label at all: dropped
    values = _table(valid=None).values.copy()
    values[:, 2] = 7.5  # a continuous score outside [0, 1] is accepted
    path = write_label_table(tmp_path / "b.labels.csv", _table(values=values, valid=None))
    entry = toy_entry.__class__(**{**toy_entry.__dict__, "label_path": path})
    tiles = table_tiles(entry, split="train", spec=GridSpec(mpp=2.0, tile_px=32),
                        targets=("CD44_positive",))  # fmt: skip
    assert (tiles.targets == 7.5).all()


def test_train_checks_tile_size_against_the_config(toy_entry, tmp_path):
    path = write_label_table(tmp_path / "toy_00.labels.csv", _table())
    entry = toy_entry.__class__(**{**toy_entry.__dict__, "label_path": path})
    with pytest.raises(
        DataError, match=r"toy_00\.labels\.csv: tiles of 32 px at 2\.0 µm/px.*224 px at 0\.5"
    ):
        table_tiles(
            entry, split="train", spec=GridSpec(mpp=0.5, tile_px=224), targets=("stemness",)
        )
    with pytest.raises(DataError, match="no column for target"):
        table_tiles(entry, split="train", spec=GridSpec(mpp=2.0, tile_px=32), targets=("other",))


def test_cohort_reads_label_path(tmp_path):
    csv = write_toy_cohort(tmp_path, n_slides=1, n_patients=1, size_px=256)
    write_label_table(tmp_path / "toy_00.labels.csv", _table())
    csv.write_text(
        "slide_id,patient_id,slide_path,label_path\ntoy_00,P0,toy_00.tif,toy_00.labels.csv\n"
    )
    (entry,) = read_cohort(csv)
    assert entry.label_path == (tmp_path / "toy_00.labels.csv").resolve()

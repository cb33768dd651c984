"""Cell table contract, the type hierarchy and per-tile cell features on hand-made layouts.

Known answers: a unit mistake (px for µm, µm² for mm², tile area instead of tissue area)
changes every number checked here by a factor of 4 or more.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely

from cscvision.cells import features as f
from cscvision.cells.table import (
    CellTableError,
    make_table,
    read_cell_table,
    sidecar_path,
    write_cell_table,
)
from cscvision.cells.tiles import CellFeatureSpec, tile_cell_features
from cscvision.cells.types import CellTypeError, cell_types, class_map, map_classes


def test_hierarchy_levels():
    h = cell_types()
    assert h.ancestors("cd8_t") == ("cd8_t", "t_cell", "lymphocyte", "inflammatory")
    assert h.ancestors("m2_macrophage") == ("m2_macrophage", "macrophage", "inflammatory")
    assert h.ancestors("csc_like") == ("csc_like", "tumour")
    assert set(h.below("t_cell")) == {"t_cell", "cd8_t", "treg"}
    member = h.membership(["inflammatory", "cd8_t", "tumour"], ["lymphocyte", "inflammatory"])
    # a cell a detector calls only "inflammatory" is never counted as a lymphocyte
    assert member.tolist() == [[False, True], [True, True], [False, False]]
    with pytest.raises(CellTypeError, match="'nk_cell' is not in the hierarchy"):
        h.check("nk_cell")


def test_class_maps_put_tool_classes_on_the_hierarchy():
    pannuke = class_map("pannuke")
    types, keep = map_classes(np.array(["Neoplastic", "inflammatory", "Connective", "Dead"]),
                              pannuke, "x.geojson")  # fmt: skip
    assert types.tolist() == ["tumour", "inflammatory", "stroma", "dead"] and keep.all()
    types, keep = map_classes(np.array(["macrophage_cell", "macrophage_nucleus"]),
                              class_map("histolytics"), "h.parquet")  # fmt: skip
    assert types[0] == "macrophage" and keep.tolist() == [True, False]
    with pytest.raises(CellTypeError, match=r"cells\.csv: classes 'Mitosis'.*class map"):
        map_classes(np.array(["Tumor", "Mitosis"]), class_map("qupath"), "cells.csv")


def test_table_round_trip(tmp_path):
    poly = shapely.to_wkb(shapely.box(0, 0, 4, 4))
    table = make_table(
        [10.5, 20.0, 30.0], [1.0, 2.0, 3.0], ["tumour", "cd8_t", "tumour"],
        source="test", mpp=0.25, prob=[0.9, 0.8, np.nan], slide_id="s1",
        polygons=np.array([poly, poly, poly], dtype=object),
        markers={"CD8": np.array([0.1, 5.0, 0.2]), "CD8_pos": np.array([False, True, False])},
        class_map={"Tumor": "tumour"},
    )  # fmt: skip
    path = write_cell_table(tmp_path / "s1.cells.parquet", table)
    meta = json.loads(sidecar_path(path).read_text())
    assert sidecar_path(path).name == "s1.cells.json"
    assert meta["mpp"] == 0.25 and meta["type_counts"] == {"cd8_t": 1, "tumour": 2}
    assert meta["markers"] == ["CD8", "CD8_pos"] and meta["source"] == "test"
    back = read_cell_table(path, polygons=True)
    assert back.cell_type.tolist() == ["tumour", "cd8_t", "tumour"]
    assert np.array_equal(back.x, table.x) and back.mpp == 0.25
    assert np.allclose(back.prob[:2], [0.9, 0.8]) and np.isnan(back.prob[2])
    assert back.markers["CD8_pos"].tolist() == [False, True, False]
    assert shapely.from_wkb(back.polygons[1]).area == 16
    assert read_cell_table(path).polygons is None  # polygons only when asked
    import pyarrow.parquet as pq  # the file is plain Parquet any tool reads

    assert pq.read_table(path).column("cell_type").to_pylist()[1] == "cd8_t"


def test_table_refuses_what_breaks_the_contract(tmp_path):
    with pytest.raises(CellTypeError, match="'t cell'"):
        make_table([0], [0], ["t cell"], source="x")
    table = make_table([0], [0], ["tumour"], source="x")
    with pytest.raises(CellTableError, match=r"\.parquet"):
        write_cell_table(tmp_path / "cells.csv", table)
    path = write_cell_table(tmp_path / "a.cells.parquet", table)
    sidecar_path(path).unlink()
    with pytest.raises(CellTableError, match=r"a\.cells\.json"):
        read_cell_table(path)


# -- features on a hand-made layout ------------------------------------------------------
# Slide at 0.25 µm/px; tiles 400 px = 100 µm a side = 0.01 mm².
MPP, TILE = 0.25, 400.0
TILES = np.array([[0, 0], [400, 0], [0, 400]])  # (400, 400) is glass: no tile
TISSUE = np.array([1.0, 0.5, 1.0])


def _layout():
    cells = [
        # tile 0: 5 lymphocytes (one a CD8 T cell), 3 tumour cells
        (100, 100, "lymphocyte"), (120, 100, "lymphocyte"), (100, 120, "cd8_t"),
        (300, 300, "lymphocyte"), (399.9, 399.9, "lymphocyte"),
        (100, 140, "tumour"), (200, 200, "tumour"), (60, 100, "csc_like"),
        # tile 1 (half tissue): 2 lymphocytes on its left edge (x = 400 belongs here)
        (400, 50, "lymphocyte"), (500, 50, "lymphocyte"),
        # tile 2: one macrophage
        (50, 450, "macrophage"),
        # on glass (no tile): counted nowhere
        (500, 500, "tumour"),
    ]  # fmt: skip
    x, y, t = zip(*cells, strict=True)
    return make_table(np.array(x, float), np.array(y, float), np.array(t), source="hand")


def test_cells_fall_in_the_tile_whose_half_open_square_holds_them():
    x = np.array([0, 399.9, 400, 799.9, 800, 10, 500])
    y = np.array([0, 0, 0, 0, 0, 410, 410])
    assert f.cells_in_tiles(x, y, TILES, TILE).tolist() == [0, 0, 1, 1, -1, 2, -1]


def test_counts_densities_shares_known_answer():
    out = tile_cell_features(_layout(), TILES, TISSUE, TILE, MPP).columns
    assert out["count_lymphocyte"].tolist() == [5, 2, 0]
    assert out["count_tumour"].tolist() == [3, 0, 0]  # csc_like counts as tumour
    assert out["count_csc_like"].tolist() == [1, 0, 0]
    assert out["count_t_cell"].tolist() == [1, 0, 0]
    assert out["count_inflammatory"].tolist() == [5, 2, 1]
    # cells per mm² of tissue: 5 / 0.01 mm²; 2 / (0.5 × 0.01 mm²); 1 / 0.01 mm²
    assert np.allclose(out["density_lymphocyte"], [500, 400, 0])
    assert np.allclose(out["density_macrophage"], [0, 0, 100])
    assert np.allclose(out["density_all"], [800, 400, 100])
    assert np.allclose(out["share_lymphocyte"], [5 / 8, 1, 0])
    assert np.allclose(out["share_tumour"], [3 / 8, 0, 0])


def test_nearest_neighbour_distances_in_um():
    out = tile_cell_features(_layout(), TILES, TISSUE, TILE, MPP).columns
    # lymphocytes of tile 0 to the nearest tumour cell, in px then × 0.25 µm/px:
    # (100,100)→(60,100) 40; (120,100)→(100,140) √2000; (100,120)→(100,140) 20;
    # (300,300)→(200,200) √20000; (399.9,399.9)→(500,500) √(2·100.1²)
    px = [40, np.sqrt(2000), 20, np.sqrt(20000), np.sqrt(2) * 100.1]
    assert out["nn_lymphocyte_to_tumour_um"][0] == pytest.approx(np.mean(px) * MPP)
    # tile 1: (400,50)→(200,200) 250; (500,50)→(200,200) √112500
    assert out["nn_lymphocyte_to_tumour_um"][1] == pytest.approx((250 + np.sqrt(112500)) / 2 * MPP)
    assert np.isnan(out["nn_lymphocyte_to_tumour_um"][2])  # no lymphocyte there
    # (50,450)→(200,200): √(150² + 250²), nearer than (100,140) or (60,100)
    assert out["nn_macrophage_to_tumour_um"][2] == pytest.approx(np.hypot(150, 250) * MPP)


def test_mixing_index_counts_pairs_within_the_radius():
    # radius 10 µm = 40 px. Tile 0's immune cells (5 lymphocytes):
    # immune–immune pairs within 40 px: (100,100)-(120,100) 20, (100,100)-(100,120) 20,
    # (120,100)-(100,120) 28.3 → 3 pairs, each seen from both ends (6 / 2).
    # immune–tumour within 40 px: (100,100)-(60,100) 40 (on the radius: counted),
    # (100,100)-(100,140) 40, (120,100)-(100,140) 44.7 no, (100,120)-(100,140) 20 → 3.
    spec = CellFeatureSpec(radius_um=10.0)
    out = tile_cell_features(_layout(), TILES, TISSUE, TILE, MPP, spec).columns
    mixing = out["mixing_inflammatory_tumour"]
    assert mixing[0] == pytest.approx(3 / 3)
    assert np.isnan(mixing[1])  # (400,50)-(500,50) is 100 px apart: no immune pair
    # with px mistaken for µm (radius 10 px) there would be no pair at all
    assert np.isnan(mixing[2])


def test_no_cell_is_lost_between_rounded_tile_corners():
    from cscvision.slides.grid import grid_coords

    tile = 224 * 0.5 / 0.2527  # 443.2 level-0 px: corners are rounded to whole pixels
    xy = grid_coords((5000, 5000), tile, tile)
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, xy[:, 0].max() + tile, (2, 200_000))
    index = f.cells_in_tiles(x, y, xy, tile)
    assert (index >= 0).all()
    starts = xy[index]
    assert ((x >= starts[:, 0]) & (y >= starts[:, 1])).all()

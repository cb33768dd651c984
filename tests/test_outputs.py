"""Writers of the inference outputs, on predictions assembled from known tile probabilities."""

from __future__ import annotations

import json
import shutil

import numpy as np
import openslide
import pytest
from conftest import ArraySlide, tissue_like
from PIL import Image

from cscvision.inference.predict import assemble_prediction
from cscvision.models.export import ModelCard
from cscvision.outputs.geojson import AREA_MEASUREMENT, mask_polygons
from cscvision.outputs.likelihood import level_sizes, write_likelihood_map
from cscvision.outputs.overlay import colormap
from cscvision.outputs.regions import niche_name
from cscvision.outputs.slide_folder import (
    MAPS,
    SUMMARY,
    clear_partial,
    outputs_complete,
    run_settings,
    write_slide_outputs,
)
from cscvision.outputs.summary import region_statistics
from cscvision.slides.grid import GridSpec, detect_tissue, make_grid

W, H, TILE, BOUNDS = 4096, 3072, 128, (256, 128)
TARGETS = ("stemness", "immunosuppressive")
# In grid cells (col, row), counted from the grid origin (the bounds corner):
RING_OUTER, RING_INNER = (8, 6, 16, 14), (10, 8, 14, 12)  # stemness: a square ring
IMMUNE_BOX = (14, 6, 20, 10)  # overlaps the ring's top-right corner: the niche
CARD = ModelCard(
    name="known",
    backbone="small_cnn",
    tile_px=TILE,
    mpp=0.5,
    colors={"stemness": (230, 60, 40), "immunosuppressive": (40, 120, 230)},
    thresholds={"stemness": 0.5, "immunosuppressive": 0.6},
)


def _in(cells: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    c, r = cells[:, 0], cells[:, 1]
    return (c >= box[0]) & (r >= box[1]) & (c < box[2]) & (r < box[3])


@pytest.fixture(scope="module")
def pred():
    return make_pred()


def make_pred():
    """A 4096 x 3072 slide (0.5 µm/px, bounds offset 256, 128), tissue in its middle."""
    rgb = tissue_like(W, H, box=(512, 384, 3584, 2688))
    slide = ArraySlide.make(rgb, bounds=(*BOUNDS, W - BOUNDS[0], H - BOUNDS[1]))
    thumb, mask = detect_tissue(slide, 8.0)
    grid = make_grid(slide, GridSpec(mpp=0.5, tile_px=TILE), mask=mask)
    cells = grid.cells()
    stem = _in(cells, RING_OUTER) & ~_in(cells, RING_INNER)
    probs = np.stack([np.where(stem, 0.9, 0.1), np.where(_in(cells, IMMUNE_BOX), 0.8, 0.2)], 1)
    return assemble_prediction(grid, probs, targets=TARGETS, thumb=thumb, mask=mask)


@pytest.fixture(scope="module")
def written(pred, tmp_path_factory):
    folder = tmp_path_factory.mktemp("out") / "array"
    summary = write_slide_outputs(pred, folder, CARD)
    return folder, summary


def test_geojson_follows_qupath_structure(written, pred):
    folder, _ = written
    data = json.loads((folder / "array.geojson").read_text())
    assert data["type"] == "FeatureCollection"
    kinds = {"tile": 0, "annotation": 0}
    for feature in data["features"]:
        assert feature["type"] == "Feature"
        assert feature["geometry"]["type"] in ("Polygon", "MultiPolygon")
        props = feature["properties"]
        kinds[props["objectType"]] += 1
        assert isinstance(props["measurements"], dict)
        assert all(isinstance(v, (int, float)) for v in props["measurements"].values())
        if props["objectType"] == "annotation":
            cls = props["classification"]
            assert set(cls) == {"name", "color"} and len(cls["color"]) == 3
        else:
            assert set(props["measurements"]) == set(TARGETS)
    assert kinds["tile"] == len(pred.grid) and kinds["annotation"] >= 3
    ids = [f["id"] for f in data["features"]]
    assert len(set(ids)) == len(ids) and all(len(i) == 36 for i in ids)  # one UUID each
    names = {f["properties"]["classification"]["name"] for f in data["features"]
             if "classification" in f["properties"]}  # fmt: skip
    assert all(n.isascii() for n in names) and niche_name(TARGETS) in names
    measured = {k for f in data["features"] for k in f["properties"]["measurements"]}
    assert not any(k.startswith("Area") for k in measured)  # QuPath computes "Area µm^2"


def test_region_areas_sum_to_the_summary_area(written):
    folder, summary = written
    features = json.loads((folder / "array.geojson").read_text())["features"]
    for target in (*TARGETS, niche_name(TARGETS)):
        regions = _annotations(folder, target)
        total = sum(f["properties"]["measurements"][AREA_MEASUREMENT] for f in regions)
        stats = summary["niche"] if target.startswith("Niche") else summary["targets"][target]
        assert total == pytest.approx(stats["area_mm2"], rel=0.01), target
    assert features


def _annotations(folder, name):
    features = json.loads((folder / "array.geojson").read_text())["features"]
    return [f for f in features if f["properties"].get("classification", {}).get("name") == name]


def test_region_outlines_keep_holes_and_sit_on_the_planted_cells(written):
    folder, _ = written
    (ring,) = _annotations(folder, "stemness")
    exterior, *holes = ring["geometry"]["coordinates"]
    assert len(holes) == 1
    ox, oy = 0, 0  # grid origin minus bounds: the GeoJSON frame starts at the bounds corner
    x0, y0, x1, y1 = (v * TILE for v in RING_OUTER)
    np.testing.assert_allclose([*np.min(exterior, 0), *np.max(exterior, 0)],
                               [x0 + ox, y0 + oy, x1 + ox, y1 + oy])  # fmt: skip
    hx0, hy0, hx1, hy1 = (v * TILE for v in RING_INNER)
    np.testing.assert_allclose([*np.min(holes[0], 0), *np.max(holes[0], 0)], [hx0, hy0, hx1, hy1])
    area_mm2 = ((x1 - x0) * (y1 - y0) - (hx1 - hx0) * (hy1 - hy0)) * 0.25 / 1e6
    assert ring["properties"]["measurements"][AREA_MEASUREMENT] == pytest.approx(area_mm2, rel=0.02)
    (niche,) = _annotations(folder, niche_name(TARGETS))
    corners = np.array(niche["geometry"]["coordinates"][0])
    # the ring ∩ the immune box: columns 14-15, rows 6-9
    expected = [14 * TILE, 6 * TILE, 16 * TILE, 10 * TILE]
    np.testing.assert_allclose([*corners.min(0), *corners.max(0)], expected)
    assert niche["properties"]["classification"]["color"] == [135, 90, 135]


def test_tile_features_are_offset_by_bounds(written, pred):
    folder, _ = written
    features = json.loads((folder / "array.geojson").read_text())["features"]
    tiles = [f for f in features if f["properties"]["objectType"] == "tile"]
    first = np.array(tiles[0]["geometry"]["coordinates"][0])
    np.testing.assert_array_equal(first[0], pred.grid.xy_l0[0] - BOUNDS)
    np.testing.assert_array_equal(first[2] - first[0], [TILE, TILE])
    assert tiles[0]["properties"]["measurements"]["stemness"] == pytest.approx(pred.probs[0, 0])


def test_likelihood_map_opens_in_openslide_with_the_right_size(written, pred):
    folder, _ = written
    path = folder / "array_likelihood_map_stemness.tif"
    with openslide.OpenSlide(path) as tif:
        assert tif.properties["openslide.vendor"] == "generic-tiff"
        assert tif.dimensions == (W // 16, H // 16)
        assert tif.level_count == len(level_sizes((W, H), 16)) == 1  # fits one 256 px tile
        assert float(tif.properties["openslide.mpp-x"]) == pytest.approx(0.5 * 16)
        region = np.asarray(tif.read_region((0, 0), 0, tif.dimensions))[..., 0]
    # Centre of a ring cell and of the ring's hole, in likelihood-map pixels (1/16).
    cell = TILE // 16
    ring_x, ring_y = (BOUNDS[0] + 9 * TILE) // 16 + cell // 2, (BOUNDS[1] + 7 * TILE) // 16
    hole_x, hole_y = (BOUNDS[0] + 12 * TILE) // 16, (BOUNDS[1] + 10 * TILE) // 16
    assert abs(int(region[ring_y + cell // 2, ring_x]) - 0.9 * 255) <= 1
    assert abs(int(region[hole_y, hole_x]) - 0.1 * 255) <= 1
    assert region[2, 2] == 0  # outside the scored tiles


def test_likelihood_map_pyramid_levels(pred, tmp_path):
    path = write_likelihood_map(tmp_path / "m.tif", pred.maps[1], pred.map_transform,
                                dimensions=(W, H), slide_mpp=0.5, factor=4)  # fmt: skip
    with openslide.OpenSlide(path) as tif:
        assert tif.level_dimensions == ((1024, 768), (512, 384), (256, 192))
        assert tif.level_downsamples == pytest.approx((1, 2, 4))
        assert float(tif.properties["openslide.mpp-x"]) == pytest.approx(2.0)
        top = np.asarray(tif.read_region((0, 0), 2, (256, 192)))[..., 0]
    immune_px = ((BOUNDS[1] + 8 * TILE) // 16, (BOUNDS[0] + 17 * TILE) // 16)  # row, col
    assert abs(int(top[immune_px]) - 0.8 * 255) <= 1


def test_maps_npz_holds_maps_and_transform_without_pickles(written, pred):
    folder, _ = written
    with np.load(folder / MAPS, allow_pickle=False) as data:
        assert set(TARGETS) <= set(data.files)
        np.testing.assert_array_equal(data["stemness"], pred.maps[0])
        x0, y0, px = data["transform"]
        assert (x0, y0, px) == (*BOUNDS, TILE)
        assert tuple(data["targets"]) == TARGETS
        assert data["tissue"].shape == pred.maps.shape[1:]


def test_overlay_png_shows_heat_and_threshold_outline(written):
    folder, _ = written
    image = np.asarray(Image.open(folder / "overlay_stemness.png").convert("RGB"))
    assert image.shape[1] >= 640
    outline = np.all(image == CARD.colors["stemness"], axis=-1)
    assert outline.sum() > 200  # the ring's outer and inner outlines, plus the legend

    # The slide is shown 640 px wide (6.4 level-0 px a pixel) at (16, 64) in the canvas.
    def shown(x_l0: float, y_l0: float) -> np.ndarray:
        return image[64 + int(y_l0 / 6.4), 16 + int(x_l0 / 6.4)].astype(int)

    ring = shown(BOUNDS[0] + 9.5 * TILE, BOUNDS[1] + 7.5 * TILE)  # p = 0.9: yellow-green
    hole = shown(BOUNDS[0] + 12 * TILE, BOUNDS[1] + 10 * TILE)  # p = 0.1: dark purple
    glass = shown(100, 100)  # glass: the thumbnail, no heat
    assert ring[1] > hole[1] + 60 and hole[2] > hole[1]
    assert np.all(glass > 230)
    assert not np.array_equal(ring, colormap(np.array(0.9)))  # blended, not pasted opaque
    title = image[5:35, 10:300]
    assert (title < 100).any()  # dark title text drawn


def test_summary_records_areas_model_and_resolution(written, pred):
    _, summary = written
    cell_mm2 = (TILE * 0.5 / 1000) ** 2
    ring_cells = 8 * 8 - 4 * 4
    stem = summary["targets"]["stemness"]
    assert stem["area_mm2"] == pytest.approx(ring_cells * cell_mm2, rel=0.02)
    assert summary["niche"]["area_mm2"] == pytest.approx(8 * cell_mm2, rel=0.02)
    assert summary["targets"]["immunosuppressive"]["threshold"] == 0.6
    assert summary["n_tiles"] == len(pred.grid)
    assert summary["resolution"]["mpp"] == 0.5 and summary["resolution"]["level"] == 0
    assert summary["model"]["name"] == "known"
    assert 0 < summary["niche"]["morisita_horn"]["observed"] < 1
    assert 0 < summary["niche"]["stemness_within_100um_of_immunosuppressive"] < 1
    assert summary["niche"]["null"]["permutations"] == 199
    assert summary["tissue_mm2"] == pytest.approx(3072 * 2304 * 0.25 / 1e6, rel=0.05)
    assert summary["outputs"][-1] == "array.geojson"


def test_completion_needs_the_same_model_and_settings(written, tmp_path):
    folder, summary = written
    settings = summary["settings"]
    # ArraySlide's µm/px counts as an override, so it is part of the settings
    assert settings == run_settings(overlap=0.0, min_tissue=0.5, mask_mpp=8.0, slide_mpp=0.5)
    assert outputs_complete(folder, summary["model"], settings)
    assert not outputs_complete(folder, {**summary["model"], "version": "9"}, settings)
    assert not outputs_complete(folder, summary["model"], {**settings, "overlap": 0.5})
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "overlay_stemness.png").unlink()  # an output removed by hand
    assert not outputs_complete(copy, summary["model"], settings)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / SUMMARY).write_text("{}")
    (partial / ".overlay_stemness.abc.tmp.png").write_bytes(b"half")
    (partial / "tiles.csv").write_text("x,y\n")
    clear_partial(partial)
    assert [p.name for p in partial.iterdir()] == ["tiles.csv"]


def test_outputs_are_byte_identical_when_written_again(written, pred, tmp_path):
    folder, _ = written
    write_slide_outputs(pred, tmp_path / "again", CARD)
    for path in folder.iterdir():
        if path.name != SUMMARY:
            assert (tmp_path / "again" / path.name).read_bytes() == path.read_bytes(), path.name


# --- pure pieces -------------------------------------------------------------------------


def test_mask_polygons_keep_holes_and_count_every_pixel():
    mask = np.zeros((12, 12), bool)
    mask[1:7, 1:7] = True
    mask[3:5, 3:5] = False  # a hole
    mask[9:11, 2:10] = True  # a second region
    mask[8, 11] = True  # a single pixel
    polygons, labels = mask_polygons(mask)
    assert len(polygons) == 3 and labels.max() == 3
    assert sum(p.area for p in polygons) == mask.sum()
    assert len(polygons[0].interiors) == 1 and polygons[0].area == 32


def test_region_statistics_weight_by_tissue():
    maps = np.array([[[0.9, 0.9, 0.1, np.nan]], [[0.9, 0.1, 0.9, np.nan]]], np.float32)
    tissue = np.array([[1.0, 0.5, 1.0, 1.0]], np.float32)
    stats = region_statistics(maps, tissue, targets=TARGETS, thresholds=(0.5, 0.5),
                              cell_mm2=2.0, cell_um=1.0)  # fmt: skip
    assert stats["analysed_tissue_mm2"] == pytest.approx(5.0)  # the NaN pixel is not scored
    assert stats["targets"]["stemness"]["area_mm2"] == pytest.approx(3.0)
    assert stats["targets"]["stemness"]["fraction_of_tissue"] == pytest.approx(0.6)
    assert stats["niche"]["area_mm2"] == pytest.approx(2.0)


def test_model_identity_changes_with_the_card_thresholds(tmp_path):
    """Re-tuned thresholds (or µm/px) in model.json change the outputs: no stale skip."""
    import dataclasses

    from cscvision.models.backbones import get_model
    from cscvision.models.export import export_model, load_model
    from cscvision.outputs.slide_folder import model_identity

    card = dataclasses.replace(CARD, backbone="small_cnn")
    export_model(get_model("small_cnn", 2), card, tmp_path)
    before = model_identity(load_model(tmp_path))
    card = json.loads((tmp_path / "model.json").read_text())
    card["metrics"] = {"val": {"auroc_stemness": 0.9}}  # does not change any output
    (tmp_path / "model.json").write_text(json.dumps(card))
    assert model_identity(load_model(tmp_path)) == before
    card["thresholds"]["stemness"] = 0.7
    (tmp_path / "model.json").write_text(json.dumps(card))
    assert model_identity(load_model(tmp_path)) != before


def test_colour_bar_ticks_read_as_numbers_not_exponents():
    from cscvision.outputs.overlay import tick_label

    assert [tick_label(v) for v in (0.0, 0.25, 1.0, 2500.0, 10000.0)] == [
        "0", "0.25", "1", "2,500", "10,000"
    ]  # fmt: skip

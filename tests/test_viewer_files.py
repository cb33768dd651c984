"""Files ASAP and QuPath open as their own code expects (issue 12, item 10).

ASAP: its TIFF reader accepts compression 1, 5 (LZW), 7, 32946 and 33005 only; it overlays
a likelihood map when ``W // w == H // h`` (integer division of the base sizes,
VisualizationWorkstationExtensionPlugin::loadNewForegroundImage) and auto-loads
``<slide>_likelihood_map.tif`` beside the slide. QuPath: ASCII class names, its own
``Area µm^2`` measurement left alone, stable object ids, ``TMACoreObject`` ids of 0.2 files.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from test_outputs import CARD, TARGETS, make_pred

from cscvision.core.geometry import MapTransform
from cscvision.core.io import write_json
from cscvision.labels.annotations import read_annotations
from cscvision.outputs.geojson import object_id, tile_features
from cscvision.outputs.likelihood import asap_name, write_likelihood_map
from cscvision.outputs.slide_folder import run_settings, write_slide_outputs

ASAP_COMPRESSIONS = {1, 5, 7, 32946, 33005}


def _asap_shows_overlay(base: tuple[int, int], overlay: tuple[int, int]) -> bool:
    return base[0] // overlay[0] == base[1] // overlay[1]


@pytest.mark.parametrize("size", [(4096, 3072), (4100, 3072), (4111, 3090), (20001, 15999)])
def test_likelihood_map_is_lzw_and_sized_for_asaps_integer_scale(tmp_path, size):
    prob = np.full((4, 4), 0.5, np.float32)
    transform = MapTransform(0.0, 0.0, size[0] / 4)
    path = write_likelihood_map(tmp_path / "m.tif", prob, transform, dimensions=size, slide_mpp=0.5)
    with tifffile.TiffFile(path) as tif:
        pages = list(tif.pages)
        assert {p.compression.value for p in pages} <= ASAP_COMPRESSIONS
        assert pages[0].compression.value == 5  # LZW
        w, h = pages[0].imagewidth, pages[0].imagelength
    assert (w, h) == (size[0] // 16, size[1] // 16)
    assert _asap_shows_overlay(size, (w, h)) and size[0] // w == 16
    # rounding up (the old size) breaks ASAP whenever only one side divides by 16
    ceil = (-(-size[0] // 16), -(-size[1] // 16))
    if size == (4100, 3072):
        assert not _asap_shows_overlay(size, ceil)


def test_asap_target_writes_the_name_asap_loads(pred_written_asap):
    folder, summary, pred = pred_written_asap
    name = asap_name(pred.grid.slide_path)
    assert name == "array_likelihood_map.tif" and name in summary["outputs"]
    with (
        tifffile.TiffFile(folder / name) as tif,
        tifffile.TiffFile(folder / "array_likelihood_map_immunosuppressive.tif") as ref,
    ):
        np.testing.assert_array_equal(tif.pages[0].asarray(), ref.pages[0].asarray())
    assert summary["settings"]["asap_target"] == "immunosuppressive"


@pytest.fixture(scope="module")
def pred_written_asap(pred, tmp_path_factory):
    folder = tmp_path_factory.mktemp("asap") / "array"
    settings = run_settings(overlap=0.0, min_tissue=0.5, mask_mpp=8.0, slide_mpp=0.5,
                            asap_target="immunosuppressive", permutations=9)  # fmt: skip
    summary = write_slide_outputs(pred, folder, CARD, settings=settings)
    return folder, summary, pred


@pytest.fixture(scope="module")
def pred():
    return make_pred()


def test_object_ids_are_stable_and_distinct():
    xy = np.array([[0, 0], [128, 0]])
    probs = np.array([[0.1, 0.2], [0.3, 0.4]])
    first = [f["id"] for f in tile_features(xy, probs, 128, TARGETS, (0, 0), slide_id="s1")]
    again = [f["id"] for f in tile_features(xy, probs * 0, 128, TARGETS, (0, 0), slide_id="s1")]
    other = [f["id"] for f in tile_features(xy, probs, 128, TARGETS, (0, 0), slide_id="s2")]
    assert first == again and len(set(first)) == 2 and not set(first) & set(other)
    assert object_id("s1", "tile", 0, 0) == first[0]


def test_qupath_02_tma_core_ids_are_read_as_tma_cores(tmp_path):
    square = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}
    old = [
        {"type": "Feature", "id": "TMACoreObject", "geometry": square,
         "properties": {"classification": {"name": "Core"}}},
        {"type": "Feature", "id": "PathAnnotationObject", "geometry": square,
         "properties": {"classification": {"name": "Stroma"}}},
    ]  # fmt: skip
    path = write_json(tmp_path / "old.geojson", old)
    assert [r.object_type for r in read_annotations(path, object_types=("tma_core",))] == [
        "tma_core"
    ]
    assert [r.name for r in read_annotations(path)] == ["Stroma"]


def test_geojson_regions_carry_no_qupath_measurement_names(pred_written_asap):
    folder, _, _ = pred_written_asap
    features = json.loads((folder / "array.geojson").read_text())["features"]
    for f in features:
        assert not {"Area µm^2", "Perimeter µm", "Area px^2"} & set(f["properties"]["measurements"])
        assert "∩" not in json.dumps(f)


# --- trust maps (issue 29): written as the score maps are ----------------------------------

QUPATH_OWN = {"Area µm^2", "Perimeter µm", "Area px^2", "Perimeter px", "Num Detections"}


def tiff_layout(path) -> list[tuple]:
    """What ASAP, QuPath and OpenSlide read of a map TIFF, page by page: shape, dtype,
    compression, tile size, subfile type, photometric and resolution tags."""
    with tifffile.TiffFile(path) as tif:
        return [
            (p.shape, p.dtype.str, p.compression.value, p.is_tiled, (p.tilelength, p.tilewidth),
             p.subfiletype, p.photometric.value, p.tags["XResolution"].value,
             p.tags["YResolution"].value, p.tags["ResolutionUnit"].value)
            for p in tif.pages
        ]  # fmt: skip


def assert_trust_maps_open_like_score_maps(folder, slide_id, trust, target, dimensions):
    """Every trust map TIFF has the score map's layout (LZW, uint8, floor(W/16) ×
    floor(H/16), the same tiled pyramid and resolution) and opens in OpenSlide with the same
    levels; the QuPath GeoJSON's tile measurements carry each trust value under its
    plain-ASCII name, equal to tiles.csv's."""
    import csv

    import openslide

    ref_path = folder / f"{slide_id}_likelihood_map_{target}.tif"
    ref = tiff_layout(ref_path)
    assert ref[0][0] == (dimensions[1] // 16, dimensions[0] // 16)
    assert ref[0][1] == "|u1" and ref[0][2] == 5 and ref[0][3]  # uint8, LZW, tiled
    with openslide.OpenSlide(ref_path) as o:
        ref_levels = o.level_dimensions
    for name in trust:
        path = folder / f"{slide_id}_likelihood_map_{name}.tif"
        assert tiff_layout(path) == ref, name
        with openslide.OpenSlide(path) as o:
            assert o.level_dimensions == ref_levels, name
    rows = {(int(r["x"]), int(r["y"])): r for r in csv.DictReader((folder / "tiles.csv").open())}
    features = json.loads((folder / f"{slide_id}.geojson").read_text())["features"]
    tiles = [f for f in features if f["properties"]["objectType"] == "tile"]
    assert len(tiles) == len(rows)
    for name in trust:
        assert name.isascii() and name.isidentifier() and name not in QUPATH_OWN
    for f in tiles:
        x, y = f["geometry"]["coordinates"][0][0]
        m = f["properties"]["measurements"]
        for name in trust:
            assert isinstance(m[name], float) and np.isfinite(m[name])
            assert m[name] == pytest.approx(float(rows[(x, y)][name]), abs=6e-5), name

"""Annotation readers, class maps, soft tile targets, tile-label CSVs and the DAB mask."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from shapely.geometry import MultiPolygon, Polygon, box

from cscvision.labels.annotations import (
    DEFAULT_CLASS_MAP,
    AnnotationError,
    ClassMap,
    Region,
    check_within,
    read_annotations,
    read_tile_labels,
    tile_targets,
    unmapped_classes,
)
from cscvision.labels.targets import rasterise

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"

SQUARE_WITH_HOLE = [
    [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]],
    [[25, 25], [75, 25], [75, 75], [25, 75], [25, 25]],
]


def feature(geometry: dict, classification=None, object_type="annotation", **extra) -> dict:
    props = {"objectType": object_type, **extra}
    if classification is not None:
        props["classification"] = classification
    return {"type": "Feature", "geometry": geometry, "properties": props}


def polygon(coords) -> dict:
    return {"type": "Polygon", "coordinates": coords}


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


# --- QuPath GeoJSON ------------------------------------------------------------------------


def test_geojson_feature_collection_with_holes_multipolygons_and_colours(tmp_path):
    multi = {
        "type": "MultiPolygon",
        "coordinates": [
            [[[200, 0], [210, 0], [210, 10], [200, 10], [200, 0]]],
            [[[300, 0], [320, 0], [320, 20], [300, 20], [300, 0]]],
        ],
    }
    doc = {
        "type": "FeatureCollection",
        "features": [
            feature(polygon(SQUARE_WITH_HOLE), {"name": "Stemness-rich", "color": [255, 0, 0]}),
            feature(multi, {"name": "Immunosuppressive", "colorRGB": -16776961}),  # 0xFF0000FF
            feature(polygon(SQUARE_WITH_HOLE), "Tumor", object_type="detection"),
        ],
    }
    regions = read_annotations(write_json(tmp_path / "a.geojson", doc))
    assert [r.name for r in regions] == ["Stemness-rich", "Immunosuppressive"]  # detection skipped
    hole, multi_region = regions
    assert hole.geometry.area == pytest.approx(100 * 100 - 50 * 50)
    assert hole.color == (255, 0, 0)
    assert isinstance(multi_region.geometry, MultiPolygon)
    assert multi_region.geometry.area == pytest.approx(100 + 400)
    assert multi_region.color == (0, 0, 255)
    both = read_annotations(tmp_path / "a.geojson", object_types=("annotation", "detection"))
    assert [r.object_type for r in both] == ["annotation", "annotation", "detection"]


def test_geojson_bare_list_single_feature_and_string_classification(tmp_path):
    square = polygon([[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]])
    listed = read_annotations(write_json(tmp_path / "list.json", [feature(square, "CSC")]))
    single = read_annotations(write_json(tmp_path / "one.geojson", feature(square, "CSC")))
    assert listed[0].name == single[0].name == "CSC"
    assert listed[0].color is None
    assert listed[0].geometry.equals(single[0].geometry)


def test_geojson_qupath_02_ids_give_object_types(tmp_path):
    square = polygon([[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]])
    old = [
        {"type": "Feature", "id": "PathAnnotationObject", "geometry": square,
         "properties": {"classification": {"name": "Stroma", "colorRGB": -6895466}}},
        {"type": "Feature", "id": "PathCellObject", "geometry": square, "properties": {}},
    ]  # fmt: skip
    regions = read_annotations(write_json(tmp_path / "old.geojson", old))
    assert [(r.name, r.object_type) for r in regions] == [("Stroma", "annotation")]


def test_offset_is_added_to_every_coordinate(tmp_path):
    path = write_json(tmp_path / "a.geojson", [feature(polygon(SQUARE_WITH_HOLE), "Stemness")])
    moved = read_annotations(path, offset_xy=(1000, 2000))[0].geometry
    assert moved.bounds == (1000, 2000, 1100, 2100)
    assert moved.interiors[0].bounds == (1025, 2025, 1075, 2075)


def test_slide_annotations_add_the_bounds_corner_to_qupath_files_only(tmp_path):
    """QuPath GeoJSON is relative to the slide's bounds corner, ASAP XML is level-0; a
    tile-label CSV is not a file of regions."""
    from cscvision.labels.annotations import is_tile_label_csv, read_slide_annotations

    path = write_json(tmp_path / "a.geojson", [feature(polygon(SQUARE_WITH_HOLE), "Stemness")])
    moved = read_slide_annotations(path, (300, 40))[0].geometry
    assert moved.bounds == (300, 40, 400, 140)
    xml = tmp_path / "slide.xml"
    xml.write_text(ASAP_XML)
    as_is = [r.geometry.bounds for r in read_annotations(xml)]
    assert [r.geometry.bounds for r in read_slide_annotations(xml, (300, 40))] == as_is
    assert is_tile_label_csv("t.CSV") and not is_tile_label_csv("a.geojson")


def test_bow_tie_is_repaired_and_degenerate_polygon_is_rejected(tmp_path):
    bow_tie = polygon([[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]])
    region = read_annotations(write_json(tmp_path / "bow.geojson", [feature(bow_tie, "CSC")]))[0]
    assert region.geometry.is_valid
    assert region.geometry.area == pytest.approx(50)  # two triangles of 25
    flat = polygon([[[0, 0], [10, 0], [20, 0], [0, 0]]])
    bad = [feature(bow_tie, "CSC"), {**feature(flat, "CSC"), "id": "abc-123"}]
    with pytest.raises(AnnotationError, match=r"flat\.geojson: feature 1 \(id abc-123\)"):
        read_annotations(write_json(tmp_path / "flat.geojson", bad))


def test_points_lines_skipped_unclassified_reported(tmp_path):
    square = polygon([[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]])
    point = {"type": "Point", "coordinates": [50, 50]}
    doc = [
        feature(point, "CSC"),
        feature({"type": "LineString", "coordinates": [[0, 0], [5, 5]]}, "CSC"),
        feature({"type": "GeometryCollection", "geometries": [point]}),
        feature(
            {"type": "GeometryCollection", "geometries": [square, point]},
            {"names": ["Tumor", "Positive"]},
        ),
        feature(square),
    ]
    with pytest.warns(UserWarning, match="1 region"):
        regions = read_annotations(write_json(tmp_path / "a.geojson", doc))
    assert [r.name for r in regions] == ["Tumor: Positive", ""]
    assert regions[0].geometry.equals(box(0, 0, 10, 10))


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("broken.geojson", '{"type": "FeatureCollection", "features": [', "not readable"),
        ("wrong.geojson", '{"type": "Polygon", "coordinates": []}', "FeatureCollection"),
        ("broken.xml", "<ASAP_Annotations><Annotations>", "not readable as ASAP XML"),
        ("other.xml", "<Annotations/>", "not <ASAP_Annotations>"),
        ("a.txt", "x", "unknown annotation format"),
    ],
)
def test_malformed_files_name_the_file(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(AnnotationError, match=match) as err:
        read_annotations(path)
    assert str(path) in str(err.value)


def test_malformed_coordinates_name_the_feature(tmp_path):
    doc = [feature({"type": "Polygon", "coordinates": [[["a", 0]]]}, "CSC")]
    with pytest.raises(AnnotationError, match="feature 0"):
        read_annotations(write_json(tmp_path / "a.geojson", doc))


# --- ASAP XML ------------------------------------------------------------------------------

ASAP_XML = """<?xml version="1.0"?>
<ASAP_Annotations>
  <Annotations>
    <Annotation Name="A0" Type="Polygon" PartOfGroup="Stemness" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="2" X="100" Y="100"/>
        <Coordinate Order="0" X="0" Y="0"/>
        <Coordinate Order="3" X="0" Y="100"/>
        <Coordinate Order="1" X="100" Y="0"/>
      </Coordinates>
    </Annotation>
    <Annotation Name="A1" Type="Rectangle" PartOfGroup="Pen" Color="#000000">
      <Coordinates>
        <Coordinate Order="0" X="200,5" Y="0"/>
        <Coordinate Order="1" X="300" Y="0"/>
        <Coordinate Order="2" X="300" Y="50"/>
        <Coordinate Order="3" X="200,5" Y="50"/>
      </Coordinates>
    </Annotation>
    <Annotation Name="A2" Type="PointSet" PartOfGroup="Stemness">
      <Coordinates><Coordinate Order="0" X="5" Y="5"/></Coordinates>
    </Annotation>
  </Annotations>
  <AnnotationGroups>
    <Group Name="Stemness" PartOfGroup="None" Color="#FF0000"><Attributes/></Group>
    <Group Name="Pen" PartOfGroup="None" Color="#00FF00"><Attributes/></Group>
  </AnnotationGroups>
</ASAP_Annotations>
"""


def test_asap_xml_groups_order_colours_and_pointsets(tmp_path):
    path = tmp_path / "slide.xml"
    path.write_text(ASAP_XML)
    regions = read_annotations(path)
    assert [(r.name, r.color) for r in regions] == [
        ("Stemness", (255, 0, 0)),
        ("Pen", (0, 255, 0)),
    ]
    assert regions[0].geometry.equals(box(0, 0, 100, 100))  # sorted by Order: not a bow tie
    assert regions[1].geometry.bounds == (200.5, 0, 300, 50)  # decimal comma read


# --- class map and tile targets ------------------------------------------------------------


def test_class_map_matching_is_case_insensitive_and_from_dict():
    assert DEFAULT_CLASS_MAP.target_of("stemness-RICH ") == "stemness"
    assert DEFAULT_CLASS_MAP.target_of("immunosuppressive tme") == "immunosuppressive"
    assert DEFAULT_CLASS_MAP.target_of("Stemness") == "stemness"
    assert DEFAULT_CLASS_MAP.target_of("Tumor") is None
    assert DEFAULT_CLASS_MAP.is_excluded("pen") and DEFAULT_CLASS_MAP.is_known("necrosis")
    cm = ClassMap.from_dict(
        {"targets": {"stemness": ["CD44+"], "immune": "PD-L1"}, "ignore": ["Tumor"]}
    )
    assert cm.targets == ("stemness", "immune")
    assert cm.target_of("cd44+") == "stemness" and cm.target_of("PD-L1") == "immune"
    assert ClassMap.from_dict(cm.to_dict()) == cm
    with pytest.raises(ValueError, match="unknown target"):
        ClassMap(targets=("a",), mapping={"x": "b"})
    with pytest.raises(ValueError, match="expected keys"):
        ClassMap.from_dict({"target": ["a"]})


def region(name: str, geom) -> Region:
    return Region(name, geom, None, "annotation")


def test_tile_targets_soft_fractions_holes_union_and_niche():
    # Tiles of 100 px on a 4x1 row; regions drawn so the expected fractions are exact.
    xy = np.array([[0, 0], [100, 0], [200, 0], [300, 0]])
    ring = Polygon(SQUARE_WITH_HOLE[0], [SQUARE_WITH_HOLE[1]])  # tile 0: 75 % covered
    regions = [
        region("Stemness-rich", ring),
        region("CSC", box(100, 0, 150, 100)),  # tile 1: half
        region("Stemness", box(125, 0, 150, 100)),  # overlaps: union stays half
        region("Immunosuppressive", box(100, 0, 200, 100)),  # tile 1 is a niche
        region("Artefact", box(290, 40, 310, 60)),  # touches tiles 2 and 3
        region("Tumor", box(0, 0, 400, 100)),  # ignored, no effect
    ]
    out = tile_targets(regions, DEFAULT_CLASS_MAP, xy, 100, raster_scale=1.0)
    np.testing.assert_allclose(out.targets[:, 0], [0.75, 0.5, 0, 0], atol=1e-6)
    np.testing.assert_allclose(out.targets[:, 1], [0, 1, 0, 0], atol=1e-6)
    assert out.targets.dtype == np.float32 and out.targets.shape == (4, 2)
    assert out.excluded.tolist() == [False, False, True, True]
    assert out.unmapped == []


def test_hole_filled_by_another_region_stays_filled():
    ring = Polygon(SQUARE_WITH_HOLE[0], [SQUARE_WITH_HOLE[1]])
    raster = rasterise([box(25, 25, 75, 75), ring], (100, 100), 1.0)
    assert raster.all()
    assert rasterise([ring], (100, 100), 1.0).sum() == 100 * 100 - 50 * 50


def test_tile_targets_use_tissue_area_only():
    # Mask at scale 0.1: tile 0's left half is tissue, tile 1 has none. The stemness region
    # covers 30 % of tile 0 but 60 % of its tissue; the other lies on glass only.
    mask = np.zeros((10, 20), dtype=bool)
    mask[:, 0:5] = True
    xy = np.array([[0, 0], [100, 0]])
    regions = [region("CSC", box(0, 0, 30, 100)), region("Immunosuppressive", box(50, 0, 200, 100))]
    out = tile_targets(regions, DEFAULT_CLASS_MAP, xy, 100, tissue_mask=mask, mask_scale=0.1)
    np.testing.assert_allclose(out.targets, [[0.6, 0.0], [0.0, 0.0]], atol=1e-6)
    with pytest.raises(ValueError, match="mask_scale"):
        tile_targets(regions, DEFAULT_CLASS_MAP, xy, 100, tissue_mask=mask)


def test_unmapped_classes_are_listed_and_warned():
    regions = [region("Stemness", box(0, 0, 10, 10)), region("Mystery", box(0, 0, 5, 5))]
    regions.append(region("", box(0, 0, 5, 5)))
    assert unmapped_classes(regions, DEFAULT_CLASS_MAP) == ["Mystery"]
    with pytest.warns(UserWarning, match="Mystery"):
        out = tile_targets(regions, DEFAULT_CLASS_MAP, np.array([[0, 0]]), 10)
    assert out.unmapped == ["Mystery"]
    assert out.targets[0, 0] == pytest.approx(1.0)


def test_tile_targets_for_many_tiles():
    # how fast this runs is for a benchmark, not a test (a shared machine makes any time
    # limit flaky); this checks the rasterised areas at scale
    rng = np.random.default_rng(0)
    tile_l0 = 448
    cols, rows = 250, 200  # 50k tiles over a 112k x 90k px slide
    xy = np.stack(np.meshgrid(np.arange(cols), np.arange(rows)), -1).reshape(-1, 2) * tile_l0
    centres = rng.uniform(0, [cols * tile_l0, rows * tile_l0], size=(40, 2))
    regions = [
        region(("CSC", "Immunosuppressive")[i % 2], Polygon(c + 8000 * np.array(
            [[np.cos(a), np.sin(a)] for a in np.linspace(0, 2 * np.pi, 60, endpoint=False)])))
        for i, c in enumerate(centres)
    ]  # fmt: skip
    out = tile_targets(regions, DEFAULT_CLASS_MAP, xy, tile_l0)
    assert out.targets.shape == (50_000, 2)
    covered = out.targets[:, 0].sum() * tile_l0**2
    slide = box(0, 0, cols * tile_l0, rows * tile_l0)
    exact = shapely.union_all([r.geometry for r in regions if r.name == "CSC"]).intersection(slide)
    assert covered == pytest.approx(exact.area, rel=0.01)


def test_check_within_rejects_regions_outside_the_slide(tmp_path):
    inside = region("CSC", box(10, 10, 20, 20))
    check_within([inside], (100, 100), tmp_path / "a.geojson")
    outside = region("CSC", box(500, 500, 600, 600))
    with pytest.raises(AnnotationError, match=r"a\.geojson: 1 of 2 region\(s\) lie entirely"):
        check_within([inside, outside], (100, 100), tmp_path / "a.geojson")


# --- tile-label CSV ------------------------------------------------------------------------


def test_read_tile_labels(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("x,y,immunosuppressive,stemness,extra\n0,0,0.5,1,a\n448,0,0,0.25,b\n")
    xy, values = read_tile_labels(path, ["stemness", "immunosuppressive"])
    assert xy.tolist() == [[0, 0], [448, 0]] and xy.dtype == np.int64
    np.testing.assert_allclose(values, [[1, 0.5], [0.25, 0]])
    assert values.dtype == np.float32


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("x,y,stemness\n0,0,0.5\n", r"lacks column\(s\) \['immunosuppressive'\]"),
        ("x,y,stemness,immunosuppressive\n", "no rows"),
        ("x,y,stemness,immunosuppressive\n0,0,high,0\n", "line 2: column 'stemness'"),
        ("x,y,stemness,immunosuppressive\n0,0,0,0\n0,1,1.5,0\n", r"line 3.*\[0, 1\]"),
        ("x,y,stemness,immunosuppressive\n0.5,0,0,0\n", "integer"),
        ("x,y,stemness,immunosuppressive\n0,0,nan,0\n", "NaN"),
    ],
)
def test_read_tile_labels_errors(tmp_path, text, match):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(AnnotationError, match=match):
        read_tile_labels(path, ["stemness", "immunosuppressive"])


def test_targets_on_a_real_slide_grid(tmp_path):
    path = DATA / "cmu_small_region.svs"
    if not path.exists():
        pytest.skip(f"real test data not found at {path} (shared/data is absent)")
    from cscvision.slides.grid import GridSpec, detect_tissue, make_grid
    from cscvision.slides.slide import open_slide

    with open_slide(path) as slide:
        spec = GridSpec(mpp=1.0, tile_px=112, min_tissue=0.2)
        _, mask = detect_tissue(slide, spec.mask_mpp)
        grid = make_grid(slide, spec, mask=mask)
        w, h = slide.info.dimensions
    half = w // 2
    doc = [feature(polygon([[[0, 0], [half, 0], [half, h], [0, h], [0, 0]]]), "Stemness-rich")]
    regions = read_annotations(write_json(tmp_path / "cmu.geojson", doc))
    check_within(regions, (w, h), tmp_path / "cmu.geojson")
    scale = mask.shape[1] / w
    out = tile_targets(
        regions,
        DEFAULT_CLASS_MAP,
        grid.xy_l0,
        grid.plan.tile_l0,
        tissue_mask=mask,
        mask_scale=scale,
    )
    left = grid.xy_l0[:, 0] + grid.plan.tile_l0 <= half
    right = grid.xy_l0[:, 0] >= half
    assert left.any() and right.any()
    np.testing.assert_allclose(out.targets[left, 0], 1.0)
    np.testing.assert_allclose(out.targets[right, 0], 0.0)
    assert (out.targets[:, 1] == 0).all() and not out.excluded.any()


def test_default_class_map_knows_every_class_synth_writes():
    from cscvision.labels.targets import DEFAULT_CLASS_MAP
    from cscvision.synth import CLASS_COLORS

    unknown = [name for name in CLASS_COLORS if not DEFAULT_CLASS_MAP.is_known(name)]
    assert unknown == []
    assert DEFAULT_CLASS_MAP.is_excluded("Pen mark") and DEFAULT_CLASS_MAP.is_excluded("Fold")

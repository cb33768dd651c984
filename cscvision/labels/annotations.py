"""Annotations: QuPath GeoJSON and ASAP/CAMELYON XML regions, tile-label CSVs, IHC DAB masks.

Every reader returns geometry in **level-0 pixels**. QuPath writes coordinates relative to
OpenSlide's bounds offset (``openslide.bounds-x/-y``) when a slide has one, so its
annotations sit ``bounds[:2]`` pixels left of and above where OpenSlide's level 0 has them:
pass ``offset_xy=slide.info.bounds[:2]`` for such files and the offset is *added* to every
coordinate. ASAP writes level-0 coordinates; leave ``offset_xy`` at ``(0, 0)`` for its XML.

How regions become soft tile targets lives in :mod:`cscvision.labels.targets` (re-exported here).
"""

from __future__ import annotations

import json
import math
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, box, shape

from cscvision.core.errors import CscvisionError
from cscvision.core.io import read_csv
from cscvision.labels.regions import Region
from cscvision.labels.targets import (
    DEFAULT_CLASS_MAP,
    ClassMap,
    TileTargets,
    tile_targets,
    unmapped_classes,
)

__all__ = [
    "DEFAULT_CLASS_MAP",
    "AnnotationError",
    "ClassMap",
    "Region",
    "TileTargets",
    "check_within",
    "read_annotations",
    "read_tile_labels",
    "tile_targets",
    "unmapped_classes",
]

GEOJSON_SUFFIXES = (".geojson", ".json")
XML_SUFFIXES = (".xml",)
_QUPATH_ID_TYPES = {  # QuPath 0.2 wrote the object type as the feature id
    "PathAnnotationObject": "annotation",
    "PathDetectionObject": "detection",
    "PathCellObject": "cell",
    "PathTileObject": "tile",
    "TMACoreObject": "tma_core",  # QuPath's class is TMACoreObject (no "Path" prefix)
}
_ASAP_AREA_TYPES = ("polygon", "rectangle", "spline")


class AnnotationError(CscvisionError, ValueError):
    """An annotation or label file that cannot be used as it is."""


def read_annotations(
    path: str | Path,
    *,
    offset_xy: tuple[float, float] = (0, 0),
    object_types: Sequence[str] = ("annotation",),
) -> list[Region]:
    """Polygonal regions of a QuPath GeoJSON (``.geojson``/``.json``) or ASAP XML (``.xml``) file.

    Only objects whose type is in ``object_types`` are kept (QuPath detections and cells are
    skipped by default); points and lines have no area and are skipped. Invalid polygons are
    repaired with ``shapely.make_valid``.

    Parameters
    ----------
    path
        The annotation file.
    offset_xy
        Added to every coordinate: OpenSlide's ``bounds-x/-y`` for QuPath files of slides
        with an empty margin (see the module notes on QuPath and bounds).
    object_types
        Object types to keep (``"annotation"``, ``"detection"``, ``"cell"``, ...).

    Returns
    -------
    list[Region]
        One region per object: class name, (Multi)Polygon in level-0 pixels, colour, type.

    Raises
    ------
    AnnotationError
        The file cannot be parsed, has NaN or infinite coordinates, or a polygon that leaves
        no area once repaired; the message names the file.

    Examples
    --------
    >>> regions = cscvision.read_annotations("slide.geojson")
    >>> sorted({r.name for r in regions})
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in GEOJSON_SUFFIXES:
        regions = _read_geojson(path, tuple(object_types))
    elif suffix in XML_SUFFIXES:
        regions = _read_asap_xml(path) if "annotation" in object_types else []
    else:
        raise AnnotationError(
            f"{path}: unknown annotation format {suffix!r}; export QuPath GeoJSON "
            "(.geojson) or ASAP XML (.xml); tile-label CSVs go through read_tile_labels"
        )
    dx, dy = float(offset_xy[0]), float(offset_xy[1])
    if dx or dy:
        regions = [_translate(r, dx, dy) for r in regions]
    unclassified = sum(1 for r in regions if not r.name)
    if unclassified:
        warnings.warn(
            f"{path}: {unclassified} region(s) have no classification; they count for no target",
            stacklevel=2,
        )
    return regions


def _translate(region: Region, dx: float, dy: float) -> Region:
    moved = shapely.transform(region.geometry, lambda xy: xy + np.array([dx, dy]))
    return Region(region.name, moved, region.color, region.object_type)


# --- QuPath GeoJSON ------------------------------------------------------------------------


def _read_geojson(path: Path, object_types: tuple[str, ...]) -> list[Region]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AnnotationError(f"{path}: not readable as GeoJSON ({e})") from None
    regions = []
    for index, feature in enumerate(_features(doc, path)):
        label = f"{path}: feature {index}" + (f" (id {feature['id']})" if "id" in feature else "")
        if not isinstance(feature, dict) or not isinstance(feature.get("geometry"), dict):
            raise AnnotationError(f"{label}: a Feature with a geometry object is expected")
        props = feature.get("properties") or {}
        if _object_type(feature, props) not in object_types:
            continue
        geometry = _polygonal(_shape(feature["geometry"], label), label)
        if geometry is None:
            continue
        name, color = _classification(props.get("classification"), label)
        regions.append(Region(name, geometry, color, _object_type(feature, props)))
    return regions


def _features(doc: Any, path: Path) -> list[Any]:
    """Features of a FeatureCollection, a bare list of Features, or a single Feature."""
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        return list(doc.get("features") or [])
    if isinstance(doc, dict) and doc.get("type") == "Feature":
        return [doc]
    raise AnnotationError(
        f"{path}: expected a GeoJSON FeatureCollection, Feature or list of Features "
        "(QuPath: File > Export objects as GeoJSON)"
    )


def _object_type(feature: dict, props: dict) -> str:
    kind = props.get("objectType") or feature.get("objectType")
    if kind is None:
        kind = _QUPATH_ID_TYPES.get(str(feature.get("id", "")), "annotation")
    return str(kind).lower()


def _shape(geometry: dict, label: str) -> Any:
    try:
        geom = shape(geometry)
    except Exception as e:  # shapely raises several types for malformed coordinates
        raise AnnotationError(f"{label}: malformed geometry ({e})") from None
    if not np.isfinite(shapely.get_coordinates(geom)).all():
        raise AnnotationError(
            f"{label}: a coordinate is NaN or Infinity; fix or delete the object and export again"
        )
    return geom


def _polygonal(geom: Any, label: str) -> Polygon | MultiPolygon | None:
    """The polygonal part of ``geom``, repaired if invalid; None for points and lines."""
    if not any(isinstance(g, (Polygon, MultiPolygon)) for g in shapely.get_parts(geom)):
        return None  # points, lines, collections of them: no area
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    area = shapely.union_all(
        [g for g in shapely.get_parts(geom) if isinstance(g, (Polygon, MultiPolygon))]
    )
    polygons = [g for g in shapely.get_parts(area) if isinstance(g, Polygon) and g.area > 0]
    if not polygons:
        raise AnnotationError(
            f"{label}: polygon has no area (even after repair); fix or delete it in QuPath/ASAP"
        )
    return polygons[0] if len(polygons) == 1 else MultiPolygon(polygons)


def _classification(value: Any, label: str) -> tuple[str, tuple[int, int, int] | None]:
    if value is None:
        return "", None
    if isinstance(value, str):
        return value, None
    if not isinstance(value, dict):
        raise AnnotationError(f"{label}: classification must be a string or an object")
    name = str(value.get("name") or ": ".join(value.get("names") or []))  # QuPath ≥ 0.5: names
    if isinstance(value.get("color"), (list, tuple)) and len(value["color"]) >= 3:
        return name, tuple(int(c) for c in value["color"][:3])  # type: ignore[return-value]
    if isinstance(value.get("colorRGB"), int):  # QuPath ≤ 0.2: packed (A)RGB, may be negative
        packed = value["colorRGB"] & 0xFFFFFF
        return name, ((packed >> 16) & 255, (packed >> 8) & 255, packed & 255)
    return name, None


# --- ASAP / CAMELYON XML -------------------------------------------------------------------


def _read_asap_xml(path: Path) -> list[Region]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        raise AnnotationError(f"{path}: not readable as ASAP XML ({e})") from None
    if root.tag != "ASAP_Annotations":
        raise AnnotationError(f"{path}: root element is <{root.tag}>, not <ASAP_Annotations>")
    group_colors = {
        g.get("Name", ""): _hex_color(g.get("Color"))
        for g in root.iter("Group")
        if g.get("Name") is not None
    }
    regions = []
    for index, ann in enumerate(root.iter("Annotation")):
        label = f"{path}: annotation {index} ({ann.get('Name', 'unnamed')})"
        if (ann.get("Type") or "Polygon").lower() not in _ASAP_AREA_TYPES:
            continue  # Dot, PointSet, Measurement: no area
        xy = _asap_coordinates(ann, label)
        if len(xy) < 3:
            raise AnnotationError(f"{label}: a polygon needs at least 3 coordinates")
        geometry = _polygonal(Polygon(xy), label)
        group = ann.get("PartOfGroup") or ""
        group = "" if group == "None" else group
        color = group_colors.get(group) or _hex_color(ann.get("Color"))
        regions.append(Region(group, geometry, color, "annotation"))  # type: ignore[arg-type]
    return regions


def _asap_coordinates(ann: ET.Element, label: str) -> list[tuple[float, float]]:
    """Coordinates sorted by ``Order``; splines are taken as their control polygon."""
    points = []
    for c in ann.iter("Coordinate"):
        try:  # some locales wrote a decimal comma
            x, y = (float(c.get(k, "").replace(",", ".")) for k in ("X", "Y"))
            order = int(c.get("Order", len(points)))
        except ValueError:
            raise AnnotationError(f"{label}: coordinate {dict(c.attrib)} is not numeric") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise AnnotationError(f"{label}: coordinate {dict(c.attrib)} is not finite")
        points.append((order, x, y))
    return [(x, y) for _, x, y in sorted(points, key=lambda p: p[0])]


def _hex_color(value: str | None) -> tuple[int, int, int] | None:
    if not value or not value.startswith("#") or len(value) != 7:
        return None
    try:
        return (int(value[1:3], 16), int(value[3:5], 16), int(value[5:7], 16))
    except ValueError:
        return None


# --- checks --------------------------------------------------------------------------------


def is_tile_label_csv(path: str | Path) -> bool:
    """A tile-label CSV (``x,y,<target>…``), not a file of regions."""
    return Path(path).suffix.lower() == ".csv"


def read_slide_annotations(path: str | Path, bounds_xy: tuple[int, int]) -> list[Region]:
    """The regions of an annotation file in the slide's level-0 frame: QuPath GeoJSON is
    relative to the slide's bounds corner (``bounds_xy``, OpenSlide's ``bounds-x/y``;
    QuPath crops to it), ASAP XML is in level-0 pixels already."""
    qupath = Path(path).suffix.lower() in GEOJSON_SUFFIXES
    return read_annotations(path, offset_xy=tuple(bounds_xy) if qupath else (0, 0))


def check_within(regions: Sequence[Region], dimensions: tuple[int, int], path: str | Path) -> None:
    """Raise :class:`AnnotationError` if any region lies entirely outside the slide.

    That happens when the annotations belong to another slide, were drawn on a downsampled
    image, or came from QuPath on a slide with a bounds offset that was not passed.
    """
    w, h = dimensions
    slide_box = box(0, 0, w, h)
    outside = [i for i, r in enumerate(regions) if not r.geometry.intersects(slide_box)]
    if outside:
        first = regions[outside[0]]
        raise AnnotationError(
            f"{path}: {len(outside)} of {len(regions)} region(s) lie entirely outside the "
            f"{w}x{h} slide (first: region {outside[0]} {first.name!r}, bounds "
            f"{tuple(round(v) for v in first.geometry.bounds)}); check that the file belongs "
            "to this slide and, for QuPath exports, pass the slide's bounds offset"
        )


# --- tile-label CSV ------------------------------------------------------------------------


def read_tile_labels(path: str | Path, targets: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tile labels from a CSV with columns ``x,y,<target>...``: (xy_l0 int[N,2], float32[N,T]).

    ``x, y`` are level-0 top-left corners (integers); target values are fractions in [0, 1].
    """
    path = Path(path)
    try:
        rows = read_csv(path)
    except (OSError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: cannot read the tile-label CSV ({e})") from None
    header = set(rows[0]) if rows else _csv_header(path)
    missing = [c for c in ("x", "y", *targets) if c not in header]
    if missing:
        raise AnnotationError(
            f"{path}: tile-label CSV lacks column(s) {missing}; expected x,y,{','.join(targets)}"
        )
    if not rows:
        raise AnnotationError(f"{path}: tile-label CSV has no rows")
    xy = _numeric_column(rows, ("x", "y"), path)
    if not np.array_equal(xy, np.round(xy)):
        raise AnnotationError(f"{path}: x and y must be integer level-0 pixel coordinates")
    values = _numeric_column(rows, tuple(targets), path)
    bad = np.flatnonzero(((values < 0) | (values > 1)).any(axis=1))
    if bad.size:
        raise AnnotationError(
            f"{path}: line {bad[0] + 2}: target values must lie in [0, 1] "
            f"({bad.size} row(s) outside)"
        )
    return xy.astype(np.int64), values.astype(np.float32)


def _csv_header(path: Path) -> list[str]:
    first = path.read_text(encoding="utf-8").splitlines()[:1]
    return [c.strip() for c in first[0].split(",")] if first else []


def _numeric_column(rows: list[dict[str, str]], columns: tuple[str, ...], path: Path) -> np.ndarray:
    out = np.empty((len(rows), len(columns)), dtype=np.float64)
    for line, row in enumerate(rows, start=2):
        for j, column in enumerate(columns):
            try:
                out[line - 2, j] = float(row[column])
            except (TypeError, ValueError):
                raise AnnotationError(
                    f"{path}: line {line}: column {column!r} value {row[column]!r} is not a number"
                ) from None
    if not np.isfinite(out).all():
        line = int(np.flatnonzero(~np.isfinite(out).all(axis=1))[0]) + 2
        raise AnnotationError(f"{path}: line {line}: NaN or infinite value")
    return out

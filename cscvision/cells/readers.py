"""Readers of the field's cell detectors' exports, each onto the cell table.

=================  ==================================================================  ============
format             file                                                                class map
=================  ==================================================================  ============
``table``          ``<id>.cells.parquet``: the cell table itself                       (none)
``qupath``         QuPath GeoJSON export of detections/cells (StarDist, InstanSeg,     ``qupath``
                   cell detection): a FeatureCollection or a plain array of Features;
                   ``nucleusGeometry`` (cells) else ``geometry`` gives the centroid;
                   ``classification.name`` the class (``Tumor: Positive`` → ``Tumor``);
                   ``measurements`` (a dict, or QuPath ≤ 0.3's name/value list) kept as
                   float columns
``hovernet``       HoVer-Net / TIAToolbox JSON: ``{"mag": .., "nuc": {id: {"centroid":  ``pannuke``
                   [x, y], "contour", "type", "type_prob"}}}`` with a type map
                   (``type_info.json``: ``{"1": ["neopla", [r, g, b]], ..}``; default
                   PanNuke's)
``cellvit``        CellViT / CellViT++ ``cells.geojson`` or ``cell_detection.geojson``:  ``pannuke``
                   an array of Features, one per class, each a MultiPolygon (outlines)
                   or MultiPoint (centroids) of all that class's cells
``histolytics``    histolytics GeoParquet (a GeoDataFrame written by geopandas):     ``histolytics``
                   WKB ``geometry``, ``class_name``
``csv``            plain CSV: ``x``, ``y`` (level-0 px), ``class``; ``prob`` optional  ``cscvision``
=================  ==================================================================  ============

GeoJSON is read as a stream (ijson, C backend): one feature, or one polygon of a CellViT
MultiPolygon, in memory at a time, and the columns grow as numpy chunks, so peak memory
grows with the number of cells, not with the file's size. Coordinates must be level-0
pixels of the slide (``cscvision cells`` checks them against the slide).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cscvision.cells.table import CellTable, make_table, read_cell_table
from cscvision.cells.types import class_map as load_class_map
from cscvision.cells.types import map_classes
from cscvision.core.config_files import ConfigFileError, read_yaml
from cscvision.core.errors import CscvisionError

TABLE_FORMAT = "table"
FORMATS = (TABLE_FORMAT, "qupath", "hovernet", "cellvit", "histolytics", "csv")
DEFAULT_CLASS_MAP = {
    "qupath": "qupath",
    "hovernet": "pannuke",
    "cellvit": "pannuke",
    "histolytics": "histolytics",
    "csv": "cscvision",
}
_SUFFIXES = {
    TABLE_FORMAT: (".cells.parquet",),
    "qupath": (".geojson", ".json"),
    "hovernet": (".json",),
    "cellvit": (".geojson", ".json"),
    "histolytics": (".parquet",),
    "csv": (".csv",),
}
# HoVer-Net's type_info.json for its PanNuke checkpoint.
PANNUKE_TYPE_INFO = {0: "nolabe", 1: "neopla", 2: "inflam", 3: "connec", 4: "necros", 5: "no-neo"}
CHUNK = 1024  # rows held as Python objects before they become numpy columns


class CellReadError(CscvisionError, ValueError):
    """A detector export that cannot be read (names the file and what to do)."""


def source_suffixes(fmt: str) -> tuple[str, ...]:
    """File name endings of ``fmt`` (the slide id is the name without one)."""
    return _SUFFIXES[fmt]


class _Columns:
    """Columns that grow in numpy chunks: x, y, class name, prob and named measurements."""

    def __init__(self) -> None:
        self.rows: list[tuple] = []
        self.measure_rows: list[Mapping[str, float]] = []
        self.chunks: list[dict[str, np.ndarray]] = []
        self.names: dict[str, str] = {}  # one string per class name, not one per cell

    def add(
        self,
        x: float,
        y: float,
        cls: str,
        prob: float = np.nan,
        measurements: Mapping[str, float] | None = None,
    ) -> None:
        self.rows.append((x, y, self.names.setdefault(cls, cls), prob))
        self.measure_rows.append(measurements or {})
        if len(self.rows) >= CHUNK:
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        x, y, cls, prob = zip(*self.rows, strict=True)
        chunk = {
            "x": np.array(x, np.float64),
            "y": np.array(y, np.float64),
            "class": np.array(cls, dtype=object),
            "prob": np.array(prob, np.float32),
        }
        names = {k for m in self.measure_rows for k in m}
        for name in names:
            chunk["m:" + name] = np.array([_number(m.get(name)) for m in self.measure_rows])
        self.chunks.append(chunk)
        self.rows, self.measure_rows = [], []

    def arrays(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        self._flush()
        sizes = [len(c["x"]) for c in self.chunks]
        names = {k for c in self.chunks for k in c}
        out = {}
        for k in sorted(names):  # one column at a time, its chunks freed as it is joined
            parts = [c.pop(k, None) for c in self.chunks]
            parts = [
                np.full(n, np.nan) if p is None else p for p, n in zip(parts, sizes, strict=True)
            ]
            out[k] = np.concatenate(parts) if parts else np.zeros(0)
        self.chunks = []
        base = {k: out.get(k, np.zeros(0)) for k in ("x", "y", "class", "prob")}
        base["class"] = base["class"].astype(object)
        measures = {k[2:]: v for k, v in out.items() if k.startswith("m:")}
        return base, measures


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return np.nan


def _finish(columns: _Columns, path: Path, source: str, mapping: dict, **kw) -> CellTable:
    base, measures = columns.arrays()
    types, keep = map_classes(base["class"], mapping, str(path))
    if keep.all():  # no copies
        keep = slice(None)
    return make_table(
        base["x"][keep],
        base["y"][keep],
        types[keep],
        source=source,
        prob=base["prob"][keep],
        class_map=mapping,
        markers={k: v[keep] for k, v in sorted(measures.items())},
        **kw,
    )


def _mapping(fmt: str, class_map: str | Mapping | None) -> dict:
    if isinstance(class_map, str) and class_map.lower().endswith((".yaml", ".yml")):
        try:
            class_map = read_yaml(class_map)
        except ConfigFileError as e:
            raise CellReadError(f"--class-map {e}") from None
        if not isinstance(class_map, dict):
            raise CellReadError("--class-map: a YAML mapping of 'tool class: cell type'")
    return load_class_map(class_map or DEFAULT_CLASS_MAP[fmt])


def read_cells(
    path: str | Path,
    fmt: str = TABLE_FORMAT,
    *,
    class_map: str | Mapping | None = None,
    mpp: float | None = None,
    slide_id: str = "",
    type_info: str | Path | None = None,
    polygons: bool = False,
) -> CellTable:
    """Read ``path`` as ``fmt`` (see the module doc) into a cell table. ``class_map``: a
    name in ``cell_types.yaml``, a YAML file or a mapping (default: the format's).
    ``polygons``: keep the outlines as WKB (histolytics; the features need only centroids)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise CellReadError(f"{path}: unknown cell format {fmt!r}; one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise CellReadError(f"{path}: no such cell file")
    if fmt == TABLE_FORMAT:
        return read_cell_table(path, polygons=polygons)
    mapping = _mapping(fmt, class_map)
    kw = {"mpp": mpp, "slide_id": slide_id}
    try:
        if fmt == "qupath":
            return _finish(_read_qupath(path), path, "QuPath", mapping, **kw)
        if fmt == "hovernet":
            columns, version = _read_hovernet(path, _type_names(type_info))
            return _finish(columns, path, "HoVer-Net", mapping, source_version=version, **kw)
        if fmt == "cellvit":
            return _finish(_read_cellvit(path), path, "CellViT", mapping, **kw)
        if fmt == "histolytics":
            return _read_histolytics(path, mapping, polygons=polygons, **kw)
        return _finish(_read_csv(path), path, "csv", mapping, **kw)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CellReadError(f"{path}: not a {fmt} cell export ({type(e).__name__}: {e})") from None
    except Exception as e:  # ijson's parse errors
        if type(e).__module__.startswith("ijson"):
            raise CellReadError(f"{path}: not valid JSON for {fmt} ({e})") from None
        raise


# -- GeoJSON (QuPath, CellViT) -----------------------------------------------------------


def _json_root(path: Path) -> str:
    """'features.item' for a FeatureCollection, 'item' for a bare array of features."""
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):
        return "item"
    if head.startswith(b"{"):
        return "features.item"
    raise CellReadError(f"{path}: not GeoJSON (expected '{{' or '[')")


def _centroid(geometry: Mapping) -> tuple[float, float]:
    import shapely.geometry

    shape = shapely.geometry.shape(geometry)
    c = shape.centroid if shape.geom_type != "Point" else shape
    return float(c.x), float(c.y)


def _qupath_measurements(props: Mapping) -> dict[str, float]:
    raw = props.get("measurements") or {}
    if isinstance(raw, list):  # QuPath ≤ 0.3: [{"name": .., "value": ..}]
        return {str(m.get("name")): _number(m.get("value")) for m in raw if isinstance(m, dict)}
    return {str(k): _number(v) for k, v in raw.items()}


def _qupath_class(props: Mapping) -> str:
    cls = props.get("classification") or {}
    name = cls.get("name") if isinstance(cls, dict) else None
    if not name and isinstance(cls, dict) and cls.get("names"):
        name = cls["names"][0]
    return str(name).split(":")[0].strip() if name else "unclassified"


class _BareNumbers:
    """A binary file whose bare ``NaN`` / ``Infinity`` values read as ``null``.

    QuPath writes a missing measurement as a bare NaN (Gson's special floating-point
    values), which is not JSON; ijson refuses it. Chunks are cut after their last comma,
    so a value is never split between two chunks."""

    _BARE = re.compile(rb"([:\[,]\s*)-?(?:NaN|Infinity)")

    def __init__(self, f) -> None:
        self.f, self.carry = f, b""

    def read(self, size: int = -1) -> bytes:
        if size == 0:  # ijson's probe of bytes or text
            return b""
        while True:
            chunk = self.f.read(size if size and size > 0 else -1)
            buf = self.carry + chunk
            if not chunk:  # end of file
                self.carry = b""
                return self._BARE.sub(rb"\1null", buf)
            cut = buf.rfind(b",")
            if cut > 0:
                self.carry = buf[cut:]
                return self._BARE.sub(rb"\1null", buf[:cut])
            self.carry = buf


def _read_qupath(path: Path) -> _Columns:
    """QuPath's GeoJSON: ``nucleusGeometry`` beside ``geometry`` for cells; ``objectType``
    (0.4+) or ``object_type`` (0.2-0.3) in the properties."""
    import ijson

    columns = _Columns()
    with path.open("rb") as raw:
        for feature in ijson.items(_BareNumbers(raw), _json_root(path), use_float=True):
            props = feature.get("properties") or {}
            kind = props.get("objectType") or props.get("object_type") or "detection"
            if kind not in ("detection", "cell"):
                continue  # annotations (regions drawn by hand), tiles, TMA cores
            geometry = feature.get("nucleusGeometry") or feature.get("geometry")
            if not geometry:
                continue
            x, y = _centroid(geometry)
            columns.add(x, y, _qupath_class(props), np.nan, _qupath_measurements(props))
    return columns


def _read_cellvit(path: Path) -> _Columns:
    """CellViT's per-class features, one polygon or point at a time (ijson events)."""
    import ijson
    from ijson.common import ObjectBuilder

    root = _json_root(path)
    part_prefix = f"{root}.geometry.coordinates.item"
    columns, parts, cls, builder = _Columns(), [], None, None
    with path.open("rb") as f:
        for prefix, event, value in ijson.parse(f, use_float=True):
            if builder is not None:
                builder.event(event, value)
                if prefix == part_prefix and event == "end_array":
                    parts.append(_part_centroid(builder.value))
                    builder = None
            elif prefix == part_prefix and event == "start_array":
                builder = ObjectBuilder()
                builder.event(event, value)
            elif prefix == f"{root}.properties.classification.name":
                cls = value
            elif prefix == root and event == "end_map":
                for x, y in parts:
                    columns.add(x, y, str(cls or "unclassified"))
                parts, cls = [], None
    return columns


def _part_centroid(coords: list) -> tuple[float, float]:
    """Centroid of one MultiPolygon part ([ring, ...]) or one MultiPoint point ([x, y])."""
    if coords and isinstance(coords[0], (int, float)):
        return float(coords[0]), float(coords[1])
    return _centroid({"type": "Polygon", "coordinates": coords})


# -- HoVer-Net ----------------------------------------------------------------------------


def _type_names(type_info: str | Path | None) -> dict[int, str]:
    if type_info is None:
        return dict(PANNUKE_TYPE_INFO)
    try:
        doc = json.loads(Path(type_info).read_text(encoding="utf-8"))
        return {int(k): str(v[0] if isinstance(v, list) else v) for k, v in doc.items()}
    except (OSError, ValueError, TypeError, IndexError) as e:
        raise CellReadError(
            f"--type-info {type_info}: not a HoVer-Net type_info.json "
            f'({{"1": ["neopla", [255, 0, 0]], ...}}): {e}'
        ) from None


def _read_hovernet(path: Path, names: dict[int, str]) -> tuple[_Columns, str | None]:
    import ijson

    columns = _Columns()
    with path.open("rb") as f:
        for _, nuc in ijson.kvitems(f, "nuc", use_float=True):
            cx, cy = nuc["centroid"]
            kind = nuc.get("type")
            name = names.get(int(kind), f"type {kind}") if kind is not None else "unclassified"
            columns.add(float(cx), float(cy), name, _number(nuc.get("type_prob")))
    with path.open("rb") as f:
        mag = next(ijson.items(f, "mag", use_float=True), None)
    return columns, None if mag is None else f"mag {mag}"


# -- histolytics GeoParquet, CSV ------------------------------------------------------------


def _read_histolytics(path: Path, mapping: dict, *, polygons: bool, **kw) -> CellTable:
    """GeoParquet read in batches: only centroids (and, if asked, the WKB) are kept."""
    import pyarrow.parquet as pq
    import shapely

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError) as e:
        raise CellReadError(f"{path}: not a readable Parquet file ({e})") from None
    if not {"geometry", "class_name"} <= set(parquet.schema_arrow.names):
        raise CellReadError(f"{path}: a histolytics GeoParquet needs 'geometry' and 'class_name'")
    xs, ys, names, wkbs = [], [], [], []
    for batch in parquet.iter_batches(batch_size=65536, columns=["geometry", "class_name"]):
        wkb = batch.column(0).to_numpy(zero_copy_only=False)
        cents = shapely.centroid(shapely.from_wkb(wkb))
        xs.append(shapely.get_x(cents))
        ys.append(shapely.get_y(cents))
        names.append(np.asarray(batch.column(1).to_pylist(), dtype=object))
        if polygons:
            wkbs.append(wkb)
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0)  # noqa: E731
    types, keep = map_classes(cat(names).astype(object), mapping, str(path))
    return make_table(
        cat(xs)[keep],
        cat(ys)[keep],
        types[keep],
        source="histolytics",
        class_map=mapping,
        polygons=cat(wkbs)[keep] if polygons else None,
        **kw,
    )


def _read_csv(path: Path) -> _Columns:
    columns = _Columns()
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = {"x", "y", "class"} - set(reader.fieldnames or ())
        if missing:
            raise CellReadError(
                f"{path}: columns {sorted(missing)} missing; a cell CSV has "
                "x, y (level-0 px), class and optionally prob"
            )
        for line, row in enumerate(reader, start=2):
            x, y = _number(row["x"]), _number(row["y"])
            if not (np.isfinite(x) and np.isfinite(y)):
                raise CellReadError(
                    f"{path} line {line}: x, y must be numbers, got {row['x']!r}, {row['y']!r}"
                )
            columns.add(x, y, row["class"], _number(row.get("prob")))
    return columns

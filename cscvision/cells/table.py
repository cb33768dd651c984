"""The cell table: one Parquet file per slide and a JSON sidecar beside it.

========================  =====================================================================
column                    meaning
========================  =====================================================================
``cell_id``               int64, unique within the slide
``x``, ``y``              float64, the cell's centroid in level-0 pixels of the slide
``polygon``               optional binary: the outline as WKB, level-0 pixels
``cell_type``             string (dictionary-encoded): a node of the cell-type hierarchy
``type_prob``             float32: the source's confidence in the type; NaN if it gives none
``<marker>``              optional float64 per-marker measurements (multiplex IF, QuPath)
``<marker>_pos``          optional bool positivity of the marker
========================  =====================================================================

The sidecar (``<name>.json`` for ``<name>.parquet``; ``S.cells.json`` for
``S.cells.parquet``) records the source tool and its version when known, the slide's
level-0 µm/px, the class map that put the tool's classes on the hierarchy, the count of
each type and the marker names. The sidecar is written last: without it the table is
incomplete.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cscvision import __version__
from cscvision.cells.types import CellTypeError, cell_types
from cscvision.core.errors import CscvisionError
from cscvision.core.io import atomic_path, write_json

FORMAT = "cscvision cell table"
FORMAT_VERSION = 1
SUFFIX = ".cells.parquet"
BASE_COLUMNS = ("cell_id", "x", "y", "polygon", "cell_type", "type_prob")


class CellTableError(CscvisionError, ValueError):
    """A cell table that cannot be read or written as the contract says."""


@dataclass(frozen=True)
class CellTable:
    """One slide's cells. ``codes`` index ``types`` (hierarchy names)."""

    x: np.ndarray  # float64[N], level-0 px
    y: np.ndarray  # float64[N]
    codes: np.ndarray  # int16[N]
    types: tuple[str, ...]
    prob: np.ndarray  # float32[N], NaN where unknown
    source: str
    mpp: float | None = None  # level-0 µm/px of the slide the cells were found on
    source_version: str | None = None
    class_map: Mapping[str, str | None] = field(default_factory=dict)
    cell_id: np.ndarray | None = None  # int64[N]; default 0..N-1
    polygons: np.ndarray | None = None  # object[N] of WKB bytes (None where missing)
    markers: Mapping[str, np.ndarray] = field(default_factory=dict)  # name or name_pos
    slide_id: str = ""

    def __len__(self) -> int:
        return len(self.x)

    @property
    def ids(self) -> np.ndarray:
        return np.arange(len(self), dtype=np.int64) if self.cell_id is None else self.cell_id

    @property
    def cell_type(self) -> np.ndarray:
        """The type name of each cell, object[N]."""
        return (
            np.asarray(self.types, dtype=object)[self.codes]
            if len(self.types)
            else (np.array([], dtype=object))
        )

    def counts(self) -> dict[str, int]:
        """Cells of each type (as stored, not rolled up the hierarchy)."""
        counts = np.bincount(self.codes, minlength=len(self.types))
        return {t: int(c) for t, c in zip(self.types, counts, strict=True) if c}


def make_table(
    x: np.ndarray,
    y: np.ndarray,
    cell_type: np.ndarray,
    *,
    source: str,
    prob: np.ndarray | None = None,
    **kwargs,
) -> CellTable:
    """A :class:`CellTable` from centroids and type names (checked against the hierarchy)."""
    names = np.asarray(cell_type, dtype=object)
    types, codes = np.unique(names.astype(str), return_inverse=True) if len(names) else ([], [])
    hierarchy = cell_types()
    for t in types:
        hierarchy.check(str(t))
    n = len(names)
    return CellTable(
        x=np.asarray(x, np.float64).reshape(n),
        y=np.asarray(y, np.float64).reshape(n),
        codes=np.asarray(codes, np.int16).reshape(n),
        types=tuple(str(t) for t in types),
        prob=np.full(n, np.nan, np.float32) if prob is None else np.asarray(prob, np.float32),
        source=source,
        **kwargs,
    )


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return (
        path.with_name(path.name[: -len(".parquet")] + ".json")
        if path.name.endswith(".parquet")
        else path.with_name(path.name + ".json")
    )


def _arrow_table(table: CellTable):
    import pyarrow as pa

    n = len(table)
    if not (len(table.y) == len(table.codes) == len(table.prob) == n):
        raise CellTableError("x, y, codes and prob must have one entry per cell")
    columns = {
        "cell_id": pa.array(table.ids, pa.int64()),
        "x": pa.array(table.x, pa.float64()),
        "y": pa.array(table.y, pa.float64()),
    }
    if table.polygons is not None:
        columns["polygon"] = pa.array(list(table.polygons), pa.binary())
    columns["cell_type"] = pa.DictionaryArray.from_arrays(
        pa.array(table.codes, pa.int16()), pa.array(list(table.types), pa.string())
    )
    columns["type_prob"] = pa.array(table.prob, pa.float32())
    for name, values in table.markers.items():
        if name in BASE_COLUMNS:
            raise CellTableError(f"marker {name!r} clashes with a cell table column; rename it")
        values = np.asarray(values)
        kind = pa.bool_() if name.endswith("_pos") else pa.float64()
        columns[name] = pa.array(values.astype(bool if name.endswith("_pos") else np.float64), kind)
    return pa.table(columns)


def sidecar(table: CellTable) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "cscvision_version": __version__,
        "slide_id": table.slide_id,
        "source": table.source,
        "source_version": table.source_version,
        "mpp": table.mpp,
        "class_map": dict(table.class_map),
        "n_cells": len(table),
        "type_counts": table.counts(),
        "markers": sorted(table.markers),
        "has_polygons": table.polygons is not None,
    }


def write_cell_table(path: str | Path, table: CellTable) -> Path:
    """Write ``table`` to ``path`` (``.parquet``) and its sidecar, each atomically; the
    sidecar goes last."""
    import pyarrow.parquet as pq

    path = Path(path)
    if path.suffix != ".parquet":
        raise CellTableError(f"{path}: a cell table is a .parquet file; name it <slide_id>{SUFFIX}")
    sidecar_path(path).unlink(missing_ok=True)
    with atomic_path(path) as tmp:
        pq.write_table(_arrow_table(table), tmp, compression="zstd")
    write_json(sidecar_path(path), sidecar(table))
    return path


def read_cell_table(path: str | Path, *, polygons: bool = False) -> CellTable:
    """Read a table written by :func:`write_cell_table` (``polygons``: load the WKB too)."""
    import pyarrow.parquet as pq

    path = Path(path)
    meta_path = sidecar_path(path)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CellTableError(
            f"{path}: no readable sidecar {meta_path.name} ({e}); write cell tables with "
            "cscvision (the sidecar is written last, so a missing one means an unfinished table)"
        ) from None
    if meta.get("format") != FORMAT:
        raise CellTableError(f"{meta_path}: not a {FORMAT} sidecar (format {meta.get('format')!r})")
    try:
        schema = pq.read_schema(path)
        wanted = [c for c in schema.names if polygons or c != "polygon"]
        arrow = pq.read_table(path, columns=wanted, read_dictionary=["cell_type"])
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise CellTableError(f"{path}: not a readable Parquet cell table ({e})") from None
    missing = [c for c in ("x", "y", "cell_type") if c not in arrow.column_names]
    if missing:
        raise CellTableError(
            f"{path}: columns {missing} missing; a cell table needs x, y, cell_type"
        )
    return _from_arrow(arrow, meta, path)


def _from_arrow(arrow, meta: dict, path: Path) -> CellTable:
    import pyarrow as pa

    kind = arrow.column("cell_type").combine_chunks()
    if not pa.types.is_dictionary(kind.type):
        kind = kind.dictionary_encode()
    types = tuple(str(t) for t in kind.dictionary.to_pylist())
    hierarchy = cell_types()
    try:
        for t in types:
            hierarchy.check(t)
    except CellTypeError as e:
        raise CellTableError(f"{path}: {e}") from None
    codes = kind.indices.to_numpy(zero_copy_only=False).astype(np.int16)
    base = set(BASE_COLUMNS)
    markers = {c: arrow.column(c).to_numpy() for c in arrow.column_names if c not in base}
    poly = (
        arrow.column("polygon").to_numpy(zero_copy_only=False)
        if "polygon" in arrow.column_names
        else None
    )
    prob = (
        arrow.column("type_prob").to_numpy().astype(np.float32)
        if "type_prob" in arrow.column_names
        else np.full(arrow.num_rows, np.nan, np.float32)
    )
    x = arrow.column("x").to_numpy().astype(np.float64)
    y = arrow.column("y").to_numpy().astype(np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise CellTableError(f"{path}: x or y holds NaN or infinity; every cell needs a centroid")
    return CellTable(
        x=x,
        y=y,
        codes=codes,
        types=types,
        prob=prob,
        source=str(meta.get("source") or ""),
        mpp=meta.get("mpp"),
        source_version=meta.get("source_version"),
        class_map=meta.get("class_map") or {},
        cell_id=arrow.column("cell_id").to_numpy() if "cell_id" in arrow.column_names else None,
        polygons=poly,
        markers=markers,
        slide_id=str(meta.get("slide_id") or ""),
    )

"""The tile-label table: one per slide, the contract every label builder hands ``train``.

``<dir>/<slide_id>.labels.csv`` holds ``x, y`` (level-0 top-left corner of each tile), one
column per target (a soft fraction in [0, 1] or a continuous score; empty = unknown), and
optional ``weight`` (≥ 0: each tile's share of the training loss, 1 if absent) and
``valid`` (0/1; 0 = excluded, counted but not trained on). The
sidecar ``<slide_id>.labels.json`` says the tile px and µm/px the tiles are defined at,
the source ("annotations", "ihc", "st", ...) and how the table was made (provenance);
``label_targets`` (optional) names the columns that are training targets, when the table
also holds measurements (``<marker>_positive`` of an IHC table): ``train`` takes those by
default, other columns only when the config's ``targets`` asks for them.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cscvision import __version__
from cscvision.core.errors import CscvisionError
from cscvision.core.io import atomic_path, write_json
from cscvision.core.names import UnsafeNameError, check_distinct, check_name, child

TABLE_SUFFIX = ".labels.csv"
SIDECAR_SUFFIX = ".labels.json"
_RESERVED = ("x", "y", "weight", "valid")


class LabelTableError(CscvisionError, ValueError):
    """A tile-label table that cannot be read; the message names the file and the fix."""


@dataclass(frozen=True)
class LabelTable:
    slide_id: str
    xy_l0: np.ndarray  # int64[N, 2], level-0 top-left of each tile
    targets: tuple[str, ...]
    values: np.ndarray  # float32[N, T]; fraction in [0, 1] or a continuous score; NaN = unknown
    tile_px: int  # tile side in pixels at mpp
    mpp: float  # µm/px the tiles are defined at
    source: str  # "annotations" | "ihc" | "st" | ...
    weight: np.ndarray | None = None  # float32[N] sample weights
    valid: np.ndarray | None = None  # bool[N]; False = excluded (counted, not trained on)
    provenance: dict = field(default_factory=dict)  # how it was made (inputs, parameters)
    label_targets: tuple[str, ...] | None = None  # the training targets among ``targets``

    def __post_init__(self) -> None:
        n = len(self.xy_l0)
        if self.label_targets is not None and not set(self.label_targets) <= set(self.targets):
            extra = sorted(set(self.label_targets) - set(self.targets))
            raise ValueError(f"{self.slide_id}: label_targets {extra} are not columns")
        if np.shape(self.xy_l0) != (n, 2):
            raise ValueError(f"{self.slide_id}: xy_l0 must be [N, 2], got {np.shape(self.xy_l0)}")
        if np.shape(self.values) != (n, len(self.targets)):
            raise ValueError(
                f"{self.slide_id}: values must be [N={n}, T={len(self.targets)}], "
                f"got {np.shape(self.values)}"
            )
        clash = set(self.targets) & set(_RESERVED)
        if clash or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"{self.slide_id}: target names must be distinct, not {_RESERVED}")
        for name in ("weight", "valid"):
            extra = getattr(self, name)
            if extra is not None and np.shape(extra) != (n,):
                raise ValueError(f"{self.slide_id}: {name} must be [N={n}]")

    def __len__(self) -> int:
        return len(self.xy_l0)

    @property
    def n_valid(self) -> int:
        return len(self) if self.valid is None else int(np.count_nonzero(self.valid))


def declared_targets(sidecar: dict) -> list[str]:
    """The columns a table's sidecar offers for training: ``label_targets`` when it declares
    them, else every target column."""
    declared = sidecar.get("label_targets")
    return [str(t) for t in (declared if declared else sidecar["targets"])]


def table_path(folder: str | Path, slide_id: str) -> Path:
    """``folder/<slide_id>.labels.csv``; an id that is not an allowed name
    (:mod:`cscvision.core.names`) raises :class:`~cscvision.core.names.UnsafeNameError`."""
    return child(folder, slide_id, TABLE_SUFFIX, what="slide_id")


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    stem = path.name[: -len(TABLE_SUFFIX)] if path.name.endswith(TABLE_SUFFIX) else path.stem
    return path.with_name(stem + SIDECAR_SUFFIX)


def _cell(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6g}"


def write_label_table(path: str | Path, table: LabelTable) -> Path:
    """Write a tile-label table: the CSV and its sidecar JSON, each atomically.

    Parameters
    ----------
    path
        The CSV to write (``<slide_id>.labels.csv``); the sidecar goes beside it.
    table
        The table.

    Returns
    -------
    pathlib.Path
        The CSV's path.

    Examples
    --------
    >>> cscvision.write_label_table("labels/S01.labels.csv", table)
    """
    path = Path(path)
    header = ["x", "y", *table.targets]
    columns = [table.xy_l0[:, 0].astype(np.int64), table.xy_l0[:, 1].astype(np.int64)]
    if table.weight is not None:
        header.append("weight")
    if table.valid is not None:
        header.append("valid")
    values = np.asarray(table.values, np.float64)
    weight = None if table.weight is None else np.asarray(table.weight, np.float64)
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i in range(len(table)):
            row = [int(columns[0][i]), int(columns[1][i]), *(_cell(v) for v in values[i])]
            if weight is not None:
                row.append(_cell(weight[i]))
            if table.valid is not None:
                row.append(int(bool(table.valid[i])))
            writer.writerow(row)
    write_json(
        sidecar_path(path),
        {
            "slide_id": table.slide_id,
            "targets": list(table.targets),
            **({"label_targets": list(table.label_targets)} if table.label_targets else {}),
            "tile_px": int(table.tile_px),
            "mpp": float(table.mpp),
            "source": table.source,
            "n_tiles": len(table),
            "n_valid": table.n_valid,
            "provenance": table.provenance,
            "cscvision_version": __version__,
        },
    )
    return path


def read_sidecar(path: str | Path) -> dict:
    """The checked sidecar of the table ``path`` (:class:`LabelTableError` naming it)."""
    return _read_sidecar(Path(path))


def _read_sidecar(path: Path) -> dict:
    import json

    side = sidecar_path(path)
    if not side.exists():
        raise LabelTableError(
            f"{path}: its sidecar {side.name} is missing; a tile-label table needs it (tile px, "
            "µm/px, source); write tables with cscvision.labels.table.write_label_table"
        )
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LabelTableError(f"{side}: cannot read the label-table sidecar ({e})") from None
    if not isinstance(meta, dict):
        raise LabelTableError(
            f"{side}: the sidecar must be a JSON object, not {type(meta).__name__}"
        )
    missing = {"slide_id", "targets", "tile_px", "mpp", "source"} - set(meta)
    if missing:
        raise LabelTableError(f"{side}: the sidecar lacks {sorted(missing)}")
    return _checked_sidecar(side, meta)


def _checked_sidecar(side: Path, meta: dict) -> dict:
    """The sidecar's geometry as numbers and its names as allowed names (else an error
    naming the field): its slide id and targets become file names and model-card fields."""
    meta = dict(meta)
    for name, kind, low in (("tile_px", int, 1), ("mpp", float, 0.0)):
        value = meta[name]
        try:
            number = kind(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or not math.isfinite(number) or number <= low - (kind is int):
            raise LabelTableError(
                f"{side}: {name} {value!r} is not a positive {kind.__name__}; write the grid "
                "the tiles were cut at (tile side in px, µm/px)"
            )
        meta[name] = number
    if not isinstance(meta["targets"], list) or not meta["targets"]:
        raise LabelTableError(f"{side}: targets must be a non-empty list of names")
    try:
        check_name(meta["slide_id"], "slide_id", str(side))
        for target in meta["targets"]:
            check_name(target, "target", str(side))
        check_distinct(meta["targets"], "target", str(side))
    except UnsafeNameError as e:
        raise LabelTableError(str(e)) from None
    return meta


def _numbers(path: Path, name: str, cells: list[str], *, blank_ok: bool) -> np.ndarray:
    out = np.empty(len(cells), np.float64)
    for i, cell in enumerate(cells):
        cell = cell.strip()
        if not cell and blank_ok:
            out[i] = np.nan
            continue
        try:
            out[i] = float(cell)
        except ValueError:
            raise LabelTableError(
                f"{path}: line {i + 2}: column {name!r} holds {cell!r}, not a number"
            ) from None
        if np.isinf(out[i]) or (np.isnan(out[i]) and not blank_ok):
            raise LabelTableError(
                f"{path}: line {i + 2}: column {name!r} holds {cell!r}; give a finite number"
                + (" (blank = unknown)" if blank_ok else "")
            )
    return out


def _check_duplicates(path: Path, xy: np.ndarray, values: np.ndarray) -> None:
    """Refuse a tile listed twice with different labels (which one would be learned?)."""
    if len(xy) < 2:
        return
    _, first, inverse = np.unique(xy, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    for row in np.flatnonzero(first[inverse] != np.arange(len(xy))):
        other = first[inverse[row]]
        a, b = values[other], values[row]
        if not np.array_equal(a, b, equal_nan=True):
            x, y = (int(v) for v in xy[row])
            raise LabelTableError(
                f"{path}: lines {other + 2} and {row + 2} both list the tile at x {x}, y {y} "
                "with different labels; keep one row per tile"
            )


def read_label_table(path: str | Path) -> LabelTable:
    """Read a tile-label table (``<slide_id>.labels.csv``) and its sidecar JSON.

    Parameters
    ----------
    path
        The table's CSV; its sidecar ``.labels.json`` must lie beside it.

    Returns
    -------
    LabelTable
        Level-0 ``xy_l0``, one column per target (NaN = unknown), optional weights and
        validity, and the sidecar's tile px, µm/px, source and provenance.

    Raises
    ------
    LabelTableError
        The CSV or sidecar is missing or malformed; the message names the file and what is
        wrong.

    Examples
    --------
    >>> table = cscvision.read_label_table("labels/S01.labels.csv")
    >>> table.targets, table.tile_px, table.mpp
    """
    path = Path(path)
    meta = _read_sidecar(path)
    targets = tuple(str(t) for t in meta["targets"])
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise LabelTableError(f"{path}: cannot read the tile-label table ({e})") from None
    if not rows:
        raise LabelTableError(f"{path}: empty file; the header x,y,{','.join(targets)} is needed")
    header, body = [h.strip() for h in rows[0]], rows[1:]
    missing = [c for c in ("x", "y", *targets) if c not in header]
    if missing:
        raise LabelTableError(
            f"{path}: column(s) {missing} missing; the sidecar names the targets {list(targets)}"
        )
    short = next((i for i, r in enumerate(body) if len(r) < len(header)), None)
    if short is not None:
        raise LabelTableError(f"{path}: line {short + 2} has fewer cells than the header")
    cols = {name: [r[k] for r in body] for k, name in enumerate(header)}
    xy = np.stack([_numbers(path, c, cols[c], blank_ok=False) for c in ("x", "y")], axis=1)
    if len(xy) and (xy != np.round(xy)).any():
        raise LabelTableError(f"{path}: x and y must be integer level-0 pixels")
    values = np.stack([_numbers(path, t, cols[t], blank_ok=True) for t in targets], axis=1)
    _check_duplicates(path, xy.reshape(-1, 2), values.reshape(len(body), len(targets)))
    weight = _numbers(path, "weight", cols["weight"], blank_ok=False) if "weight" in cols else None
    if weight is not None and len(bad := np.flatnonzero(~(np.isfinite(weight) & (weight >= 0)))):
        raise LabelTableError(
            f"{path}: line {bad[0] + 2}: weight {cols['weight'][bad[0]].strip()!r} must be a "
            "finite number ≥ 0 (a tile's share of the training loss; 0 = not learned from)"
        )
    valid = _numbers(path, "valid", cols["valid"], blank_ok=False) if "valid" in cols else None
    return LabelTable(
        slide_id=str(meta["slide_id"]),
        xy_l0=xy.astype(np.int64).reshape(-1, 2),
        targets=targets,
        values=values.astype(np.float32).reshape(len(body), len(targets)),
        tile_px=int(meta["tile_px"]),
        mpp=float(meta["mpp"]),
        source=str(meta["source"]),
        weight=None if weight is None else weight.astype(np.float32),
        valid=None if valid is None else valid.astype(bool),
        provenance=dict(meta.get("provenance") or {}),
        label_targets=tuple(declared_targets(meta)) if meta.get("label_targets") else None,
    )

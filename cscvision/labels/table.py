"""The tile-label table: one per slide, the contract between label builders and ``train``.

``<dir>/<slide_id>.labels.csv`` holds ``x, y`` (level-0 top-left of each tile), one column per
target (a soft fraction in [0, 1] or a continuous score; empty = unknown), then optional
``weight`` and ``valid`` (1/0). Its sidecar ``<slide_id>.labels.json`` says the tile side in
pixels at ``mpp`` µm/px, the source (annotations / ihc / st / ...) and how it was made.
Every label builder writes it; ``train`` reads it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cscvision import __version__
from cscvision.core.io import read_csv, write_csv, write_json

SUFFIX = ".labels.csv"
_RESERVED = ("x", "y", "weight", "valid")


class LabelTableError(ValueError):
    """A tile-label table or sidecar that cannot be read; the message names the file."""


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
    provenance: dict = field(default_factory=dict)  # how it was made (inputs, digests, parameters)

    def __post_init__(self) -> None:
        n = len(self.xy_l0)
        if np.shape(self.xy_l0) != (n, 2) or np.shape(self.values) != (n, len(self.targets)):
            raise ValueError(
                f"{self.slide_id}: xy_l0 must be [N, 2] and values [N, {len(self.targets)}], "
                f"got {np.shape(self.xy_l0)} and {np.shape(self.values)}"
            )
        for name in ("weight", "valid"):
            value = getattr(self, name)
            if value is not None and np.shape(value) != (n,):
                raise ValueError(f"{self.slide_id}: {name} must have one value per tile")
        clash = sorted(set(self.targets) & set(_RESERVED))
        if clash or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"{self.slide_id}: target names must be distinct and not {clash}")

    def __len__(self) -> int:
        return len(self.xy_l0)


def sidecar_path(path: str | Path) -> Path:
    """``<dir>/<slide_id>.labels.json`` beside ``<dir>/<slide_id>.labels.csv``."""
    path = Path(path)
    name = path.name[: -len(".csv")] if path.name.endswith(".csv") else path.stem
    return path.with_name(f"{name}.json")


def table_path(folder: str | Path, slide_id: str) -> Path:
    return Path(folder) / f"{slide_id}{SUFFIX}"


def _cell(value: float) -> str:
    return "" if math.isnan(value) else format(float(value), ".9g")  # exact for float32


def write_label_table(path: str | Path, table: LabelTable) -> Path:
    """Write the CSV at ``path`` (``<dir>/<slide_id>.labels.csv``) and its JSON sidecar."""
    path = Path(path)
    header = ["x", "y", *table.targets]
    columns = [np.asarray(table.xy_l0, np.int64), np.asarray(table.values, np.float32)]
    if table.weight is not None:
        header.append("weight")
    if table.valid is not None:
        header.append("valid")

    def rows() -> Any:
        for i in range(len(table)):
            row: list[Any] = [int(columns[0][i, 0]), int(columns[0][i, 1])]
            row += [_cell(v) for v in columns[1][i]]
            if table.weight is not None:
                row.append(_cell(table.weight[i]))
            if table.valid is not None:
                row.append(int(bool(table.valid[i])))
            yield row

    write_csv(path, header, rows())
    write_json(
        sidecar_path(path),
        {
            "slide_id": table.slide_id,
            "targets": list(table.targets),
            "tile_px": int(table.tile_px),
            "mpp": float(table.mpp),
            "source": table.source,
            "provenance": table.provenance,
            "cscvision_version": __version__,
            "n_tiles": len(table),
        },
    )
    return path


def _read_sidecar(path: Path) -> dict[str, Any]:
    side = sidecar_path(path)
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LabelTableError(
            f"{path}: its sidecar {side.name} is missing; write tables with "
            "cscvision.labels.table.write_label_table (or a cscvision labels command)"
        ) from None
    except (OSError, json.JSONDecodeError) as e:
        raise LabelTableError(f"{side}: not a readable JSON sidecar ({e})") from None
    missing = sorted({"slide_id", "targets", "tile_px", "mpp", "source"} - set(meta))
    if missing:
        raise LabelTableError(f"{side}: the sidecar lacks key(s) {missing}")
    return meta


def _column(rows: list[dict[str, str]], name: str, path: Path, dtype: Any) -> np.ndarray:
    out = np.empty(len(rows), dtype)
    for line, row in enumerate(rows, start=2):
        text = (row.get(name) or "").strip()
        try:
            out[line - 2] = float("nan") if text == "" and dtype is np.float32 else float(text)
        except ValueError:
            raise LabelTableError(
                f"{path}: line {line}: column {name!r} has {text!r}, not a number"
            ) from None
    return out


def read_label_table(path: str | Path) -> LabelTable:
    """The table at ``path`` and its sidecar; errors name the file and what is wrong."""
    path = Path(path)
    meta = _read_sidecar(path)
    try:
        rows = read_csv(path)
        with path.open(encoding="utf-8-sig") as f:
            header = f.readline().strip().split(",")
    except (OSError, UnicodeDecodeError) as e:
        raise LabelTableError(f"{path}: cannot read the tile-label table ({e})") from None
    targets = tuple(meta["targets"])
    missing = [c for c in ("x", "y", *targets) if c not in header]
    if missing:
        raise LabelTableError(
            f"{path}: lacks column(s) {missing}; expected x,y,{','.join(targets)}"
            "[,weight][,valid] as its sidecar lists"
        )
    xy = np.stack([_column(rows, c, path, np.float64) for c in ("x", "y")], axis=1)
    if len(xy) and (np.isnan(xy).any() or (xy != np.round(xy)).any()):
        raise LabelTableError(f"{path}: x and y must be whole level-0 pixel coordinates")
    values = np.stack([_column(rows, t, path, np.float32) for t in targets], axis=1)
    weight = _column(rows, "weight", path, np.float32) if "weight" in header else None
    valid = _column(rows, "valid", path, np.float64) != 0 if "valid" in header else None
    return LabelTable(
        slide_id=str(meta["slide_id"]),
        xy_l0=xy.astype(np.int64).reshape(-1, 2),
        targets=targets,
        values=values.reshape(len(rows), len(targets)).astype(np.float32),
        tile_px=int(meta["tile_px"]),
        mpp=float(meta["mpp"]),
        source=str(meta["source"]),
        weight=weight,
        valid=valid,
        provenance=dict(meta.get("provenance") or {}),
    )

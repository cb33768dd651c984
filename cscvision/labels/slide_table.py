"""Slide-level label tables: one value per slide (or per patient) for each declared column.

The table is a CSV keyed by ``slide_id`` or by ``patient_id`` (a patient's labels then
apply to each of that patient's slides), with one column per label and optional
covariates. Each label is declared with its target type:

- ``regression``: a continuous value (``mRNAsi``, ``treg_fraction``, ``m2_fraction``);
- ``classification``: one of the declared ``classes`` (``immune_subtype``: C1–C6), or the
  tercile of a continuous column (``tercile_of: mRNAsi`` gives classes low, mid, high,
  cut at the labelled slides' 1/3 and 2/3 quantiles).

Blank cells are missing labels (the slide is left out of that label's loss and metrics).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cscvision.core.errors import CscvisionError

TARGET_TYPES = ("regression", "classification")
TERCILES = ("low", "mid", "high")


class SlideLabelError(CscvisionError, ValueError):
    """A slide-label table or its declaration is wrong; the message names the file/column."""


@dataclass(frozen=True)
class LabelSpec:
    name: str
    target_type: str  # regression | classification
    classes: tuple[str, ...] = ()
    column: str = ""  # the CSV column (default: ``name``)
    tercile_of: str = ""  # classification by terciles of this continuous column

    @property
    def source(self) -> str:
        """The CSV column the label is read from."""
        return self.column or self.tercile_of or self.name

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> LabelSpec:
        key = "target_type" if "target_type" in data else "task"  # "task": 0.1.0's name
        task = data.get(key, "regression")
        if task not in TARGET_TYPES:
            raise SlideLabelError(f"labels.{name}.{key}: {task!r} is not one of {TARGET_TYPES}")
        classes = tuple(str(c) for c in data.get("classes", ()))
        tercile = str(data.get("tercile_of", ""))
        if task == "classification" and not classes and not tercile:
            raise SlideLabelError(f"labels.{name}: a classification label needs `classes` "
                                  "or `tercile_of`")  # fmt: skip
        if tercile:
            classes = TERCILES
        return cls(name, task, classes, str(data.get("column", "")) or (tercile or name), tercile)


@dataclass(frozen=True)
class SlideLabels:
    """Per-slide label values in ``slide_ids`` order: float for regression (NaN = missing),
    class index for classification (-1 = missing)."""

    slide_ids: tuple[str, ...]
    patient_ids: tuple[str, ...]
    specs: tuple[LabelSpec, ...]
    values: dict[str, np.ndarray]
    covariates: dict[str, np.ndarray] = field(default_factory=dict)

    def index(self, slide_id: str) -> int:
        return self.slide_ids.index(slide_id)


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)
    except FileNotFoundError:
        raise SlideLabelError(f"{path}: slide-label table not found") from None


def _number(text: str, path: Path, line: int, column: str) -> float:
    if text.strip() == "":
        return math.nan
    try:
        value = float(text)
    except ValueError:
        where = f"{path}:{line}: column {column!r}"
        raise SlideLabelError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise SlideLabelError(f"{path}:{line}: column {column!r}: {text!r} is not finite")
    return value


def _by_key(path: Path, rows: list[dict[str, str]], key: str, columns: Sequence[str]) -> dict:
    """Key → {column: text}; the same key twice must carry the same values."""
    table: dict[str, dict[str, str]] = {}
    for line, row in enumerate(rows, start=2):
        k = (row.get(key) or "").strip()
        if not k:
            raise SlideLabelError(f"{path}:{line}: empty {key}")
        values = {c: (row.get(c) or "").strip() for c in columns}
        if k in table and table[k] != values:
            diff = [c for c in columns if table[k][c] != values[c]]
            raise SlideLabelError(
                f"{path}:{line}: {key} {k!r} appears twice with different "
                f"labels ({', '.join(diff)}); keep one row per {key}"
            )
        table[k] = values
    return table


def read_slide_labels(
    path: str | Path,
    specs: Sequence[LabelSpec],
    slides: Sequence[tuple[str, str]],
    covariates: Sequence[str] = (),
) -> SlideLabels:
    """Labels of ``slides`` (``(slide_id, patient_id)`` pairs, the cohort) from ``path``."""
    path = Path(path)
    header, rows = _rows(path)
    key = "slide_id" if "slide_id" in header else "patient_id" if "patient_id" in header else ""
    if not key:
        raise SlideLabelError(f"{path}: needs a slide_id or a patient_id column (has {header})")
    columns = sorted({s.source for s in specs} | set(covariates))
    missing = [c for c in columns if c not in header]
    if missing:
        raise SlideLabelError(f"{path}: missing columns {missing} (has {header})")
    table = _by_key(path, rows, key, columns)
    ids = tuple(s for s, _ in slides)
    patients = tuple(p for _, p in slides)
    cells = [table.get(s if key == "slide_id" else p) for s, p in slides]
    unlabelled = [s for s, c in zip(ids, cells, strict=True) if c is None]
    if len(unlabelled) == len(ids):
        raise SlideLabelError(f"{path}: no slide of the cohort has a row (keyed by {key})")
    values = {s.name: _values(s, cells, path) for s in specs}
    cov = {c: np.array([math.nan if r is None else _number(r[c], path, 0, c) for r in cells])
           for c in covariates}  # fmt: skip
    return SlideLabels(ids, patients, tuple(specs), values, cov)


def _values(spec: LabelSpec, cells: list[dict[str, str] | None], path: Path) -> np.ndarray:
    texts = ["" if c is None else c[spec.source] for c in cells]
    if spec.target_type == "regression" or spec.tercile_of:
        numbers = np.array([_number(t, path, 0, spec.source) for t in texts])
        if spec.target_type == "regression":
            return numbers
        return terciles(numbers)
    unknown = sorted({t for t in texts if t and t not in spec.classes})
    if unknown:
        raise SlideLabelError(
            f"{path}: column {spec.source!r} has classes {unknown} that are not "
            f"declared for {spec.name!r} ({list(spec.classes)})"
        )
    index = np.array([spec.classes.index(t) if t else -1 for t in texts])
    unseen = [c for i, c in enumerate(spec.classes) if not (index == i).any()]
    if unseen:
        raise SlideLabelError(
            f"{path}: classes {unseen} of {spec.name!r} occur on no slide of "
            "the cohort; a model cannot learn a class it never sees: drop them"
        )
    return index


def terciles(values: np.ndarray) -> np.ndarray:
    """Class 0/1/2 by the 1/3 and 2/3 quantiles of the finite values; -1 where missing."""
    finite = np.isfinite(values)
    out = np.full(len(values), -1, np.int64)
    if finite.sum() < 3:
        raise SlideLabelError("terciles need at least 3 labelled slides")
    lo, hi = np.quantile(values[finite], [1 / 3, 2 / 3])
    out[finite] = np.digitize(values[finite], [lo, hi], right=True)
    return out


def parse_targets(targets: Any, where: str = "--target") -> list[LabelSpec]:
    """Label declarations from ``NAME[:TASK]`` strings (TASK ``regression``, the default, or
    ``tercile``: classes low/mid/high of NAME's terciles, named ``NAME_tercile``) or from a
    mapping ``{name: {target_type, classes, column, tercile_of}}`` (a config's
    ``mil.targets``; ``task`` is 0.1.0's name of ``target_type``)."""
    if isinstance(targets, Mapping):
        return [LabelSpec.from_dict(str(n), d or {}) for n, d in targets.items()]
    if not targets or isinstance(targets, str):
        raise SlideLabelError(f"{where}: name at least one label column (NAME or NAME:tercile)")
    specs = []
    for text in targets:
        name, _, task = str(text).partition(":")
        if task in ("", "regression"):
            specs.append(LabelSpec(name, "regression"))
        elif task == "tercile":
            specs.append(
                LabelSpec(f"{name}_tercile", "classification", TERCILES, name, tercile_of=name)
            )
        else:
            raise SlideLabelError(f"{where} {text}: TASK is regression or tercile")
    return specs

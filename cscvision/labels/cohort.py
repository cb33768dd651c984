"""Cohort manifest and patient-level train/val/test splits.

The manifest is a CSV with one row per slide: ``slide_path`` and ``patient_id`` (required),
``slide_id`` (default: the file name without extension), ``annotation_path``, ``label_path``
(a tile-label table, see :mod:`cscvision.labels.table`) and ``split`` (optional).
Relative paths are taken from the CSV's folder. Splits are made per patient, so no patient's
slides ever sit on both sides of a train/test boundary.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cscvision.core.errors import CscvisionError
from cscvision.core.io import read_csv, write_csv
from cscvision.core.names import UnsafeNameError, check_name
from cscvision.slides.grid import slide_id_of

if TYPE_CHECKING:
    from cscvision.labels.targets import ClassMap

SPLITS = ("train", "val", "test")


class CohortError(CscvisionError, ValueError):
    """A cohort manifest or split file that cannot be used as it is."""


@dataclass(frozen=True)
class CohortEntry:
    slide_id: str
    patient_id: str
    slide_path: Path
    annotation_path: Path | None = None
    split: str | None = None  # "train", "val" or "test" when the manifest fixes it
    label_path: Path | None = None  # a tile-label table (<slide_id>.labels.csv)


def read_cohort(csv_path: str | Path) -> list[CohortEntry]:
    """The entries of a cohort manifest (CSV).

    Columns: ``slide_path`` and ``patient_id`` (required), ``slide_id``, ``annotation_path``,
    ``label_path`` and ``split`` (optional); paths are relative to the CSV.

    Parameters
    ----------
    csv_path
        The manifest.

    Returns
    -------
    list[CohortEntry]
        One entry per row, paths resolved.

    Raises
    ------
    CohortError
        A missing column, a missing file, a duplicate or unsafe slide id, or a patient in
        two splits; the message names the file and row.

    Examples
    --------
    >>> entries = cscvision.read_cohort("cohort.csv")
    >>> {e.patient_id for e in entries}
    """
    csv_path = Path(csv_path)
    try:
        rows = read_csv(csv_path)
    except (OSError, UnicodeDecodeError) as e:
        raise CohortError(f"{csv_path}: cannot read the cohort manifest ({e})") from None
    if not rows:
        raise CohortError(
            f"{csv_path}: the cohort is empty; add one row per slide with at least the "
            "columns slide_path,patient_id"
        )
    missing = {"slide_path", "patient_id"} - set(rows[0])
    if missing:
        raise CohortError(
            f"{csv_path}: the manifest lacks column(s) {sorted(missing)}; required: "
            "slide_path,patient_id (optional: slide_id,annotation_path,label_path,split)"
        )
    entries = [_entry(row, csv_path, line) for line, row in enumerate(rows, start=2)]
    seen: dict[str, int] = {}
    for line, entry in enumerate(entries, start=2):
        key = entry.slide_id.casefold()  # one file name on macOS and Windows
        if key in seen:
            raise CohortError(
                f"{csv_path}: line {line}: slide id {entry.slide_id!r} already on line "
                f"{seen[key]} (ids that differ only in case name one file); give each "
                "slide a distinct slide_id"
            )
        seen[key] = line
    return entries


def _entry(row: Mapping[str, str | None], csv_path: Path, line: int) -> CohortEntry:
    def cell(name: str) -> str:
        return (row.get(name) or "").strip()

    where = f"{csv_path}: line {line}"
    if not cell("slide_path") or not cell("patient_id"):
        raise CohortError(f"{where}: slide_path and patient_id must not be empty")
    slide_path = _resolve(cell("slide_path"), csv_path.parent)
    if not slide_path.exists():
        raise CohortError(f"{where}: slide {slide_path} not found")
    annotation_path = (
        _resolve(cell("annotation_path"), csv_path.parent) if cell("annotation_path") else None
    )
    if annotation_path is not None and not annotation_path.exists():
        raise CohortError(f"{where}: annotation file {annotation_path} not found")
    label_path = _resolve(cell("label_path"), csv_path.parent) if cell("label_path") else None
    if label_path is not None and not label_path.exists():
        raise CohortError(f"{where}: tile-label table {label_path} not found")
    split = cell("split").lower() or None
    if split is not None and split not in SPLITS:
        raise CohortError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
    slide_id = cell("slide_id")
    if slide_id:
        try:
            check_name(slide_id, "slide_id", where)
        except UnsafeNameError as e:
            raise CohortError(str(e)) from None
    return CohortEntry(
        slide_id=slide_id or slide_id_of(slide_path),
        patient_id=cell("patient_id"),
        slide_path=slide_path,
        annotation_path=annotation_path,
        split=split,
        label_path=label_path,
    )


def _resolve(value: str, folder: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (folder / path).resolve()


# --- splits --------------------------------------------------------------------------------


def check_splittable(entries: Sequence[CohortEntry]) -> None:
    """Raise :class:`CohortError` for a cohort that cannot be split per patient (one patient
    and no ``split`` column): say why, and what to do."""
    patients = sorted({e.patient_id for e in entries})
    fixed = _fixed_splits(entries)
    if len(patients) == 1 and not fixed:
        raise CohortError(
            f"the cohort has one patient ({patients[0]!r}): a patient-level split needs at "
            "least 2 patients (train and validation; 3 with a test split), since slides of one "
            "patient on both sides would leak. Add patients, or set a split column in the "
            "cohort CSV to decide each slide's split yourself"
        )


def split_by_patient(
    entries: Sequence[CohortEntry],
    *,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    strata: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Assign every slide to ``train``/``val``/``test`` so that each patient sits in one split.

    Patients are drawn at random (seeded, independent of row order) in proportion to
    ``fractions`` within each stratum of ``strata`` (patient id → label, e.g. which targets
    the patient's slides are annotated with; patients missing from it share one stratum).
    A stratum with at least as many patients as splits puts one in each; with ≥ 3 patients
    every split with a positive fraction gets at least one. Entries whose manifest gives a
    split keep it, and the patient's other slides follow it. Returns slide id → split.
    """
    weights = _fractions(fractions)
    fixed = _fixed_splits(entries)
    patients = sorted({e.patient_id for e in entries})
    strata = strata or {}
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for p in patients:
        by_stratum[str(strata.get(p, ""))].append(p)
    rng = np.random.default_rng(seed)
    assigned = dict(fixed)
    carry = np.zeros(len(SPLITS))  # rounding error handed on, so the totals follow fractions
    for stratum in sorted(by_stratum):
        members = by_stratum[stratum]
        free = [p for p in members if p not in fixed]
        pre = np.array([sum(fixed.get(p) == s for p in members) for s in SPLITS])
        ideal = len(members) * weights + carry
        want = _stratum_wants(ideal, len(members), weights)
        carry = ideal - want
        need = np.maximum(want - pre, 0).astype(np.float64)
        counts = _apportion(len(free), need if need.sum() > 0 else weights)
        order = rng.permutation(len(free))
        labels = np.repeat(np.arange(len(SPLITS)), counts)
        for i, k in zip(order, labels, strict=True):
            assigned[free[i]] = SPLITS[k]
    _fill_empty_splits(assigned, set(fixed), weights)
    return {e.slide_id: assigned[e.patient_id] for e in entries}


def _fractions(fractions: Sequence[float]) -> np.ndarray:
    w = np.asarray(fractions, dtype=np.float64)
    if w.shape != (3,) or (w < 0).any() or w.sum() <= 0 or w[0] <= 0:
        raise ValueError(
            f"fractions must be 3 non-negative numbers with train > 0, got {fractions}"
        )
    return w / w.sum()


def _fixed_splits(entries: Sequence[CohortEntry]) -> dict[str, str]:
    fixed: dict[str, str] = {}
    for e in entries:
        if e.split is None:
            continue
        if fixed.setdefault(e.patient_id, e.split) != e.split:
            raise CohortError(
                f"patient {e.patient_id!r} has slides in splits {fixed[e.patient_id]!r} and "
                f"{e.split!r} in the manifest; one patient must stay in one split"
            )
    return fixed


def _apportion(n: int, weights: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``n`` in proportion to ``weights`` (largest remainder)."""
    weights = np.clip(weights, 0, None)
    if weights.sum() <= 0:
        weights = np.ones(len(weights))
    ideal = n * weights / weights.sum()
    counts = np.floor(ideal).astype(np.int64)
    remainder = ideal - counts
    for k in sorted(range(len(weights)), key=lambda k: (-remainder[k], k))[: n - counts.sum()]:
        counts[k] += 1
    return counts


def _stratum_wants(ideal: np.ndarray, n: int, weights: np.ndarray) -> np.ndarray:
    """Patients of an ``n``-patient stratum per split: ``ideal`` rounded, one per active split
    where the stratum has enough patients."""
    active = weights > 0
    want = _apportion(n, np.where(active, ideal, 0))
    if n >= active.sum():
        while (want[active] == 0).any():
            want[np.argmax(want)] -= 1
            want[np.flatnonzero(active & (want == 0))[0]] += 1
    return want


def _fill_empty_splits(assigned: dict[str, str], fixed: set[str], weights: np.ndarray) -> None:
    """With ≥ 3 patients, move one free patient into each empty split that should have some."""
    if len(assigned) < 3:
        return
    for k, split in enumerate(SPLITS):
        members = {s: sorted(p for p, v in assigned.items() if v == s) for s in SPLITS}
        if weights[k] <= 0 or members[split]:
            continue
        donors = [s for s in SPLITS if len([p for p in members[s] if p not in fixed]) > 1]
        if not donors:
            continue
        donor = max(donors, key=lambda s: len(members[s]))
        movable = [p for p in members[donor] if p not in fixed]
        assigned[movable[-1]] = split


def annotation_strata(
    entries: Sequence[CohortEntry], class_map: ClassMap | None = None
) -> dict[str, str]:
    """Patient id → the sorted targets annotated on any of the patient's slides (``"none"``
    if none), for stratifying :func:`split_by_patient`. Reads each annotation file once."""
    from cscvision.labels.annotations import DEFAULT_CLASS_MAP, read_annotations

    class_map = class_map or DEFAULT_CLASS_MAP
    found: dict[str, set[str]] = {}
    for e in entries:
        targets = found.setdefault(e.patient_id, set())
        if e.annotation_path is None or e.annotation_path.suffix.lower() == ".csv":
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unclassified regions: reported when training
            regions = read_annotations(e.annotation_path)
        targets |= {t for r in regions if (t := class_map.target_of(r.name))}
    return {p: "+".join(sorted(t)) or "none" for p, t in found.items()}


def with_splits(entries: Sequence[CohortEntry], splits: Mapping[str, str]) -> list[CohortEntry]:
    """The entries with their ``split`` set from ``splits`` (slide id → split)."""
    missing = [e.slide_id for e in entries if e.slide_id not in splits]
    if missing:
        raise CohortError(f"no split for slide(s) {missing[:5]}; re-run the split")
    return [dataclasses.replace(e, split=splits[e.slide_id]) for e in entries]


def write_splits(
    path: str | Path, entries: Sequence[CohortEntry], splits: Mapping[str, str]
) -> Path:
    """Write ``slide_id,patient_id,split`` rows (atomically)."""
    rows = [(e.slide_id, e.patient_id, splits[e.slide_id]) for e in with_splits(entries, splits)]
    return write_csv(path, ["slide_id", "patient_id", "split"], rows)


def read_splits(path: str | Path) -> dict[str, str]:
    """Slide id → split from a file written by :func:`write_splits`."""
    path = Path(path)
    try:
        rows = read_csv(path)
    except (OSError, UnicodeDecodeError) as e:
        raise CohortError(f"{path}: cannot read the split file ({e})") from None
    if rows and not {"slide_id", "split"} <= set(rows[0]):
        raise CohortError(f"{path}: a split file needs the columns slide_id,split")
    splits: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        split = (row["split"] or "").strip().lower()
        if split not in SPLITS:
            raise CohortError(f"{path}: line {line}: split {split!r} is not one of {SPLITS}")
        splits[row["slide_id"].strip()] = split
    return splits

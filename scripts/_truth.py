"""The truth of a cohort for the evaluation scripts: a ``cscvision synth`` cohort's own
files (the built-in path), or the documented layout under ``COHORT/truth/`` that a cohort
made elsewhere carries (:mod:`cscvision.labels.cohort_truth`), and the writer that puts a
synthetic cohort's truth in that layout (``--write-truth``), so both paths can be compared.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from cscvision.core.io import read_csv
from cscvision.labels.cohort_truth import (
    TruthTable,
    read_slide_truth,
    read_spot_truth,
    write_slide_truth,
    write_spot_truth,
    write_tile_truth,
)

TARGETS = ("stemness", "immunosuppressive")
TRUTH_CLASS = {"stemness": "Stemness-rich", "immunosuppressive": "Immunosuppressive"}

SpotTruthOf = Callable[[str], TruthTable]


def synth_slide_truth(cohort_csv: Path) -> TruthTable:
    """Each slide's true share of tissue per target, from synth's ``<slide_id>_truth.json``."""
    ids = [r["slide_id"] for r in read_csv(cohort_csv)]
    values = np.zeros((len(ids), len(TARGETS)))
    for i, sid in enumerate(ids):
        truth = json.loads((cohort_csv.parent / f"{sid}_truth.json").read_text(encoding="utf-8"))
        shares = truth["fraction_of_tissue"]
        values[i] = [shares.get(TRUTH_CLASS[t], 0.0) for t in TARGETS]
    return TruthTable(cohort_csv, np.array(ids), TARGETS, values)


def synth_spot_truth(cohort_csv: Path) -> SpotTruthOf:
    """slide id -> its spots' true fractions, from synth's ``<id>_visium/spot_truth.csv``."""
    st_paths = {r["slide_id"]: r["st_path"] for r in read_csv(cohort_csv)}

    def truth_of(slide_id: str) -> TruthTable:
        path = (cohort_csv.parent / st_paths[slide_id]).parent / "spot_truth.csv"
        rows = read_csv(path)
        values = np.array([[float(r[f"{t}_fraction"]) for t in TARGETS] for r in rows])
        return TruthTable(path, np.array([r["barcode"] for r in rows]), TARGETS, values)

    return truth_of


def layout_spot_truth(cohort_dir: Path) -> SpotTruthOf:
    """slide id -> its spots' true fractions, from ``COHORT/truth/spots/<slide_id>.csv``."""
    return lambda slide_id: read_spot_truth(cohort_dir, slide_id)


def layout_slide_truth(cohort_dir: Path) -> TruthTable:
    return read_slide_truth(cohort_dir)


def write_synth_truth(
    cohort_csv: Path,
    tile_truth: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    tile_targets: tuple[str, ...] = ("stemness",),
) -> Path:
    """Write a synthetic cohort's truth under ``<cohort>/truth/``: slide shares, spot
    fractions where the cohort has Visium folders, and ``tile_truth`` ({slide id: (xy_l0
    int[N, 2], values float[N, T])}) where given. Returns the truth folder."""
    folder = cohort_csv.parent
    slides = synth_slide_truth(cohort_csv)
    write_slide_truth(folder, TARGETS, dict(zip(slides.keys, slides.values, strict=True)))
    rows = read_csv(cohort_csv)
    if rows and "st_path" in rows[0]:
        spots = synth_spot_truth(cohort_csv)
        for r in rows:
            table = spots(r["slide_id"])
            write_spot_truth(folder, r["slide_id"], table.keys, TARGETS, table.values)
    for slide_id, (xy, values) in (tile_truth or {}).items():
        write_tile_truth(
            folder, slide_id, xy, tile_targets, np.asarray(values).reshape(len(xy), -1)
        )
    return folder / "truth"


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r over the pairs where both are finite (NaN with fewer than 3 or no spread)."""
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])

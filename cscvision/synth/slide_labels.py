"""Synthetic slide-level labels from a cohort's ground truth (for MIL tests and the demo).

Each slide's label is its true stemness-rich (and immunosuppressive) fraction of tissue,
from ``<slide_id>_truth.json``, plus Gaussian noise standing in for the measurement error
of a bulk omics score; a tercile class can be declared on top (``tercile_of``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cscvision.core.io import read_csv, write_csv

SLIDE_LABELS = "slide_labels.csv"
COLUMNS = ("stemness_fraction", "immunosuppressive_fraction")
_TRUTH_CLASS = {
    "stemness_fraction": "Stemness-rich",
    "immunosuppressive_fraction": "Immunosuppressive",
}


def write_slide_labels(cohort_csv: str | Path, *, noise_sd: float = 0.02, seed: int = 0) -> Path:
    """``slide_labels.csv`` beside ``cohort_csv``: slide_id, patient_id, and per column the
    true fraction of tissue plus N(0, noise_sd) noise (clipped at 0)."""
    cohort_csv = Path(cohort_csv)
    rng = np.random.default_rng(seed)
    rows = []
    for entry in read_csv(cohort_csv):
        truth_path = cohort_csv.parent / f"{entry['slide_id']}_truth.json"
        fractions = json.loads(truth_path.read_text(encoding="utf-8"))["fraction_of_tissue"]
        values = [max(0.0, fractions.get(_TRUTH_CLASS[c], 0.0) + rng.normal(0, noise_sd))
                  for c in COLUMNS]  # fmt: skip
        rows.append([entry["slide_id"], entry["patient_id"], *(f"{v:.5f}" for v in values)])
    return write_csv(cohort_csv.parent / SLIDE_LABELS, ["slide_id", "patient_id", *COLUMNS], rows)

"""Synthetic slide-level labels from a cohort's ground truth (for MIL tests and the demo).

Each slide's label is its true stemness-rich (and immunosuppressive) fraction of tissue,
from ``<slide_id>_truth.json``, plus Gaussian noise standing in for the measurement error
of a bulk omics score, and the tercile class of the noisy stemness value (``low``/``mid``/
``high``, cut at the cohort's 1/3 and 2/3 quantiles) standing in for a subtype call.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cscvision.core.io import read_csv, write_csv

SLIDE_LABELS = "slide_labels.csv"
COLUMNS = ("stemness_fraction", "immunosuppressive_fraction")
TERCILE_COLUMN = "stemness_tercile"
_TRUTH_CLASS = {
    "stemness_fraction": "Stemness-rich",
    "immunosuppressive_fraction": "Immunosuppressive",
}


def write_slide_labels(cohort_csv: str | Path, *, noise_sd: float = 0.02, seed: int = 0) -> Path:
    """``slide_labels.csv`` beside ``cohort_csv``: slide_id, patient_id, per column the true
    fraction of tissue plus N(0, noise_sd) noise (clipped at 0), and the stemness tercile."""
    cohort_csv = Path(cohort_csv)
    rng = np.random.default_rng(seed)
    entries = read_csv(cohort_csv)
    values = np.zeros((len(entries), len(COLUMNS)))
    for i, entry in enumerate(entries):
        truth_path = cohort_csv.parent / f"{entry['slide_id']}_truth.json"
        fractions = json.loads(truth_path.read_text(encoding="utf-8"))["fraction_of_tissue"]
        for j, c in enumerate(COLUMNS):
            values[i, j] = max(0.0, fractions.get(_TRUTH_CLASS[c], 0.0) + rng.normal(0, noise_sd))
    rounded = np.round(values, 5)  # the tercile of the value as written
    lo, hi = np.quantile(rounded[:, 0], [1 / 3, 2 / 3]) if len(entries) else (0.0, 0.0)
    classes = np.array(["low", "mid", "high"])[np.digitize(rounded[:, 0], [lo, hi], right=True)]
    rows = [
        [e["slide_id"], e["patient_id"], *(f"{v:.5f}" for v in row), cls]
        for e, row, cls in zip(entries, rounded, classes, strict=True)
    ]
    header = ["slide_id", "patient_id", *COLUMNS, TERCILE_COLUMN]
    return write_csv(cohort_csv.parent / SLIDE_LABELS, header, rows)

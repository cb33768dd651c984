"""Cohort statistics over a batch's ``summary.json`` files (``cscvision stats OUT_DIR``).

* The **slide table**: one row per complete slide, the per-slide figures of ``results.csv``
  plus the patient (from a cohort manifest; without one each slide is its own patient).
* **Tests across patients** (a patient's slides are averaged first, so a patient with many
  slides does not count many times):

  - ``fraction_association``: Spearman's ρ between the stemness and immunosuppressive
    fractions of tissue, its p-value, and a percentile bootstrap CI of ρ over patients
    (patients resampled with replacement, seeded).
  - ``<figure>_z`` for each co-localisation figure: is the per-patient z against the
    slide's own permutation null shifted from 0? Wilcoxon signed-rank, two-sided; the
    median z says the direction.

  Each test is ``None`` (undefined) with fewer than ``MIN_PATIENTS`` patients, and all
  tests of one run share a Benjamini–Hochberg FDR correction (``q``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cscvision.core.errors import CscvisionError
from cscvision.outputs.summary import NULL_STATISTICS, result_row

MIN_PATIENTS = 5
BOOTSTRAP = 2000
CI_LEVEL = 0.95


class StatsError(CscvisionError, ValueError):
    """An output folder that holds no statistics to tabulate."""


def read_summaries(out_dir: str | Path, skipped: list[str] | None = None) -> list[dict[str, Any]]:
    """Every ``OUT/<slide_id>/summary.json`` (complete slides), sorted by slide id; an
    unreadable one is left out with a line in ``skipped``; summaries of models with
    different targets are refused (:func:`~cscvision.outputs.read.check_one_model`)."""
    from cscvision.outputs.read import OutputsError, check_one_model, read_summary_files

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise StatsError(f"{out_dir}: no such folder; give the --out folder of cscvision infer")
    found, unread = read_summary_files(out_dir)
    if skipped is not None:
        skipped.extend(unread)
    found = [f for f in found if f.summary.get("status") == "complete"]
    try:
        check_one_model(found)
    except OutputsError as e:
        raise StatsError(str(e)) from None
    summaries = [f.summary for f in found]
    if not summaries:
        raise StatsError(
            f"{out_dir}: no complete slide (no <slide_id>/summary.json); run cscvision infer "
            "--out there first"
        )
    return summaries


def read_patients(manifest: str | Path) -> dict[str, str]:
    """slide id → patient id from a cohort manifest (``patient_id``, and ``slide_id`` or
    ``slide_path``); the slides themselves need not be on this machine."""
    from cscvision.core.io import read_csv
    from cscvision.slides.grid import slide_id_of

    try:
        rows = read_csv(manifest)
    except OSError as e:
        raise StatsError(f"{manifest}: cannot read the cohort manifest ({e})") from None
    if not rows or "patient_id" not in rows[0]:
        raise StatsError(f"{manifest}: a cohort manifest needs a patient_id column")
    if "slide_id" not in rows[0] and "slide_path" not in rows[0]:
        raise StatsError(f"{manifest}: a cohort manifest needs slide_id or slide_path")
    return {(r.get("slide_id") or slide_id_of(r["slide_path"])): r["patient_id"] for r in rows}


def slide_table(
    summaries: Sequence[dict[str, Any]], patients: Mapping[str, str] | None = None
) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows of the per-slide table (``results.csv`` columns plus ``patient_id``)."""
    from cscvision.outputs.summary import result_columns

    targets = list(summaries[0]["targets"])
    within_um = (summaries[0].get("niche") or {}).get("within_um", 100.0)
    columns = [c for c in result_columns(targets, within_um) if c not in ("seconds", "error")]
    columns.insert(1, "patient_id")
    rows = []
    for summary in summaries:
        row = result_row(summary, targets)
        row["patient_id"] = (patients or {}).get(summary["slide_id"], summary["slide_id"])
        rows.append({c: row.get(c, "") for c in columns})
    return columns, rows


def _per_patient(rows: Sequence[dict[str, Any]], column: str) -> dict[str, float]:
    values: dict[str, list[float]] = {}
    for row in rows:
        value = row.get(column)
        if value not in ("", None) and np.isfinite(float(value)):
            values.setdefault(str(row["patient_id"]), []).append(float(value))
    return {p: float(np.mean(v)) for p, v in values.items()}


def spearman_with_ci(x: np.ndarray, y: np.ndarray, *, seed: int = 0) -> dict[str, Any]:
    """Spearman's ρ, its p, and a percentile bootstrap CI over the paired units."""
    from scipy import stats

    n = len(x)
    out: dict[str, Any] = {"n_patients": n, "rho": None, "p": None, "ci": None}
    if n < MIN_PATIENTS or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out | {"undefined": f"needs ≥ {MIN_PATIENTS} patients with varying values"}
    rho, p = stats.spearmanr(x, y)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, (BOOTSTRAP, n))
    with warnings.catch_warnings():  # a resample of tied values has no ρ: dropped below
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        boot = np.array([stats.spearmanr(x[d], y[d])[0] for d in draws])
    boot = boot[np.isfinite(boot)]
    tail = (1 - CI_LEVEL) / 2 * 100
    ci = [float(np.percentile(boot, tail)), float(np.percentile(boot, 100 - tail))]
    return out | {"rho": float(rho), "p": float(p), "ci": ci, "ci_level": CI_LEVEL}


def z_shift_test(z: np.ndarray) -> dict[str, Any]:
    """Wilcoxon signed-rank test of per-patient z against 0 (two-sided)."""
    from scipy import stats

    out: dict[str, Any] = {"n_patients": len(z), "median_z": None, "p": None}
    if len(z) < MIN_PATIENTS:
        return out | {"undefined": f"needs ≥ {MIN_PATIENTS} patients"}
    if np.all(z == 0):
        return out | {"median_z": 0.0, "p": 1.0}
    return out | {"median_z": float(np.median(z)), "p": float(stats.wilcoxon(z).pvalue)}


def cohort_tests(rows: Sequence[dict[str, Any]], targets: Sequence[str]) -> dict[str, Any]:
    """Every cohort-level test of the slide table, with BH-FDR q-values across them."""
    from statsmodels.stats.multitest import multipletests

    tests: dict[str, Any] = {}
    if len(targets) >= 2:
        a = _per_patient(rows, f"{targets[0]}_fraction")
        b = _per_patient(rows, f"{targets[1]}_fraction")
        both = sorted(set(a) & set(b))
        x, y = np.array([a[p] for p in both]), np.array([b[p] for p in both])
        tests["fraction_association"] = spearman_with_ci(x, y)
        for name in NULL_STATISTICS:
            z = _per_patient(rows, f"{name}_z")
            tests[f"{name}_z"] = z_shift_test(np.array(list(z.values())))
    tested = [k for k, t in tests.items() if t.get("p") is not None]
    if tested:
        q = multipletests([tests[k]["p"] for k in tested], method="fdr_bh")[1]
        for k, value in zip(tested, q, strict=True):
            tests[k]["q"] = float(value)
    return {"fdr": "Benjamini-Hochberg over the tests with a p-value", "tests": tests}

"""Patient-level k-fold cross-validation of attention MIL, with pooled metrics and
bootstrap confidence intervals over patients.

Folds split patients, never slides of one patient. Each fold's model is trained on the
other folds (regression targets standardised with those slides' mean and sd) and predicts
its held-out patients; the held-out predictions of all folds are pooled, and every metric
is reported per fold and pooled with a 95 % percentile bootstrap interval that resamples
patients (a patient's slides move together).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from cscvision.core.io import write_csv, write_json
from cscvision.core.names import child
from cscvision.labels.slide_table import SlideLabels
from cscvision.training.mil import (
    Bag,
    BagPrediction,
    BagTargets,
    MILConfig,
    MILError,
    attention_scale,
    fit_mil,
    predict_bags,
)
from cscvision.training.regression import bootstrap_ci as group_bootstrap_ci
from cscvision.training.regression import pearson

BOOTSTRAP = 1000


def patient_folds(patients: Sequence[str], k: int, seed: int = 0) -> np.ndarray:
    """Fold index of each slide; a patient's slides share one. Patients are shuffled (seeded)
    and dealt round-robin, so fold sizes differ by at most one patient."""
    unique = sorted(set(patients))
    if len(unique) < k:
        raise MILError(f"cv.folds {k}: only {len(unique)} patients; use at most that many")
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of = {unique[p]: i % k for i, p in enumerate(order)}
    return np.array([fold_of[p] for p in patients])


def _varies(y: np.ndarray, p: np.ndarray) -> bool:
    return len(y) > 2 and np.std(y) > 0 and np.std(p) > 0


def _spearman(y: np.ndarray, p: np.ndarray) -> float:
    return float(stats.spearmanr(y, p)[0]) if _varies(y, p) else math.nan


def _r2(y: np.ndarray, p: np.ndarray) -> float:
    ss = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - p) ** 2).sum()) / ss if ss > 0 else math.nan


def _auroc(y: np.ndarray, probs: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    present = np.unique(y)
    if len(present) < 2:
        return math.nan
    if probs.shape[1] == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    if len(present) < probs.shape[1]:
        return math.nan
    return float(roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def _balanced_accuracy(y: np.ndarray, probs: np.ndarray) -> float:
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    if not len(y):
        return math.nan
    with warnings.catch_warnings():  # a resample may lack a predicted class: still defined
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(y, probs.argmax(1)))


REGRESSION_METRICS: dict[str, Callable] = {"pearson": pearson, "spearman": _spearman, "r2": _r2}
CLASSIFICATION_METRICS: dict[str, Callable] = {
    "auroc": _auroc,
    "balanced_accuracy": _balanced_accuracy,
}


def bootstrap_ci(
    metric: Callable,
    y: np.ndarray,
    p: np.ndarray,
    patients: np.ndarray,
    seed: int = 0,
    n: int = BOOTSTRAP,
) -> tuple[float, float]:
    """95 % percentile interval of ``metric(y, p)`` over resamples of patients; NaN when
    fewer than half the resamples give a value."""
    return group_bootstrap_ci(
        p, y, np.asarray(patients), lambda pred, target: metric(target, pred),
        n_boot=n, seed=seed, min_valid=n // 2,
    )  # fmt: skip


@dataclass(frozen=True)
class CVResult:
    folds: np.ndarray  # fold of each slide
    predictions: list[BagPrediction]  # held-out, in bag order (regression in label units)
    per_fold: list[dict[str, float]]
    pooled: dict[str, Any]  # metric -> {"value", "ci95"}


def _standardise(
    targets: BagTargets, train: np.ndarray
) -> tuple[BagTargets, np.ndarray, np.ndarray]:
    reg = targets.regression
    mean = np.nanmean(reg[train], axis=0) if reg.size else np.zeros(0)
    sd = np.nanstd(reg[train], axis=0) if reg.size else np.ones(0)
    sd = np.where(sd > 0, sd, 1.0)
    return replace(targets, regression=(reg - mean) / sd), mean, sd


def _subset(targets: BagTargets, rows: np.ndarray) -> BagTargets:
    cov = targets.covariates[rows] if targets.covariates.size else targets.covariates
    return replace(
        targets,
        regression=targets.regression[rows],
        classification=targets.classification[rows],
        covariates=cov,
    )


def targets_from_labels(labels: SlideLabels, covariates: Sequence[str] = ()) -> BagTargets:
    reg = [labels.values[s.name] for s in labels.specs if s.target_type == "regression"]
    cls = [labels.values[s.name] for s in labels.specs if s.target_type == "classification"]
    n = len(labels.slide_ids)
    cov = [labels.covariates[c] for c in covariates]
    return BagTargets(
        regression=np.stack(reg, 1).astype(np.float64) if reg else np.zeros((n, 0)),
        classification=np.stack(cls, 1).astype(np.int64) if cls else np.zeros((n, 0), np.int64),
        n_classes=tuple(len(s.classes) for s in labels.specs if s.target_type == "classification"),
        covariates=np.stack(cov, 1) if cov else np.zeros((0, 0)),
    )


def _metrics(labels: SlideLabels, preds: list[BagPrediction], rows: np.ndarray) -> dict:
    out: dict[str, tuple[Callable, np.ndarray, np.ndarray]] = {}
    r = c = 0
    for spec in labels.specs:
        y = labels.values[spec.name][rows]
        if spec.target_type == "regression":
            p = np.array([preds[i].regression[r] for i in rows])
            known = np.isfinite(y)
            for m, fn in REGRESSION_METRICS.items():
                out[f"{m}_{spec.name}"] = (fn, y[known], p[known])
            r += 1
        else:
            p = np.stack([preds[i].class_probs[c] for i in rows])
            known = y >= 0
            for m, fn in CLASSIFICATION_METRICS.items():
                out[f"{m}_{spec.name}"] = (fn, y[known], p[known])
            c += 1
    return out


def cross_validate(
    bags: Sequence[Bag],
    labels: SlideLabels,
    cfg: MILConfig,
    *,
    k: int = 5,
    covariates: Sequence[str] = (),
    progress: Callable[[str], None] | None = None,
) -> CVResult:
    """k-fold CV over patients; ``bags`` in ``labels.slide_ids`` order."""
    if [b.slide_id for b in bags] != list(labels.slide_ids):
        raise MILError("bags and slide labels must list the same slides in the same order")
    folds = patient_folds(labels.patient_ids, k, cfg.seed)
    targets = targets_from_labels(labels, covariates)
    held: dict[int, BagPrediction] = {}
    per_fold = []
    for f in range(k):
        train, test = np.flatnonzero(folds != f), np.flatnonzero(folds == f)
        scaled, mean, sd = _standardise(targets, train)
        fold_cfg = replace(cfg, seed=cfg.seed + f)
        groups = [labels.patient_ids[i] for i in train]
        net = fit_mil([bags[i] for i in train], _subset(scaled, train), fold_cfg, groups)
        cov = targets.covariates[test] if targets.covariates.size else None
        for i, pred in zip(test, predict_bags(net, [bags[i] for i in test], cov), strict=True):
            held[i] = replace(
                pred, regression=pred.regression * sd + mean, contributions=pred.contributions * sd
            )
        preds = [held.get(i) for i in range(len(bags))]
        per_fold.append({k_: fn(y, p) for k_, (fn, y, p) in _metrics(labels, preds, test).items()})
        if progress:
            shown = ", ".join(f"{m} {v:.3f}" for m, v in per_fold[-1].items())
            progress(f"fold {f + 1}/{k}: {shown}")
    predictions = [held[i] for i in range(len(bags))]
    patients = np.asarray(labels.patient_ids)
    pooled = {}
    for name, (fn, y, p) in _metrics(labels, predictions, np.arange(len(bags))).items():
        known_patients = patients[_known_rows(labels, name)]
        pooled[name] = {"value": fn(y, p), "ci95": bootstrap_ci(fn, y, p, known_patients, cfg.seed)}
    return CVResult(folds, predictions, per_fold, pooled)


def _known_rows(labels: SlideLabels, metric_name: str) -> np.ndarray:
    target = next(s for s in labels.specs if metric_name.endswith("_" + s.name))
    v = labels.values[target.name]
    return np.isfinite(v) if target.target_type == "regression" else v >= 0


def write_cv_outputs(
    out_dir: str | Path, bags: Sequence[Bag], labels: SlideLabels, result: CVResult
) -> list[Path]:
    """``cv_metrics.json``, ``predictions.csv`` and ``tiles/<slide_id>.csv`` under ``out_dir``."""
    out = Path(out_dir)
    reg_specs = [s for s in labels.specs if s.target_type == "regression"]
    cls_specs = [s for s in labels.specs if s.target_type == "classification"]
    metrics = {
        "folds": int(result.folds.max()) + 1,
        "per_fold": result.per_fold,
        "pooled": result.pooled,
        "n_slides": len(bags),
        "n_patients": len(set(labels.patient_ids)),
    }
    written = [write_json(out / "cv_metrics.json", metrics)]
    header = ["slide_id", "patient_id", "fold"]
    header += [c for s in reg_specs for c in (s.name, f"pred_{s.name}")]
    header += [c for s in cls_specs for c in (s.name, f"pred_{s.name}")]
    rows = []
    for i, (bag, pred) in enumerate(zip(bags, result.predictions, strict=True)):
        row = [bag.slide_id, labels.patient_ids[i], int(result.folds[i])]
        for r, s in enumerate(reg_specs):
            row += [f"{labels.values[s.name][i]:.6g}", f"{pred.regression[r]:.6g}"]
        for c, s in enumerate(cls_specs):
            truth = int(labels.values[s.name][i])
            row += [
                s.classes[truth] if truth >= 0 else "",
                s.classes[int(pred.class_probs[c].argmax())],
            ]
        rows.append(row)
    written.append(write_csv(out / "predictions.csv", header, rows))
    for bag, pred in zip(bags, result.predictions, strict=True):
        scaled = attention_scale(pred.attention)
        tile_header = ["x", "y", "attention_x_n", *(f"contribution_{s.name}" for s in reg_specs)]
        tile_rows = (
            [int(x), int(y), f"{a:.5g}", *(f"{v:.5g}" for v in contrib)]
            for (x, y), a, contrib in zip(bag.xy_l0, scaled, pred.contributions, strict=True)
        )
        path = child(out / "tiles", bag.slide_id, ".csv", what="slide_id")
        written.append(write_csv(path, tile_header, tile_rows))
    return [*written[:2], out / "tiles"]

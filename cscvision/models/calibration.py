"""Calibrated probabilities: temperature scaling or isotonic regression per target.

Fitted on the validation split's tiles whose truth is clear (soft target ≥ 0.5 positive,
≤ 0.05 negative; the rest are mixed tiles whose "probability of being positive" has no
single right answer), stored in the model card and applied at inference. Expected
calibration error (ECE) uses 10 equal-width bins over the same clear tiles.

The card's form (``ModelCard.calibration``)::

    {"method": "temperature", "targets": {"stemness": {"temperature": 1.7}, ...}}
    {"method": "isotonic", "targets": {"stemness": {"x": [...], "y": [...]}, ...}}
    {}  # not calibrated: probabilities are the sigmoid of the logits
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

METHODS = ("temperature", "isotonic", "none")
POSITIVE_FROM = 0.5  # soft target at or above: a clear positive
NEGATIVE_UP_TO = 0.05  # at or below: a clear negative
ECE_BINS = 10
MIN_CLEAR_TILES = 20  # fewer clear tiles (or only one class): the target stays uncalibrated
# Temperatures searched. On a validation split the model separates perfectly the likelihood
# keeps falling as T → 0; the floor stops it at a still finite sharpening.
LOG_T_BOUNDS = (-3.0, 3.0)  # T from 0.05 to 20


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


def clear_truth(soft: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mask, labels)``: which tiles have a clear truth, and that truth (0/1)."""
    soft = np.asarray(soft, dtype=np.float64)
    positive, negative = soft >= POSITIVE_FROM, soft <= NEGATIVE_UP_TO
    return positive | negative, positive


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising the binary cross-entropy of ``sigmoid(logits / T)``."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)

    def nll(log_t: float) -> float:
        s = z / math.exp(log_t)
        # log(1 + e^s) - y * s, computed without overflow
        return float(np.mean(np.logaddexp(0.0, s) - y * s))

    result = minimize_scalar(nll, bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-5})
    return float(math.exp(result.x))


def fit_isotonic(probs: np.ndarray, labels: np.ndarray) -> tuple[list[float], list[float]]:
    """A monotone map of probabilities to observed frequencies (knots ``x`` → ``y``)."""
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
    iso.fit(np.asarray(probs, np.float64), np.asarray(labels, np.float64))
    return [float(v) for v in iso.X_thresholds_], [float(v) for v in iso.y_thresholds_]


def fit_calibration(
    logits: np.ndarray, soft: np.ndarray, targets: Sequence[str], method: str
) -> dict[str, Any]:
    """Per-target calibration from validation ``logits`` [N, T] and soft targets [N, T]."""
    if method not in METHODS:
        raise ValueError(f"calibration method {method!r}: choose one of {METHODS}")
    if method == "none":
        return {}
    fitted: dict[str, Any] = {}
    for t, name in enumerate(targets):
        mask, labels = clear_truth(soft[:, t])
        if mask.sum() < MIN_CLEAR_TILES or labels[mask].all() or not labels[mask].any():
            continue  # cannot be fitted: left as the plain sigmoid
        z, y = logits[mask, t], labels[mask]
        if method == "temperature":
            fitted[name] = {"temperature": fit_temperature(z, y)}
        else:
            x_knots, y_knots = fit_isotonic(sigmoid(z), y)
            fitted[name] = {"x": x_knots, "y": y_knots}
    return {"method": method, "targets": fitted} if fitted else {}


def calibrate(
    logits: np.ndarray, targets: Sequence[str], calibration: Mapping[str, Any]
) -> np.ndarray:
    """Probabilities [N, T] from logits [N, T] under a card's ``calibration``."""
    logits = np.asarray(logits, dtype=np.float64)
    probs = sigmoid(logits)
    per_target = (calibration or {}).get("targets", {})
    method = (calibration or {}).get("method")
    for t, name in enumerate(targets):
        params = per_target.get(name)
        if not params:
            continue
        if method == "temperature":
            probs[:, t] = sigmoid(logits[:, t] / float(params["temperature"]))
        elif method == "isotonic":
            probs[:, t] = np.interp(probs[:, t], params["x"], params["y"])
    return probs.astype(np.float32)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict[str, Any]:
    """ECE over equal-width bins and the per-bin figures of a reliability diagram."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    # bin k holds [k/bins, (k+1)/bins); a probability of exactly 1 goes in the last bin
    index = np.minimum((probs * bins).astype(np.int64), bins - 1)
    rows, ece = [], 0.0
    for k in range(bins):
        sel = index == k
        n = int(sel.sum())
        row = {"lo": k / bins, "hi": (k + 1) / bins, "count": n}
        if n:
            row.update(mean_prob=float(probs[sel].mean()), frac_pos=float(labels[sel].mean()))
            ece += n / len(probs) * abs(row["mean_prob"] - row["frac_pos"])
        rows.append(row)
    return {"ece": float(ece) if len(probs) else math.nan, "n": len(probs), "bins": rows}


def calibration_report(
    logits: np.ndarray, soft: np.ndarray, targets: Sequence[str], calibration: Mapping[str, Any]
) -> dict[str, Any]:
    """ECE and reliability bins before and after calibration, per target, on clear tiles."""
    before = sigmoid(np.asarray(logits, np.float64))
    after = calibrate(logits, targets, calibration)
    out: dict[str, Any] = {}
    for t, name in enumerate(targets):
        mask, labels = clear_truth(soft[:, t])
        pre = reliability(before[mask, t], labels[mask])
        post = reliability(after[mask, t], labels[mask])
        out[name] = {
            "clear_tiles": pre["n"],
            "ece_before": pre["ece"],
            "ece_after": post["ece"],
            "bins_before": pre["bins"],
            "bins_after": post["bins"],
        }
    return out

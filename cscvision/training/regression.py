"""Regression of continuous tile targets (e.g. gene-programme scores of spatial transcriptomics).

The network predicts each target **standardised** by the training tiles' mean and standard
deviation (``target_mean``/``target_std`` buffers, saved in checkpoints and on the model
card), so targets of any scale train alike. Losses: ``mse`` on the standardised scores, or
``pearson`` (1 − Pearson correlation per target, averaged: scale-free). Metrics per target
on validation and test: Pearson and Spearman correlation of predicted and measured scores
over held-out tiles, MSE in score units, and a bootstrap 95 % CI of each correlation drawn
over **patients** (tiles of one patient are resampled together: neighbouring spot tiles
overlap and are not independent).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from cscvision.training.lit import TileClassifier, TilePredictions, masked_mean

LOSSES = ("mse", "pearson")
TARGET_TYPES = ("classification", "regression")  # what a tile target is


def standardise_stats(targets: np.ndarray) -> tuple[list[float], list[float]]:
    """Mean and standard deviation (≥ 1e-6) per target of the training tiles that have it
    (NaN: no label); a target no tile has gets 0 and 1."""
    t = np.asarray(targets, np.float64)
    known = ~np.isnan(t)
    n = known.sum(axis=0)
    mean = np.where(known, t, 0).sum(axis=0) / np.maximum(n, 1)
    var = np.where(known, (t - mean) ** 2, 0).sum(axis=0) / np.maximum(n, 1)
    std = np.where(n > 0, np.maximum(np.sqrt(var), 1e-6), 1.0)
    return mean.tolist(), std.tolist()


def target_range(targets: np.ndarray) -> tuple[list[float], list[float]]:
    """Least and greatest value per target over the training tiles that have it (0, 0 for
    a target no tile has): recorded on the card, where a target never below 0 gets a floor
    of 0 (:meth:`~cscvision.models.card.ModelCard.floors`)."""
    t = np.asarray(targets, np.float64)
    known = ~np.isnan(t)
    low = np.where(known, t, np.inf).min(axis=0)
    high = np.where(known, t, -np.inf).max(axis=0)
    seen = known.any(axis=0)
    return np.where(seen, low, 0).tolist(), np.where(seen, high, 0).tolist()


def pearson_loss(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """1 − Pearson correlation per column, averaged over columns; with ``weight`` [B], the
    weighted correlation (weighted means, covariance and variances). A NaN target (no
    label) leaves its tile out of that column; a column with no label at all is left out."""
    known = ~torch.isnan(target)
    w = known.to(pred.dtype)
    if weight is not None:
        w = w * weight.to(pred).reshape(-1, 1)
    target = torch.where(known, target, torch.zeros_like(target))
    present = known.any(dim=0)
    w = w / w.sum(dim=0, keepdim=True).clamp_min(torch.finfo(pred.dtype).tiny)
    p = pred - (w * pred).sum(dim=0, keepdim=True)
    t = target - (w * target).sum(dim=0, keepdim=True)
    cov = (w * p * t).sum(dim=0)
    # norms, not sqrt of the variances: their gradient at 0 is 0, where sqrt's is infinite
    # (a batch of one tile, all weights 0, a constant column) and would make every step NaN
    sw = w.sqrt()
    r = cov / ((sw * p).norm(dim=0) * (sw * t).norm(dim=0)).clamp_min(1e-8)
    if not bool(present.all()):
        return (1 - r[present]).sum() / present.sum().clamp_min(1)
    return (1 - r).mean()


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(len(x))
    values, inverse = np.unique(x, return_inverse=True)  # ties share their mean rank
    sums = np.bincount(inverse, weights=ranks, minlength=len(values))
    return (sums / np.bincount(inverse, minlength=len(values)))[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(_ranks(np.asarray(x)), _ranks(np.asarray(y)))


def bootstrap_ci(
    pred: np.ndarray,
    target: np.ndarray,
    groups: np.ndarray,
    stat: Any,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    min_valid: int = 1,
) -> tuple[float, float]:
    """95 % percentile interval of ``stat(pred, target)`` resampling whole ``groups``; NaN
    when fewer than ``min_valid`` resamples give a finite value."""
    labels, inverse = np.unique(groups, return_inverse=True)
    if len(labels) < 2:
        return float("nan"), float("nan")
    members = [np.flatnonzero(inverse == g) for g in range(len(labels))]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        rows = np.concatenate([members[g] for g in rng.integers(0, len(labels), len(labels))])
        v = stat(pred[rows], target[rows])
        if math.isfinite(v):
            values.append(v)
    if len(values) < max(min_valid, 1):
        return float("nan"), float("nan")
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def regression_metrics(
    pred: np.ndarray,
    target: np.ndarray,
    groups: np.ndarray,
    target_names: Sequence[str],
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """``pearson_<t>``, ``spearman_<t>`` (+ ``_ci_low``/``_ci_high``), ``mse_<t>``, means."""
    out: dict[str, float] = {}
    for j, name in enumerate(target_names):
        known = ~np.isnan(target[:, j])  # tiles without this target's label count not
        p, t, g = pred[known, j], target[known, j], groups[known]
        for stat_name, stat in (("pearson", pearson), ("spearman", spearman)):
            out[f"{stat_name}_{name}"] = stat(p, t)
            low, high = bootstrap_ci(p, t, g, stat, n_boot=n_boot, seed=seed)
            out[f"{stat_name}_{name}_ci_low"], out[f"{stat_name}_{name}_ci_high"] = low, high
        out[f"mse_{name}"] = float(np.mean((p - t) ** 2)) if len(p) else float("nan")
    for stat_name in ("pearson", "spearman"):
        vals = [out[f"{stat_name}_{n}"] for n in target_names]
        finite = [v for v in vals if math.isfinite(v)]
        out[f"{stat_name}_mean"] = sum(finite) / len(finite) if finite else 0.0
    out["n_tiles"] = float(len(pred))
    out["n_groups"] = float(len(np.unique(groups)))
    return out


class TileRegressor(TileClassifier):
    """:class:`TileClassifier` for continuous targets: standardised outputs, MSE or Pearson loss.

    ``forward`` returns standardised predictions; :meth:`to_units` maps them to score units.
    ``slide_groups`` (slide index → patient id, set by ``train``) groups the bootstrap.
    """

    def __init__(
        self,
        *,
        target_mean: Sequence[float] | None = None,
        target_std: Sequence[float] | None = None,
        loss: str = "mse",
        n_boot: int = 1000,
        **kwargs: Any,
    ):
        if loss not in LOSSES:
            raise ValueError(f"loss {loss!r}: choose one of {', '.join(LOSSES)}")
        kwargs["pos_weight"] = None
        super().__init__(**kwargs)
        n = len(self.target_names)
        self.register_buffer("target_mean", torch.tensor(target_mean or [0.0] * n))
        self.register_buffer("target_std", torch.tensor(target_std or [1.0] * n))
        self.slide_groups: list[str] | None = None

    def to_units(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.target_std + self.target_mean

    def _loss(
        self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        z = (target.float() - self.target_mean) / self.target_std
        if self.hparams.loss == "pearson":
            return pearson_loss(logits.float(), z, weight)
        known = ~torch.isnan(z)
        z = torch.where(known, z, torch.zeros_like(z))
        squared = nn.functional.mse_loss(logits.float(), z, reduction="none")
        return masked_mean(squared, known, weight)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        values = self.to_units(self.batch_logits(batch, train=False).float())
        return {"xy": batch["xy"], "slide_idx": batch["slide_idx"], "probs": values}

    def _epoch_metrics(self, stage: str, preds: TilePredictions, choose: bool) -> None:
        logits, targets, slide_idx = preds.compute()
        preds.reset()
        if len(logits) == 0:
            return
        pred = self.to_units(logits.float()).cpu().numpy()
        idx = slide_idx.cpu().numpy()
        groups = np.asarray(self.slide_groups, object)[idx] if self.slide_groups else idx
        # The bootstrap only where it is reported: after fitting (validate / test), not per epoch.
        fitting = str(getattr(self.trainer.state.fn, "value", self.trainer.state.fn)) == "fit"
        n_boot = 0 if fitting else self.hparams.n_boot
        metrics = regression_metrics(
            pred, targets.cpu().numpy(), groups, self.target_names, n_boot=n_boot
        )
        metrics["loss"] = float(self._loss(logits, targets))
        self.last_metrics[stage] = metrics
        shown = ("pearson_mean", "loss")
        finite = {f"{stage}/{k}": v for k, v in metrics.items() if math.isfinite(v)}
        self.log_dict({k: v for k, v in finite.items() if k.split("/")[1] not in shown},
                      sync_dist=True)  # fmt: skip
        for k in shown:
            self.log(f"{stage}/{k}", metrics[k], prog_bar=True, sync_dist=True)

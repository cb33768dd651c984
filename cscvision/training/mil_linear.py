"""The closed-form fit of ``instance_linear`` MIL: a linear per-tile head whose mean over a
slide's tiles is the slide's prediction.

For slide ``s`` with tiles ``x_si`` (``n_s`` of them) the tile prediction is
``w · x_si + b`` and the slide prediction their mean, ``w · x̄_s + b``: a linear model on
the mean-pooled features, i.e. ridge regression on mean-pooled features with a per-tile
read-out. The weights minimise

    Σ_s (y_s - b - w · x̄_s)²  +  λ ‖w‖²  +  γ Σ_s w' C_s w

where ``C_s`` is slide ``s``'s within-slide covariance of tile features. The last term is
the within-slide variance of the tile predictions: ``γ = 1`` is exactly least squares with
the slide label copied to every tile (weighted ``1/n_s``), ``γ = 0`` plain ridge on the
means; a small ``γ`` (default 0.01) keeps the slide fit and damps directions that vary
inside slides but that the slide labels do not pin down, which is what the tile maps
show. ``λ`` is chosen per target by k-fold cross-validation over patients **inside the
training slides given** (the caller's test fold never reaches this module), on a grid
relative to the within-slide scatter so it does not depend on the features' scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cscvision.models.mil_net import InstanceLinearMIL

WITHIN_PENALTY = 0.01  # γ
LAMBDA_GRID = np.logspace(-6, -3, 13)  # λ / (trace of the within-slide scatter / D)
INNER_FOLDS = 5


def within_sums(bags: Sequence[np.ndarray], folds: np.ndarray, k: int) -> np.ndarray:
    """Summed within-bag covariances of tile features per fold ``[k, D, D]`` (one bag's
    ``D × D`` at a time, so memory does not grow with the number of slides)."""
    dim = np.asarray(bags[0]).shape[1]
    out = np.zeros((k, dim, dim))
    for bag, f in zip(bags, folds, strict=True):
        c = np.asarray(bag, np.float64)
        c = c - c.mean(0)
        out[f] += c.T @ c / len(c)
    return out


def solve(
    x: np.ndarray, y: np.ndarray, within: np.ndarray, lam: float, gamma: float
) -> tuple[np.ndarray, float]:
    """Weights ``w`` [P] and intercept ``b`` minimising the objective of the module doc;
    ``x`` [S, P] slide-level design, ``within`` [P, P] the summed within-slide covariances
    (zero rows for covariates, which do not vary inside a slide)."""
    mx, my = x.mean(0), y.mean()
    xc = x - mx
    a = xc.T @ xc + lam * np.eye(x.shape[1]) + gamma * within
    w = np.linalg.solve(a, xc.T @ (y - my))
    return w, float(my - mx @ w)


def _folds(groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    unique = sorted(set(groups.tolist()))
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of = {unique[p]: i % k for i, p in enumerate(order)}
    return np.array([fold_of[g] for g in groups])


def choose_lambda(
    x: np.ndarray, y: np.ndarray, within: np.ndarray, folds: np.ndarray, *, gamma: float
) -> float:
    """``λ`` with the least squared error in k-fold CV (``folds``: each slide's fold, over
    patients) among ``x``'s own slides; ``within`` [k, P, P] the folds' summed within-slide
    covariances. The grid's middle when there is a single fold."""
    k = len(within)
    scale = float(np.trace(within.sum(0))) / within.shape[1] or 1.0
    if k < 2:
        return float(LAMBDA_GRID[len(LAMBDA_GRID) // 2] * scale)
    err = np.zeros(len(LAMBDA_GRID))
    for f in range(k):
        tr, te = folds != f, folds == f
        train_within = within.sum(0) - within[f]
        for j, rel in enumerate(LAMBDA_GRID):
            w, b = solve(x[tr], y[tr], train_within, rel * scale, gamma)
            err[j] += float(((x[te] @ w + b - y[te]) ** 2).sum())
    return float(LAMBDA_GRID[int(err.argmin())] * scale)


def _pad(within: np.ndarray, width: int) -> np.ndarray:
    out = np.zeros((width, width))
    out[: len(within), : len(within)] = within
    return out


def fit_instance_linear(
    bags: Sequence[np.ndarray],
    regression: np.ndarray,
    groups: Sequence[str] | None = None,
    *,
    covariates: np.ndarray | None = None,
    gamma: float = WITHIN_PENALTY,
    seed: int = 0,
) -> InstanceLinearMIL:
    """An :class:`InstanceLinearMIL` fitted to ``regression`` [S, R] (NaN: missing, left
    out of that target's fit) from the bags' tile features, one ``λ`` per target by
    grouped inner CV (``groups``: each slide's patient; default one group per slide)."""
    means = np.stack([np.asarray(b, np.float64).mean(0) for b in bags])
    cov = covariates if covariates is not None and covariates.size else np.zeros((len(bags), 0))
    x = np.concatenate([means, np.nan_to_num(cov)], axis=1)
    groups_arr = np.asarray(groups if groups is not None else [str(i) for i in range(len(bags))])
    net = InstanceLinearMIL(means.shape[1], n_regression=regression.shape[1],
                            n_covariates=cov.shape[1])  # fmt: skip
    weight = np.zeros((regression.shape[1], x.shape[1]))
    bias = np.zeros(regression.shape[1])
    for r in range(regression.shape[1]):
        rows = np.flatnonzero(np.isfinite(regression[:, r]))
        k = min(INNER_FOLDS, len(set(groups_arr[rows].tolist())))
        folds = _folds(groups_arr[rows], max(k, 1), seed)
        within = np.stack([_pad(w, x.shape[1]) for w in
                           within_sums([bags[i] for i in rows], folds, max(k, 1))])  # fmt: skip
        xs, ys = x[rows], regression[rows, r]
        lam = choose_lambda(xs, ys, within, folds, gamma=gamma)
        weight[r], bias[r] = solve(xs, ys, within.sum(0), lam, gamma)
    with torch.no_grad():
        net.regression.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        net.regression.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return net.eval()

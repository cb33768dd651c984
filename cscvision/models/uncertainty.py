"""Per-tile uncertainty of tile-scoring models (``cscvision infer --uncertainty``).

Three methods, each costing several forward passes per batch:

- ``mc:N``: Monte Carlo dropout (Gal & Ghahramani 2016). N passes with the network's
  dropout layers active and everything else in eval mode (batch norm uses, and never
  updates, its running statistics). Cost: N passes, plus one plain pass when the OOD score
  is also computed (its features are read with dropout off).
- ``tta``: test-time augmentation over the 8 flips and rotations of each tile (the
  dihedral group; stain and rotation do not change a tile's biology). Cost: 8 passes.
- ``ensemble``: the spread across the members of an ensemble of exported models
  (:mod:`cscvision.models.ensemble`; ``--model A --model B ...``). Cost: one pass per member,
  which an ensemble pays for its score anyway.

Per target, from the passes' probabilities ``p_i``: the predictive mean (written as the
score), the standard deviation across passes (``std_<t>``) and, for probabilities, the
mutual information ``H(mean p) − mean H(p_i)`` in nats (``mi_<t>``), the part of the
predictive entropy that comes from disagreement between passes. Regression scores get the
standard deviation only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from cscvision.core.errors import CscvisionError

MAX_PASSES = 256


class UncertaintyError(CscvisionError, ValueError):
    """An --uncertainty value that cannot be used with this model."""


def parse_uncertainty(spec: str | None) -> tuple[str, int] | None:
    """``"mc:N"`` → ``("mc", N)``, ``"tta"`` → ``("tta", 8)``, ``"ensemble"`` →
    ``("ensemble", 0)`` (one pass per member), None → None."""
    if spec is None:
        return None
    if spec == "tta":
        return "tta", 8
    if spec == "ensemble":
        return "ensemble", 0
    match = re.fullmatch(r"mc:(\d+)", spec)
    if match and 2 <= int(match.group(1)) <= MAX_PASSES:
        return "mc", int(match.group(1))
    raise UncertaintyError(
        f"--uncertainty {spec!r}: use mc:N with 2 ≤ N ≤ {MAX_PASSES} (e.g. mc:10), tta, "
        "or ensemble (with two or more --model)"
    )


def uncertainty_columns(targets: Sequence[str], regression: bool = False) -> list[str]:
    """``std_<t>`` per target, then ``mi_<t>`` per target (not for regression)."""
    names = [f"std_{t}" for t in targets]
    return names if regression else names + [f"mi_{t}" for t in targets]


def dropout_layers(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


@contextmanager
def dropout_active(net: nn.Module):
    """Dropout layers in training mode, every other module as it was (eval); restored after."""
    layers = dropout_layers(net)
    if not layers:
        raise UncertaintyError(
            f"--uncertainty mc: the network ({type(net).__name__}) has no dropout layer; "
            "use --uncertainty tta"
        )
    modes = [m.training for m in layers]
    try:
        for m in layers:
            m.train()
        yield
    finally:
        for m, mode in zip(layers, modes, strict=True):
            m.train(mode)


def mc_passes(net: nn.Module, x: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` outputs of ``net`` on ``x`` with dropout active: [n, B, W]."""
    with dropout_active(net):
        return torch.stack([net(x).float() for _ in range(n)])


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/rotations of a batch [B, C, H, W]: 4 rotations of it and of its mirror."""
    mirrored = torch.flip(x, dims=(3,))
    return [torch.rot90(v, k, dims=(2, 3)) for v in (x, mirrored) for k in range(4)]


def tta_passes(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Outputs of ``net`` on the 8 views of ``x``: [8, B, W] (view 0 is ``x`` itself)."""
    return torch.stack(
        [net(v.contiguous(memory_format=_memory(x))).float() for v in dihedral_views(x)]
    )


def _memory(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats of Bernoulli(p), 0 at p ∈ {0, 1}."""
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return -(p * np.log(p) + (1 - p) * np.log1p(-p))


def predictive_stats(values: np.ndarray, *, probabilities: bool = True) -> dict[str, np.ndarray]:
    """Passes' per-tile outputs [n, B, T] → ``mean``, ``std`` (and ``mi`` for probabilities),
    each [B, T]."""
    values = np.asarray(values, np.float64)
    out = {"mean": values.mean(0), "std": values.std(0)}
    if probabilities:
        out["mi"] = np.maximum(binary_entropy(out["mean"]) - binary_entropy(values).mean(0), 0.0)
    return {k: v.astype(np.float32) for k, v in out.items()}


def uncertain_outputs(
    net: nn.Module,
    x: torch.Tensor,
    spec: tuple[str, int],
    to_outputs: Callable[[torch.Tensor], np.ndarray],
    *,
    probabilities: bool = True,
) -> tuple[np.ndarray, np.ndarray, Any]:
    """The predictive mean [B, T] and the uncertainty columns [B, T or 2T] of a batch;
    ``to_outputs`` turns logits into per-tile outputs (the model kind's calibration)."""
    method, n = spec
    passes = mc_passes(net, x, n) if method == "mc" else tta_passes(net, x)
    stats = predictive_stats(np.stack([to_outputs(p) for p in passes]), probabilities=probabilities)
    columns = [stats["std"]] + ([stats["mi"]] if probabilities else [])
    return stats["mean"], np.concatenate(columns, axis=1), passes

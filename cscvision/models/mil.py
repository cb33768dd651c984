"""MIL models as ``cscvision infer`` runs them: per-tile parts scored in batches, then one
aggregation per slide.

A trained :class:`~cscvision.models.mil_net.GatedAttentionMIL` (either architecture) splits
exactly into a per-tile part and a slide-level sum, because its pooling is a softmax
weighting and its heads are linear: tile ``i`` yields its attention score ``s_i`` and
``W h_i`` for every head, and the slide's outputs are ``b + Σ_i softmax(s)_i W h_i``
(:func:`aggregate`). :class:`MILTileNet` (encoder + per-tile part) therefore runs through
the ordinary tile pipeline (batches, AMP, GPU, shards, Ray); :func:`mil_slide_outputs`
turns a slide's per-tile rows into its prediction and its maps.

Maps (the card's ``targets``) are on the **within-slide rank percentile** scale: 1 is
the slide's highest tile, 0 its lowest (ties share their mean rank). That compares across
slides whatever the slide's size or the model's calibration, and it is what the overlay
PNG, the likelihood TIFF and the GeoJSON tile measurements show. The tile table keeps the
raw values beside them: attention × number of tiles (1 = the slide's average tile) and
each tile's contribution to each regression output in the label's units (the slide's
prediction is the label mean plus the sum of its tiles' contributions, plus the bias).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn

from cscvision.models.mil_net import GatedAttentionMIL, InstanceLinearMIL

ATTENTION = "attention"
MAP_UNIT = "within-slide percentile"  # short: colour-bar label
MAP_SCALE = "within-slide rank percentile (0 = lowest tile, 1 = highest)"


def contribution_name(target: str) -> str:
    return f"contribution_{target}"


def map_targets(mil: dict[str, Any]) -> tuple[str, ...]:
    """The card targets (map channels) of a MIL card's ``mil`` record."""
    return (ATTENTION, *(contribution_name(r["name"]) for r in mil.get("regression", [])))


def tile_parts(net: GatedAttentionMIL, features: torch.Tensor) -> torch.Tensor:
    """Per-tile rows ``[N, 1 + R + ΣK]``: attention score, ``W h`` of the regression head
    (standardised units) and of each classifier (logit parts), in that order."""
    h = net.embed(features)
    score = net.tile_scores(h)
    width = h.shape[1]
    parts = [score]
    heads = ([net.regression] if net.regression is not None else []) + list(net.classifiers)
    parts += [h @ head.weight[:, :width].T for head in heads]
    return torch.cat(parts, dim=1)


class MILTileNet(nn.Module):
    """A frozen encoder and a MIL model's per-tile part: normalised tiles → rows
    ``[B, 1 + R + ΣK]`` (:func:`tile_parts`)."""

    def __init__(self, encoder: nn.Module, mil: GatedAttentionMIL) -> None:
        super().__init__()
        self.encoder = encoder
        self.mil = mil

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tile_parts(self.mil, self.encoder(x).float())


@dataclass(frozen=True)
class MILSlideOutput:
    """One slide's MIL prediction in label units, and its per-tile values."""

    regression: dict[str, float]  # target → predicted value (label units)
    class_probs: dict[str, dict[str, float]]  # target → class → probability
    attention: np.ndarray  # float64[N], sums to 1
    contributions: np.ndarray  # float64[N, R], label units

    def predicted_class(self, target: str) -> str:
        probs = self.class_probs[target]
        return max(probs, key=probs.get)


def aggregate(rows: np.ndarray, mil: GatedAttentionMIL, record: dict[str, Any]) -> MILSlideOutput:
    """A slide's outputs from its tiles' rows (:func:`tile_parts`) and the card's ``mil``
    record (regression mean/sd, class names)."""
    rows = np.asarray(rows, np.float64)
    score = rows[:, 0] - rows[:, 0].max()
    attention = np.exp(score) / np.exp(score).sum()
    regression, contributions, col = {}, np.zeros((len(rows), 0)), 1
    reg_specs = record.get("regression", [])
    if reg_specs:
        parts = rows[:, col : col + len(reg_specs)]
        col += len(reg_specs)
        bias = mil.regression.bias.detach().double().numpy()
        sd = np.array([r["sd"] for r in reg_specs])
        mean = np.array([r["mean"] for r in reg_specs])
        contributions = attention[:, None] * parts * sd
        values = (bias + attention @ parts) * sd + mean
        regression = {r["name"]: float(v) for r, v in zip(reg_specs, values, strict=True)}
    class_probs = {}
    for spec, head in zip(record.get("classification", []), mil.classifiers, strict=True):
        k = len(spec["classes"])
        logits = head.bias.detach().double().numpy() + attention @ rows[:, col : col + k]
        col += k
        p = np.exp(logits - logits.max())
        class_probs[spec["name"]] = dict(zip(spec["classes"], (p / p.sum()).tolist(), strict=True))
    return MILSlideOutput(regression, class_probs, attention, contributions)


def rank_percentile(values: np.ndarray) -> np.ndarray:
    """Within-slide rank percentile of each value: (rank - 1) / (N - 1), ties averaged;
    a single tile is 0.5."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return np.full(len(values), 0.5)
    return (rankdata(values, method="average") - 1) / (len(values) - 1)


def mil_slide_outputs(
    rows: np.ndarray, mil: GatedAttentionMIL, record: dict[str, Any]
) -> tuple[np.ndarray, dict[str, np.ndarray], MILSlideOutput]:
    """Map channels float32[N, T] (percentiles, in :func:`map_targets` order), the raw
    per-tile columns for the tile table, and the slide's prediction."""
    out = aggregate(rows, mil, record)
    n = len(out.attention)
    channels = [rank_percentile(out.attention)]
    raw = {"attention_x_n": out.attention * n}
    for r, spec in enumerate(record.get("regression", [])):
        channels.append(rank_percentile(out.contributions[:, r]))
        raw[f"{contribution_name(spec['name'])}_raw"] = out.contributions[:, r]
    return np.stack(channels, 1).astype(np.float32), raw, out


def slide_prediction_record(out: MILSlideOutput) -> dict[str, Any]:
    """The ``slide_prediction`` entry of a MIL slide's ``summary.json``."""
    record: dict[str, Any] = {"regression": dict(out.regression), "classification": {}}
    for target, probs in out.class_probs.items():
        record["classification"][target] = {
            "predicted": out.predicted_class(target),
            "probabilities": dict(probs),
        }
    return record


def mil_net_from_record(record: dict[str, Any]) -> GatedAttentionMIL:
    """An untrained net of the shape a card's ``mil`` record describes."""
    if record.get("architecture") == "instance_linear":
        return InstanceLinearMIL(
            int(record["in_dim"]),
            n_regression=len(record.get("regression", [])),
            n_covariates=len(record.get("covariates", [])),
        )
    return GatedAttentionMIL(
        int(record["in_dim"]),
        n_regression=len(record.get("regression", [])),
        n_classes=[len(c["classes"]) for c in record.get("classification", [])],
        n_covariates=len(record.get("covariates", [])),
        hidden=int(record["hidden"]),
        attention=int(record["attention"]),
        dropout=float(record.get("dropout", 0.0)),
        instance_heads=record.get("architecture") == "clam_sb",
        mean_pool=record.get("architecture") == "mean",
    )


def load_mil_net(
    card: Any, state: dict[str, torch.Tensor], encoder_weights: Any = None
) -> MILTileNet:
    """The card's encoder joined to its MIL model's per-tile part; ``ModelError`` when the
    weights do not fit or the model needs covariates (inference has none to give it)."""
    from cscvision.models.card import ModelError
    from cscvision.models.heads import load_card_encoder

    record = card.mil
    if record.get("covariates"):
        raise ModelError(
            f"model {card.name!r} was trained with covariates {record['covariates']}: its "
            "slide outputs depend on them, and cscvision infer has no covariates to give; "
            "train without covariates for a model to run on slides"
        )
    try:
        mil = mil_net_from_record(record)
        mil.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError) as e:
        raise ModelError(
            f"model {card.name!r}: MIL weights do not fit its card ({str(e).splitlines()[0]})"
        ) from None
    _, encoder = load_card_encoder(card, encoder_weights)
    return MILTileNet(encoder, mil.eval())

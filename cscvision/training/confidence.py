"""Confidence thresholds chosen on validation tiles at export (the card's ``confidence``):
per uncertainty method and target, the standard deviation above which validation tiles
were much less accurate. With ``infer --uncertainty`` of that method, tiles above it are
counted as uncertain and the slide's statistics are given with and without them.

The rule (:data:`RULE`): among the 70th to 95th percentiles of the validation tiles'
standard deviation, those at which the tiles above are wrong at least twice as often as
the tiles below (classification: the tile's call at the card's threshold against its
label ≥ 0.5, and at least 5 points more often; regression: twice the mean absolute error),
with at least :data:`MIN_TILES_ABOVE` tiles above; the threshold is the one of them that
explains most of the variance of the errors (the split a decision stump on the standard
deviation would choose: share above × share below × squared difference in error). None
when no percentile qualifies: the uncertainty does not separate good tiles from bad on
this validation set, and the card says so.

How it can fool you: validation tiles are the labelled tiles training kept (artefact tiles
dropped), from a handful of slides of the training cohort's sites; on another site the
errors (and the uncertainty's link to them) may differ.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cscvision.core.io import write_json
from cscvision.models.card import CARD_FILE, ModelCard
from cscvision.models.kinds import get_kind
from cscvision.models.uncertainty import dropout_layers, mc_passes, predictive_stats, tta_passes
from cscvision.slides.slide_stains import per_tile
from cscvision.slides.stain import StainReference, normalise_batch

QUANTILES = (0.70, 0.75, 0.80, 0.85, 0.90, 0.95)
ERROR_RATIO = 2.0
MIN_GAP = 0.05  # classification: error-rate points between the tiles above and below
MIN_TILES_ABOVE = 20
MAX_TILES = 20_000  # validation tiles read (in loader order) per method
MC_PASSES = 10
RULE = (
    "of the 70th-95th percentiles of the validation tiles' standard deviation above which "
    f"tiles are wrong at least {ERROR_RATIO:g}x as often as below (classification: and "
    f"{MIN_GAP * 100:g} points more; regression: mean absolute error), with at least "
    f"{MIN_TILES_ABOVE} tiles above, the one explaining most of the errors' variance "
    "(share above x share below x squared error difference); null when none qualifies"
)


def choose_threshold(std: np.ndarray, error: np.ndarray, *, regression: bool = False) -> dict:
    """The confidence threshold of one target under :data:`RULE` from the validation tiles'
    standard deviations [N] and errors [N] (0/1 calls, or absolute errors for regression)."""
    std, error = np.asarray(std, float), np.asarray(error, float)
    keep = np.isfinite(std) & np.isfinite(error)
    std, error = std[keep], error[keep]
    out: dict[str, Any] = {"std": None, "tiles": len(std)}
    best: dict[str, Any] | None = None
    for q in QUANTILES if len(std) else ():
        cut = float(np.quantile(std, q))
        above = std > cut
        if above.sum() < MIN_TILES_ABOVE or above.all():
            continue
        err_above, err_below = float(error[above].mean()), float(error[~above].mean())
        gap_ok = regression or err_above - err_below >= MIN_GAP
        if err_above < ERROR_RATIO * err_below or not gap_ok:
            continue
        share = float(above.mean())
        explained = share * (1 - share) * (err_above - err_below) ** 2
        if best is None or explained > best["explained"]:
            best = {
                **out,
                "std": cut,
                "quantile": q,
                "share_above": round(share, 4),
                "error_above": round(err_above, 4),
                "error_below": round(err_below, 4),
                "explained": explained,
            }
    if best is not None:
        best["explained"] = round(best["explained"], 6)
    return best or {**out, "reason": "no percentile separates less accurate tiles"}


def tile_errors(mean: np.ndarray, target: np.ndarray, card: ModelCard) -> np.ndarray:
    """Per-tile errors [N, T]: wrong calls (classification, at the card's thresholds, label
    = target ≥ 0.5) or absolute errors (regression); NaN where a target is unlabelled."""
    if card.is_regression:
        return np.abs(mean - target)
    cuts = np.array([card.thresholds.get(t, 0.5) for t in card.targets])
    wrong = ((mean >= cuts) != (target >= 0.5)).astype(float)
    return np.where(np.isnan(target), np.nan, wrong)


def fit_confidence(
    net: torch.nn.Module,
    card: ModelCard,
    batches: Iterable[dict],
    *,
    max_tiles: int = MAX_TILES,
    stain_sources: Sequence[StainReference] | None = None,
) -> dict[str, Any]:
    """The card's ``confidence`` block from validation ``batches`` (uint8 ``image`` and
    ``target``): ``tta`` always, ``mc`` where the network has dropout. Empty for models
    trained on stored features (no tiles to transform). ``stain_sources``: each slide's own
    stains by ``slide_idx``, for a Macenko/Vahadane card template."""
    kind = get_kind(card.kind)
    stain = StainReference.from_dict(card.stain) if card.stain else None
    methods = ["tta"] + (["mc"] if dropout_layers(net) else [])
    mean = torch.tensor(card.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(card.std).view(1, 3, 1, 1) * 255
    device = next(net.parameters()).device
    seen: dict[str, list] = {m: [] for m in methods}
    targets, n = [], 0
    net.eval()
    with torch.inference_mode():
        for batch in batches:
            if "image" not in batch:
                return {}
            image = batch["image"]
            if stain is not None:
                source = per_tile(stain_sources, batch.get("slide_idx"))
                image = normalise_batch(image, stain, source=source)
            x = ((image.float() - mean) / std).to(device)
            for m in methods:
                passes = tta_passes(net, x) if m == "tta" else mc_passes(net, x, MC_PASSES)
                outputs = np.stack([kind.tile_outputs(card, p) for p in passes])
                seen[m].append(predictive_stats(outputs, probabilities=not card.is_regression))
            targets.append(np.asarray(batch["target"], float))
            n += len(x)
            if n >= max_tiles:
                break
    if not targets:
        return {}
    target = np.concatenate(targets)
    block: dict[str, Any] = {"rule": RULE, "val_tiles": len(target), "mc_passes": MC_PASSES}
    for m in methods:
        stats = {k: np.concatenate([s[k] for s in seen[m]]) for k in ("mean", "std")}
        errors = tile_errors(stats["mean"], target, card)
        block[m] = {
            t: choose_threshold(stats["std"][:, i], errors[:, i], regression=card.is_regression)
            for i, t in enumerate(card.targets)
        }
    return block


def export_confidence(
    net: torch.nn.Module,
    card: ModelCard,
    batches: Iterable[dict],
    model_dir: str | Path,
    *,
    stain_sources: Sequence[StainReference] | None = None,
) -> ModelCard:
    """Fit the ``confidence`` block and write it into the exported card."""
    import dataclasses

    block = fit_confidence(net, card, batches, stain_sources=stain_sources)
    if not block:
        return card
    path = Path(model_dir) / CARD_FILE
    write_json(path, {**json.loads(path.read_text()), "confidence": block})
    return dataclasses.replace(card, confidence=block)

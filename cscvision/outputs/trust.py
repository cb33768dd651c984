"""Writers and summary of the trust maps (:mod:`cscvision.inference.trust`): the OOD score
and per-target uncertainty, written as the score maps are (overlay PNG, ASAP/QuPath TIFF)
and the slide's ``ood`` block of ``summary.json`` with its verdict."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from cscvision.core.io import write_png
from cscvision.models.card import ModelCard
from cscvision.outputs.likelihood import likelihood_map_name, write_likelihood_map
from cscvision.outputs.overlay import heat_image, render_overlay
from cscvision.outputs.prediction import SlidePrediction

OOD = "ood"
OOD_SPAN = 2.0  # the OOD map shows 0-2 × the validation 99th percentile; 1 is its outline
OOD_UNIT = "× validation p99"
OUTLINE_RGB = (255, 0, 255)


def display_range(name: str) -> tuple[float, float, str]:
    """Values a trust map's colours span, and its unit: the OOD ratio 0-2, a standard
    deviation of a probability 0-0.5, a mutual information 0-ln 2 nats."""
    if name == OOD:
        return 0.0, OOD_SPAN, OOD_UNIT
    if name.startswith("std_"):
        return 0.0, 0.5, "std of probability"
    return 0.0, math.log(2), "mutual information (nats)"


def _unit(values: np.ndarray, name: str) -> np.ndarray:
    lo, hi, _ = display_range(name)
    return (values - lo) / (hi - lo)


def write_trust_maps(folder: Path, pred: SlidePrediction, card: ModelCard) -> list[Path]:
    """For each trust map: ``overlay_<name>.png`` and ``<id>_likelihood_map_<name>.tif``
    (values scaled to 0-1 over :func:`display_range`; the OOD map's outline is the tiles
    beyond the validation 99th percentile)."""
    paths = []
    for name, values in pred.trust_maps.items():
        lo, hi, unit = display_range(name)
        paths.append(
            write_likelihood_map(
                folder / likelihood_map_name(pred.slide_id, name),
                np.clip(_unit(values, name), 0, 1),
                pred.map_transform,
                dimensions=pred.grid.dimensions,
                slide_mpp=pred.grid.slide_mpp,
            )
        )
        threshold = 1.0 / OOD_SPAN if name == OOD else None
        region = values > 1.0 if name == OOD else np.zeros(values.shape, bool)
        heat = heat_image(
            pred.thumb,
            pred.mask,
            _unit(values, name),
            pred.map_transform,
            pred.grid.dimensions,
            region=region & (pred.tissue_map > 0),
            contour_rgb=OUTLINE_RGB,
        )
        image = render_overlay(
            heat,
            title=f"{pred.slide_id} — {name}",
            subtitle=f"model {card.name} · {_subtitle(name, card)} · research use only",
            target=name,
            threshold=threshold,
            contour_rgb=OUTLINE_RGB,
            min_tissue=pred.grid.spec.min_tissue,
            value_range=(lo, hi),
            unit=unit,
            threshold_label="ood > 1 (beyond the validation tiles' 99th percentile)",
        )
        paths.append(write_png(folder / f"overlay_{name}.png", image))
    return paths


def _subtitle(name: str, card: ModelCard) -> str:
    if name == OOD:
        return "Mahalanobis distance to training features ÷ validation p99"
    return "per-tile uncertainty"


def ood_summary(pred: SlidePrediction, card: ModelCard) -> dict[str, Any] | None:
    """The slide's ``ood`` block: share of its tissue tiles beyond the validation 99th
    percentile, the threshold it is judged against and the verdict (None without an OOD
    record)."""
    ratio = pred.trust.get(OOD)
    if ratio is None or not card.ood:
        return None
    share = float(np.mean(ratio > 1.0)) if len(ratio) else 0.0
    limit = float(card.ood["slide_share_threshold"])
    return {
        "share_beyond_p99": round(share, 4),
        "slide_share_threshold": limit,
        "out_of_distribution": share > limit,
        "median_ratio": round(float(np.median(ratio)), 4),
        "expected_share_in_distribution": round(1 - float(card.ood["tile_quantile"]), 4),
        "rule": card.ood["rule"],
        "score": "squared Mahalanobis distance to the nearest training-feature mean, "
        "divided by the validation tiles' 99th percentile",
    }


def ood_columns() -> list[str]:
    return ["ood_share_beyond_p99", "ood_flag"]


def ood_row(summary: dict[str, Any]) -> dict[str, Any]:
    block = summary.get("ood") or {}
    if not block:
        return {}
    return {
        "ood_share_beyond_p99": block.get("share_beyond_p99"),
        "ood_flag": "yes" if block.get("out_of_distribution") else "no",
    }


def ood_run_line(out: Path, slide_ids: list[str]) -> str | None:
    """One warning line naming the slides of a run judged out of distribution (from their
    ``summary.json``); None when none were."""
    import json

    flagged = []
    for slide_id in slide_ids:
        try:
            block = json.loads((Path(out) / slide_id / "summary.json").read_text()).get("ood")
        except (OSError, ValueError, AttributeError):
            continue
        if block and block.get("out_of_distribution"):
            flagged.append(f"{slide_id} {block['share_beyond_p99']:.0%}")
    if not flagged:
        return None
    return (
        f"warning: {len(flagged)} slide(s) out of distribution for this model, their maps "
        f"are not to be trusted ({', '.join(flagged)} of tissue tiles beyond the validation "
        "99th percentile); see summary.json 'ood'"
    )


def ood_banner_text(summary: dict[str, Any]) -> str | None:
    """The banner a report card or viewer shows on a slide judged out of distribution
    (plain text: escape it for HTML); None otherwise."""
    block = summary.get("ood") or {}
    if not block.get("out_of_distribution"):
        return None
    return (
        f"Out of distribution for this model: {block['share_beyond_p99']:.0%} of the tissue "
        f"tiles lie beyond the 99th percentile of the validation tiles' OOD score (a slide is "
        f"flagged above {block['slide_share_threshold']:.0%}; about 1% is expected). Do not "
        "trust these maps."
    )


def _card(card: dict[str, Any] | None) -> ModelCard | None:
    from cscvision.models.card import ModelError

    try:
        return ModelCard.from_json(card) if card else None
    except ModelError:
        return None


def threshold_rows(card: dict[str, Any] | None) -> dict[str, str]:
    """The report's threshold rows of a card (JSON): values with their precision, rule."""
    from cscvision.models.thresholds import threshold_rule, threshold_text

    parsed = _card(card)
    if parsed is None or not parsed.thresholds:
        return {}
    values = ", ".join(f"{t} {threshold_text(v)}" for t, v in parsed.thresholds.items())
    return {"thresholds": values, "threshold rule": threshold_rule(parsed)}


def card_warnings(card: dict[str, Any] | None) -> list[str]:
    """Warnings about a card (JSON) a reader should see: fragile thresholds."""
    from cscvision.models.thresholds import threshold_warnings

    parsed = _card(card)
    return threshold_warnings(parsed) if parsed is not None else []

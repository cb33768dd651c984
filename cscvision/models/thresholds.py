"""Thresholds a reader can trust: shown with the precision they carry, with the rule that
chose them, and a warning when one is unlikely to mean much (no torch here)."""

from __future__ import annotations

import math

from cscvision.models.card import ModelCard

EDGE = 0.01  # a probability threshold this close to 0 or 1 is suspect
MIN_POSITIVES = 50  # fewer positive validation tiles than this choose a threshold poorly
F1_RULE = "the F1-maximising threshold on the validation tiles (a tile is positive at ≥ 0.5)"


def threshold_text(value: float) -> str:
    """A probability threshold with the digits it carries: enough to tell it from 0 or 1
    (0.99973, not 1.00), at least two decimals."""
    gap = min(value, 1 - value)
    digits = 2 if gap <= 0 or gap >= 0.1 else max(2, math.ceil(-math.log10(gap)) + 1)
    return f"{value:.{min(digits, 8)}f}"


def threshold_rule(card: ModelCard) -> str:
    """The rule that chose the card's thresholds (recorded at training, else the tile
    trainer's rule for a classification model that has thresholds)."""
    rule = card.training.get("threshold_rule")
    if rule:
        return str(rule)
    if card.thresholded and card.thresholds and card.kind in ("tile", "head", "finetune"):
        return F1_RULE
    return "not recorded"


def threshold_warnings(card: ModelCard) -> list[str]:
    """One sentence per threshold within :data:`EDGE` of 0 or 1, or chosen on fewer than
    :data:`MIN_POSITIVES` positive validation tiles (counts from the card's cohort)."""
    if not card.thresholded:
        return []
    positives = card.training.get("cohort", {}).get("val", {}).get("positive_tiles") or []
    out = []
    for i, target in enumerate(card.targets):
        if target not in card.thresholds:
            continue
        value = card.thresholds[target]
        if value < EDGE or value > 1 - EDGE:
            edge = 0 if value < EDGE else 1
            out.append(
                f"{target} threshold {threshold_text(value)} lies within {EDGE:g} of {edge}: "
                "the validation set was probably too easy or too small to choose one; "
                "regions and areas at this threshold are fragile"
            )
        if i < len(positives) and positives[i] < MIN_POSITIVES:
            out.append(
                f"{target} threshold rests on {positives[i]} positive validation tiles "
                f"(fewer than {MIN_POSITIVES}): treat it as a rough guess"
            )
    return out


def legend_threshold(card: ModelCard, target: str) -> str:
    """The overlay legend's threshold line: value with its precision and the rule."""
    rule = "max F1 on validation" if threshold_rule(card) == F1_RULE else threshold_rule(card)
    flag = " — fragile, see the card's warnings" if threshold_warnings_of(card, target) else ""
    return f"{target} ≥ {threshold_text(card.threshold(target))} ({rule}){flag}"


def threshold_warnings_of(card: ModelCard, target: str) -> list[str]:
    return [w for w in threshold_warnings(card) if w.startswith(f"{target} ")]


def confidence_thresholds(card: ModelCard, method: str | None) -> dict[str, float]:
    """Per target, the card's confidence threshold (``card.confidence``, chosen on
    validation tiles at export: :mod:`cscvision.training.confidence`) for an
    ``--uncertainty`` method (``mc:N`` → ``mc``), where one was chosen."""
    if not method or not card.confidence:
        return {}
    per_target = card.confidence.get(method.split(":")[0], {})
    return {t: float(v["std"]) for t, v in per_target.items() if v.get("std") is not None}

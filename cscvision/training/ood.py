"""The OOD record of a trained model (:mod:`cscvision.models.ood`), fitted on its run's
training tiles and scored on its validation tiles: at export, or afterwards for a model
exported without one (:func:`cscvision.training.refit.refit_ood`, the weights untouched)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cscvision.models.card import ModelCard
from cscvision.models.ood import export_ood, fit_ood


def export_run_ood(
    net: Any,
    card: ModelCard,
    dm: Any,
    model_dir: str | Path,
    *,
    note: str = "",
    features: str | None = None,
) -> ModelCard:
    """Fit the record on ``dm``'s training and validation tiles (in order, unaugmented)
    and write it beside the exported weights; returns the card that keeps it."""
    record, block = fit_ood(net, card, dm._loader("train"), dm._loader("val"), features=features)
    if note:
        block["note"] = note
    return export_ood(model_dir, card, record, block)

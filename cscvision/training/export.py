"""What a training run returns (:class:`TrainResult`) and the card it exports (:func:`run_card`).

The exported model folder (export and load) lives in :mod:`cscvision.models.export`; its
names are imported here too, for callers that still import them from this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cscvision.models.card import ModelCard
from cscvision.models.export import LoadedModel, export_model, load_model

__all__ = ["LoadedModel", "TrainResult", "export_model", "load_model", "run_card"]


@dataclass(frozen=True)
class TrainResult:
    """What a training run wrote and measured."""

    run_dir: Path
    model_dir: Path | None  # None on DDP ranks other than 0
    best_checkpoint: Path  # kind mil: the cross-validation folder
    metrics: dict[str, dict[str, float]]  # "val" and "test": name → value
    thresholds: dict[str, float]
    summary: dict[str, dict[str, Any]]  # per split: slides, patients, tiles


def run_card(
    cfg: Any,
    kind: Any,
    *,
    training: dict[str, Any],
    metrics: Any,
    encoder: dict[str, Any],
    **fields: Any,
) -> ModelCard:
    """The model card of a training run of ``kind``: name, kind, what it was trained on
    (``training`` adds to the cohort's synthetic flag, seed and the run's config),
    metrics, intended use and the encoder reference, plus the kind's own ``fields``."""
    from cscvision.training.config import config_to_dict

    return ModelCard(
        name=cfg.name,
        kind=kind.name,
        trained_on=cfg.card.trained_on or ("synthetic data only" if cfg.card.synthetic else ""),
        training={
            "cohort": training.pop("cohort"),
            "synthetic": cfg.card.synthetic,
            "seed": cfg.seed,
            **training,
            "config": config_to_dict(cfg),
        },
        metrics=json.loads(json.dumps(dict(metrics))),
        intended_use=cfg.card.intended_use,
        encoder=dict(encoder),
        **fields,
    )

"""The training system of a network on a foundation-model encoder (``model.encoder``).

A head on stored features (kind ``head``) and a head with the encoder's last blocks
(kind ``finetune``) train with the same labels, splits, loss, metrics, thresholds and
export as a tile CNN: the system is a :class:`~cscvision.training.lit.TileClassifier`
(or :class:`~cscvision.training.regression.TileRegressor` for ``target_type:
regression``) holding the network from :mod:`cscvision.models.heads`; for a head on
stored features its batches carry features, not images (``inputs="features"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from cscvision.training.lit import TileClassifier
from cscvision.training.regression import TileRegressor


def encoder_system(
    cfg: Any,
    targets: Sequence[str],
    dm: Any,
    net: nn.Module,
    **options: Any,
) -> TileClassifier:
    """The training system of a network on an encoder (``cfg.model.encoder``): a
    :class:`TileClassifier` for classification (with ``pos_weight`` from ``dm``'s training
    targets when ``data.balance`` says so), a :class:`TileRegressor` for ``target_type:
    regression`` (standardised by them, its bootstrap grouped by patient); ``options`` add
    to the config's settings (``inputs="features"`` for batches of stored features)."""
    from cscvision.models.registry import get_encoder_spec
    from cscvision.training.data import pos_weight
    from cscvision.training.regression import standardise_stats

    spec = get_encoder_spec(cfg.model.encoder)
    common: dict[str, Any] = {
        "net": net,
        "backbone": cfg.model.head,
        "targets": tuple(targets),
        "lr": cfg.optim.lr,
        "weight_decay": cfg.optim.weight_decay,
        "scheduler": cfg.optim.scheduler,
        "warmup_frac": cfg.optim.warmup_frac,
        "mean": spec.mean,
        "std": spec.std,
        "slide_cutoff": cfg.metrics.slide_cutoff,
        **options,
    }
    train_targets = dm.datasets["train"].targets
    if cfg.target_type == "regression":
        mean, std = standardise_stats(train_targets)
        module = TileRegressor(target_mean=mean, target_std=std, loss=cfg.regression.loss,
                          n_boot=cfg.regression.bootstrap, **common)  # fmt: skip
        patient = {t.slide_id: t.patient_id for tiles in dm.slides.values() for t in tiles}
        module.slide_groups = [patient[i] for i in dm.slide_ids]  # bootstrap over patients
        return module
    weights = None
    if cfg.data.balance == "pos_weight":
        weights = [float(w) for w in pos_weight(train_targets)]
    return TileClassifier(pos_weight=weights, **common)

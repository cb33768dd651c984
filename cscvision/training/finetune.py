"""Fine-tuning a foundation-model encoder: ``model.encoder`` with ``model.finetune_blocks: N``.

A head on stored features (:mod:`cscvision.training.heads`) never changes the encoder.
With ``finetune_blocks`` > 0 the encoder and a head train together end to end on tile
images instead: everything but the encoder's last N blocks (and a ViT's final norm) stays
frozen, in eval mode; the tuned blocks learn at ``optim.lr × model.finetune_lr_scale``,
the head at ``optim.lr``; images are augmented as for a tile CNN (``data.augment``) and
normalised with the encoder's mean and std, at its tile size and µm/px.

The exported folder holds the head and the tuned blocks only (a few MB for a ViT-L block,
not the encoder's gigabytes, and none of its licensed weights beyond those blocks); the
card names the encoder file by its sha256, as for a head, and ``finetune_blocks``. Loading
rebuilds the encoder from that file and puts the tuned blocks back
(:func:`cscvision.training.heads.load_head_net`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cscvision.training.config import TrainConfig
from cscvision.training.data import TileDataModule
from cscvision.training.heads import EncoderHead, encoder_system, make_head
from cscvision.training.lit import TileClassifier
from cscvision.training.regression import TileRegressor

log = logging.getLogger(__name__)


def finetune_module(
    cfg: TrainConfig, targets: Sequence[str], dm: TileDataModule
) -> tuple[TileClassifier, dict[str, Any]]:
    """The system that trains ``cfg.model.encoder``'s last blocks with a head on ``dm``'s
    tile images, and the card's ``encoder`` reference."""
    from cscvision.features.encoders import file_sha256, load_encoder

    weights = Path(cfg.model.weights or "")
    encoder = load_encoder(cfg.model.encoder, weights)
    spec = encoder.spec
    net = EncoderHead(encoder, make_head(cfg.model.head, spec.dim, len(targets)))
    opened = net.tune(cfg.model.finetune_blocks)
    n_open = sum(p.numel() for p in net.encoder.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in net.encoder.parameters())
    log.info(
        "fine-tuning %s: blocks %s (%d of %d encoder parameters, %d tensors) at lr × %g",
        spec.name, ", ".join(net.tuned), n_open, n_all, len(opened),
        cfg.model.finetune_lr_scale,
    )  # fmt: skip
    log.info("the frozen encoder modules stay in eval mode on purpose (Lightning may warn)")
    module = encoder_system(
        cfg, targets, dm, net, (TileClassifier, TileRegressor), augment=cfg.data.augment,
        channels_last=spec.is_cnn, encoder_lr_scale=cfg.model.finetune_lr_scale,
    )  # fmt: skip
    reference = {
        "name": spec.name,
        "weights_sha256": file_sha256(weights),
        "weights_file": str(weights),
        "expected_file": spec.weights_file,
        "timm_name": spec.timm_name,
        "dim": spec.dim,
        "pool": spec.pool,
        "finetune_blocks": cfg.model.finetune_blocks,
        "finetune_lr_scale": cfg.model.finetune_lr_scale,
        "tuned": list(net.tuned),
    }
    return module, reference

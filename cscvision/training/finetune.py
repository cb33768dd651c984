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
(:func:`cscvision.models.heads.load_head_net`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cscvision.models.heads import EncoderHead, encoder_reference, make_head
from cscvision.training.config import TrainConfig
from cscvision.training.data import TileDataModule
from cscvision.training.heads import encoder_system
from cscvision.training.lit import TileClassifier

log = logging.getLogger(__name__)


def finetune_pieces(
    cfg: TrainConfig,
    targets: Sequence[str],
    by_split: Mapping[str, Sequence[Any]],
    run_dir: Path,
    progress: bool = True,
) -> tuple[TileDataModule, TileClassifier, dict[str, Any]]:
    """Kind ``finetune``: tile images, the system that trains ``cfg.model.encoder``'s last
    blocks with a head on them, and the card's ``encoder`` reference."""
    from cscvision.core.io import file_sha256
    from cscvision.models.encoders import load_encoder
    from cscvision.training.train import tile_datamodule

    dm = tile_datamodule(cfg, by_split)
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
        cfg, targets, dm, net, augment=cfg.data.augment, channels_last=spec.is_cnn,
        encoder_lr_scale=cfg.model.finetune_lr_scale,
    )  # fmt: skip
    reference = encoder_reference(
        spec,
        weights_sha256=file_sha256(weights),
        weights_file=str(weights),
        finetune_blocks=cfg.model.finetune_blocks,
        finetune_lr_scale=cfg.model.finetune_lr_scale,
        tuned=list(net.tuned),
    )
    return dm, module, reference

"""The OOD record of an exported MIL model (:mod:`cscvision.models.ood`), on its tile
embeddings: what ``cscvision infer`` scores a MIL model's tiles with.

The exported MIL model is trained on every labelled slide, so no slide is held out for
it. Its record is one Gaussian fitted on the exported net's embeddings of every training
tile (``embed``: the gated-attention net's hidden layer; for ``instance_linear`` the
stored encoder features); the thresholds come from **cross-fitting over patients**: each
fold's tiles are scored against a Gaussian fitted on the other folds' tiles alone, and the
pooled held-out scores give the tile threshold (99th percentile) and the per-slide shares
the slide threshold, as a tile model's validation slides do. A bag already holds every
tissue tile of its slide at the encoder's grid, the tiles ``infer`` reads, so no slide is
read again.

How it can fool you: the embedding itself was trained on every slide (its held-out fold
only had the Gaussian refitted), so a new slide's embeddings may lie a little further out
than a held-out fold's did; with few patients the slide threshold rests on few shares.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cscvision.models.card import ModelCard
from cscvision.models.ood import MIL_FEATURES, export_ood, fit_gaussians, ood_block
from cscvision.training.mil import Bag
from cscvision.training.ood import held_out_scores

CALIBRATED_ON = (
    "held-out folds of the training slides' tissue tiles: each patient fold scored against "
    "the Gaussian fitted on the other folds' embeddings, k-fold over patients"
)


def tile_embeddings(net: torch.nn.Module, bags: Sequence[Bag]) -> list[np.ndarray]:
    """Each bag's tile embeddings float32[N, H] under ``net`` (a
    :class:`~cscvision.models.mil_net.GatedAttentionMIL`, in eval mode)."""
    net.eval()
    with torch.inference_mode():
        return [net.embed(torch.as_tensor(b.features)).float().numpy() for b in bags]


def export_mil_ood(
    net: torch.nn.Module,
    card: ModelCard,
    bags: Sequence[Bag],
    patients: Sequence[str],
    model_dir: str | Path,
    *,
    seed: int = 0,
) -> ModelCard:
    """Fit the record on every training tile's embedding, set its thresholds from the
    held-out folds (:func:`held_out_scores`) and write it beside the exported weights;
    returns the card that keeps it."""
    embeddings = tile_embeddings(net, bags)
    record = fit_gaussians(np.concatenate(embeddings))
    scores = held_out_scores(embeddings, patients, seed=seed)
    block = ood_block(
        record,
        features=MIL_FEATURES,
        train_tiles=sum(map(len, embeddings)),
        val_scores=np.concatenate(scores),
        val_slide_idx=np.repeat(np.arange(len(scores)), [len(s) for s in scores]),
    )
    block["calibrated_on"] = CALIBRATED_ON
    if len(set(patients)) < 2:
        block["note"] = "one patient: thresholds from its own tiles, not held out"
    return export_ood(model_dir, card, record, block)

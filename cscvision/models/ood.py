"""Out-of-distribution record of a model: is a tile (a slide) unlike what it was trained on?

At export a model keeps a compact description of its training tiles' features: Gaussians
on, for a tile CNN, statistics of its first block's feature maps (``block_stats``, the
default: their per-channel mean and standard deviation; ``texture``: the standard
deviation only; low-level colour and texture, which the head learns to ignore: on the
penultimate layer an unseen tissue type scored AUROC 0.2-0.6 against held-out tiles, as
the network maps it onto its negatives), for a head on a foundation encoder the
encoder's features, else the penultimate layer (the input of the last linear layer, one
mean per group of training tiles: the pattern of targets ≥ 0.5), for a MIL model its
tile embeddings (:mod:`cscvision.training.mil_ood`); one shared covariance,
shrunk towards a scaled identity (Ledoit-Wolf).
A tile's OOD score is its squared Mahalanobis distance to the nearest group mean
(Lee et al., NeurIPS 2018). The 99th percentile of the validation tiles' scores is the
tile threshold (for a tile CNN, of every tissue tile of its validation slides read as
inference reads them: :mod:`cscvision.training.ood`); a slide is flagged when more of its
tissue tiles lie beyond it than the stated share (:data:`SLIDE_SHARE_FLOOR`, or twice the
highest share of a validation slide).

The record lives beside the weights: ``ood.safetensors`` (means, precision) and the
card's ``ood`` block (dimension, thresholds, rule, digest of the file). Never pickled.

How it can fool you: a slide from another domain whose features happen to fall near the
training means is not flagged (the score sees only the features the network learnt), and
validation slides that are themselves unusual raise the slide threshold. A new patient
whose stain lies beyond the validation patients' is flagged although the network scores it
well: the thresholds measure the validation patients' spread, not the spread between
patients (a cross-fitted reference, :func:`cscvision.training.ood.export_run_ood`, measures
that, and on the demo cohort stopped flagging unseen tissue too: docs/how-to/trust.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cscvision.core.io import atomic_path
from cscvision.models.card import ModelCard, ModelError

OOD_FILE = "ood.safetensors"
TILE_QUANTILE = 0.99  # validation tiles' score quantile that makes the tile threshold
SLIDE_SHARE_FLOOR = 0.10  # a slide is flagged when more of its tiles lie beyond than this
BLOCK_FEATURES = ("block_stats", "texture")  # read from the first block's feature maps
MIL_FEATURES = "mil_embedding"  # a MIL model's tile embeddings (its ``embed`` output)
MIN_GROUP_TILES = 20  # smaller target patterns join the pooled mean of all tiles
SLIDE_RULE = (
    "a slide is out of distribution when the share of its tissue tiles whose OOD score "
    "exceeds the 99th percentile of validation tiles is above slide_share_threshold "
    "(the larger of {floor:g} and twice the highest share of a validation slide)"
)


@dataclass(frozen=True)
class GaussianRecord:
    """Group means float32[K, D] and the inverse of their shared, shrunk covariance [D, D]."""

    means: np.ndarray
    precision: np.ndarray
    shrinkage: float


def ledoit_wolf(centred: np.ndarray) -> tuple[np.ndarray, float]:
    """The Ledoit-Wolf covariance of centred rows [N, D]: ``(1-a) S + a (tr S / D) I``
    with the shrinkage ``a`` that minimises the expected Frobenius error (their eq. 14)."""
    x = np.asarray(centred, np.float64)
    n, d = x.shape
    s = x.T @ x / n
    mu = np.trace(s) / d
    delta = np.sum((s - mu * np.eye(d)) ** 2)
    beta = (np.sum(np.sum(x * x, axis=1) ** 2) - n * np.sum(s * s)) / (n * n)
    a = 1.0 if delta == 0 else float(np.clip(beta / delta, 0.0, 1.0))
    return (1 - a) * s + a * mu * np.eye(d), a


def fit_gaussians(
    features: np.ndarray, groups: np.ndarray | None = None, *, shrinkage: float | None = None
) -> GaussianRecord:
    """Means per group and the pooled within-group covariance, shrunk (Ledoit-Wolf unless
    ``shrinkage`` is given; 0 keeps the sample covariance). Groups with fewer than
    :data:`MIN_GROUP_TILES` tiles are merged into one."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"OOD fit: need features [N ≥ 2, D], got shape {x.shape}")
    groups = np.zeros(len(x), int) if groups is None else np.asarray(groups)
    labels, counts = np.unique(groups, return_counts=True)
    small = set(labels[counts < MIN_GROUP_TILES].tolist())
    if small and len(small) < len(labels):
        groups = np.where(np.isin(groups, list(small)), -1, groups)
    elif small:  # every group is small: one Gaussian
        groups = np.zeros(len(x), int)
    means = np.stack([x[groups == g].mean(0) for g in np.unique(groups)])
    centred = x - means[np.searchsorted(np.unique(groups), groups)]
    if shrinkage is None:
        cov, a = ledoit_wolf(centred)
    else:
        s = centred.T @ centred / len(x)
        a = float(shrinkage)
        cov = (1 - a) * s + a * np.trace(s) / s.shape[0] * np.eye(s.shape[0])
    precision = np.linalg.pinv(cov, hermitian=True)
    return GaussianRecord(means.astype(np.float32), precision.astype(np.float32), a)


def mahalanobis(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor):
    """Squared Mahalanobis distance of each row [N, D] to its nearest mean [K, D] under the
    shared ``precision`` [D, D]: ``min_k (x − μ_k)ᵀ P (x − μ_k)`` → [N]."""
    diff = features.float()[:, None, :] - means[None, :, :]  # [N, K, D]
    return torch.einsum("nkd,de,nke->nk", diff, precision, diff).min(dim=1).values


# --- the network's features --------------------------------------------------------------


def early_block(net: nn.Module) -> nn.Module | None:
    """The first block after a tile CNN's stem (``small_cnn``'s first conv block, a ResNet's
    ``layer1``, the second stage of ``features`` in the others), or None."""
    if isinstance(getattr(net, "layer1", None), nn.Module):
        return net.layer1
    features = getattr(net, "features", None)
    if isinstance(features, nn.Sequential) and len(features) > 1:
        return features[1]
    if isinstance(net, nn.Sequential):
        return next((m for m in net if isinstance(m, nn.Sequential)), None)
    return None


def feature_source(net: nn.Module, features: str | None = None) -> tuple[nn.Module, str]:
    """Where a network's OOD features are read, and their name: an encoder's output
    (``encoder``, always for heads on an encoder); ``block_stats``, the per-channel spatial
    mean and standard deviation of the first block's feature maps (the default for tile
    CNNs: the most sensitive to an unseen tissue type, and to artefact tiles and stain
    outliers, which thresholds set on whole validation slides allow for); ``texture``, their
    standard deviation only; ``penultimate``, the input of its last
    linear layer; ``mil_embedding``, always for a MIL model, its tile embeddings (the
    output of its ``embed``: the gated-attention net's hidden layer, or the encoder's
    features themselves for ``instance_linear``, whose ``embed`` is the identity)."""
    mil_embed = getattr(getattr(net, "mil", None), "embed", None)
    if isinstance(mil_embed, nn.Module):  # a MIL model's tiles (models.mil.MILTileNet)
        return mil_embed, MIL_FEATURES
    if isinstance(getattr(net, "encoder", None), nn.Module):
        return net.encoder, "encoder"
    block = early_block(net)
    if features in (None, *BLOCK_FEATURES) and block is not None:
        return block, features or "block_stats"
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(f"{type(net).__name__}: no linear layer to read OOD features from")
    return linears[-1], "penultimate"


def _feature_value(where: str, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    if where == "texture":
        return output.detach().float().std(dim=(2, 3))
    if where == "block_stats":
        maps = output.detach().float()
        return torch.cat([maps.mean(dim=(2, 3)), maps.std(dim=(2, 3))], dim=1)
    value = output if where in ("encoder", MIL_FEATURES) else inputs[0]
    return value.detach().float().flatten(1)


@contextmanager
def feature_tap(net: nn.Module, features: str | None = None) -> Iterator[list[torch.Tensor]]:
    """While open, each forward pass of ``net`` appends its OOD features [B, D] (float32,
    on the net's device; :func:`feature_source`) to the list it yields."""
    module, where = feature_source(net, features)
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        seen.append(_feature_value(where, inputs, output))

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


# --- the record beside the weights ------------------------------------------------------


@dataclass(frozen=True)
class OODScorer:
    """A model's OOD record, ready to score features on ``device``."""

    means: torch.Tensor
    precision: torch.Tensor
    tile_threshold: float
    slide_share_threshold: float
    features: str = "penultimate"  # feature_source's name

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return mahalanobis(features, self.means, self.precision)

    def to(self, device: torch.device) -> OODScorer:
        return OODScorer(
            self.means.to(device),
            self.precision.to(device),
            self.tile_threshold,
            self.slide_share_threshold,
            self.features,
        )


def ood_scores_of(record: GaussianRecord, features: np.ndarray) -> np.ndarray:
    """Each row's score [N] against ``record``, in an array of its own: a kept view of
    torch's buffer fragments the heap, and slides scored one after another then grow the
    process by about a slide's features each (``scripts/ood_stream_memory.py``)."""
    x = torch.as_tensor(np.asarray(features, np.float32))
    scores = mahalanobis(x, torch.as_tensor(record.means), torch.as_tensor(record.precision))
    return scores.numpy().copy()


def slide_shares(scores: np.ndarray, slide_idx: np.ndarray, threshold: float) -> np.ndarray:
    """Share of each slide's tiles whose score exceeds ``threshold``."""
    return np.array([np.mean(scores[slide_idx == s] > threshold) for s in np.unique(slide_idx)])


def reference_thresholds(per_slide: Sequence[np.ndarray]) -> tuple[float, float, np.ndarray]:
    """The tile threshold (the :data:`TILE_QUANTILE` of every reference tile's score), the
    slide share threshold (the larger of :data:`SLIDE_SHARE_FLOOR` and twice the highest
    share of a reference slide beyond it) and each reference slide's share."""
    threshold = float(np.quantile(np.concatenate(per_slide), TILE_QUANTILE))
    shares = np.array([np.mean(s > threshold) for s in per_slide])
    return threshold, max(SLIDE_SHARE_FLOOR, 2 * float(shares.max())), shares


def ood_block(
    record: GaussianRecord,
    *,
    features: str,
    train_tiles: int,
    val_scores: np.ndarray,
    val_slide_idx: np.ndarray,
) -> dict[str, Any]:
    """The card's ``ood`` block (without the file digest) from a fitted record and the
    validation tiles' scores."""
    per_slide = [val_scores[val_slide_idx == s] for s in np.unique(val_slide_idx)]
    threshold, share_threshold, shares = reference_thresholds(per_slide)
    return {
        "method": "mahalanobis",
        "file": OOD_FILE,
        "features": features,
        "dim": int(record.means.shape[1]),
        "groups": int(record.means.shape[0]),
        "shrinkage": round(record.shrinkage, 6),
        "tile_quantile": TILE_QUANTILE,
        "tile_threshold": threshold,
        "slide_share_threshold": round(share_threshold, 4),
        "rule": SLIDE_RULE.format(floor=SLIDE_SHARE_FLOOR),
        "train_tiles": int(train_tiles),
        "val_tiles": len(val_scores),
        "val_slides": len(shares),
        "val_slide_shares_max": round(float(shares.max()), 4),
    }


def write_ood_record(model_dir: str | Path, record: GaussianRecord, block: dict) -> dict:
    """Write ``ood.safetensors`` into ``model_dir``; returns ``block`` with its digest."""
    path = Path(model_dir) / OOD_FILE
    tensors = {
        "means": torch.as_tensor(record.means),
        "precision": torch.as_tensor(record.precision),
    }
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    return {**block, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def load_ood(model_dir: str | Path, card: ModelCard) -> OODScorer | None:
    """The model's OOD scorer, or None when its card keeps no OOD record."""
    block = card.ood
    if not block:
        return None
    path = Path(model_dir) / block.get("file", OOD_FILE)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelError(
            f"{path}: the card's OOD record names this file but it cannot be read "
            f"({e.strerror or e}); copy it with the model or remove the card's ood block"
        ) from None
    if block.get("sha256") and hashlib.sha256(data).hexdigest() != block["sha256"]:
        raise ModelError(f"{path}: sha256 differs from the card's ood.sha256; re-export it")
    tensors = load_file(str(path))
    return OODScorer(
        tensors["means"].float(),
        tensors["precision"].float(),
        float(block["tile_threshold"]),
        float(block["slide_share_threshold"]),
        str(block.get("features", "penultimate")),
    )


def collect_features(
    net: nn.Module,
    batches: Iterable[dict],
    card: ModelCard,
    *,
    device: str = "cpu",
    features: str | None = None,
    stain_sources: Sequence[Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """OOD features [N, D], targets [N, T], slide indices [N] and where the features come
    from (:func:`feature_source`; ``encoder`` for stored features) of training batches: uint8
    tile images (``image``, normalised with the card's mean and std and run through
    ``net``) or stored encoder features (``features``, used as they are). ``stain_sources``:
    each slide's own stains by ``slide_idx``, for a Macenko/Vahadane card template."""
    from cscvision.slides.slide_stains import per_tile
    from cscvision.slides.stain import StainReference, normalise_batch

    stain = StainReference.from_dict(card.stain) if card.stain else None
    mean = torch.tensor(card.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(card.std).view(1, 3, 1, 1) * 255
    feats, targets, slides = [], [], []
    where = feature_source(net, features)[1]
    net = net.eval().to(device)
    with torch.inference_mode(), feature_tap(net, features) as seen:
        for batch in batches:
            if "features" in batch and "image" not in batch:
                feats.append(batch["features"].float().flatten(1).numpy())
                where = "encoder"
            else:
                image = batch["image"]
                if stain is not None:
                    source = per_tile(stain_sources, batch.get("slide_idx"))
                    image = normalise_batch(image, stain, source=source)
                net(((image.float() - mean) / std).to(device))
                feats.append(seen.pop().cpu().numpy())
            targets.append(np.asarray(batch["target"], np.float32))
            slides.append(np.asarray(batch["slide_idx"]))
    if not feats:
        raise ValueError("OOD fit: no tiles to fit on")
    return np.concatenate(feats), np.concatenate(targets), np.concatenate(slides), where


def target_groups(targets: np.ndarray) -> np.ndarray:
    """A group per pattern of targets ≥ 0.5 (bit i set when target i is)."""
    bits = (np.asarray(targets) >= 0.5).astype(int)
    return (bits * (1 << np.arange(bits.shape[1]))).sum(1)


@dataclass(frozen=True)
class OODFit:
    """A fitted record, its card block, and the training tiles' features it was fitted on
    (with their slide indices and Gaussian groups, None for one Gaussian)."""

    record: GaussianRecord
    block: dict[str, Any]
    train: np.ndarray
    train_slide_idx: np.ndarray
    groups: np.ndarray | None


def fit_ood(
    net: nn.Module,
    card: ModelCard,
    train_batches: Iterable[dict],
    val_batches: Iterable[dict],
    *,
    features: str | None = None,
    stain_sources: Sequence[Any] | None = None,
) -> OODFit:
    """Fit the OOD record on the training tiles' features (one Gaussian per target pattern
    for a thresholded model, else one) and score the validation tiles against it."""
    kw = {"features": features, "stain_sources": stain_sources}
    train, targets, train_slides, where = collect_features(net, train_batches, card, **kw)
    groups = target_groups(targets) if card.thresholded and where not in BLOCK_FEATURES else None
    record = fit_gaussians(train, groups)
    val_features, _, val_slides, _ = collect_features(net, val_batches, card, **kw)
    block = ood_block(
        record,
        features=where,
        train_tiles=len(train),
        val_scores=ood_scores_of(record, val_features),
        val_slide_idx=val_slides,
    )
    return OODFit(record, block, train, train_slides, groups)


def export_ood(model_dir: str | Path, card: ModelCard, record: GaussianRecord, block: dict):
    """Write the record beside the weights and the card with its ``ood`` block; returns
    the new card. The weights file is not touched."""
    import dataclasses
    import json

    from cscvision.core.io import write_json
    from cscvision.models.card import CARD_FILE

    card = dataclasses.replace(card, ood=write_ood_record(model_dir, record, block))
    path = Path(model_dir) / CARD_FILE
    raw = json.loads(path.read_text()) if path.is_file() else card.to_json()
    write_json(path, {**raw, "ood": card.ood})  # the card as written, plus its record
    return card

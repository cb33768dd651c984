"""Heads trained on stored tile features: ``model.encoder: NAME`` in a training config.

The encoder is frozen: each training tile is embedded once into the slide's feature store
(``<features_dir>/<slide_id>.h5``, extracted where missing, reused where it already holds
the tile with the same encoder and weights), and only a small head (``linear`` or
``mlp``) is trained on the stored features, with the same labels, splits, loss, metrics,
thresholds and export as a tile CNN (:class:`HeadClassifier` is a
:class:`~cscvision.training.lit.TileClassifier` whose batches carry features, not images;
:class:`HeadRegressor` the same for ``task: regression``).

The exported folder holds the head's weights; its card names the encoder (registry name,
sha256 of the weights file, the file used in training). :func:`load_head_net` joins the
two again for inference: :class:`EncoderHead` maps uint8-normalised tiles to logits, so
every inference path (local, shards, Ray) runs unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cscvision.features.encoders import Encoder, FeaturesUnavailable, file_sha256, load_encoder
from cscvision.features.registry import EncoderError, EncoderSpec, get_encoder_spec
from cscvision.training.card import ModelCard, ModelError
from cscvision.training.lit import TileClassifier
from cscvision.training.regression import TileRegressor

HEADS = ("linear", "mlp")
MLP_HIDDEN = 256


def make_head(kind: str, dim: int, n_outputs: int) -> nn.Module:
    """``linear``: one linear layer; ``mlp``: LayerNorm → 256 GELU units → dropout → logits."""
    if kind == "linear":
        return nn.Sequential(nn.Linear(dim, n_outputs))
    if kind == "mlp":
        return nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, MLP_HIDDEN),
            nn.GELU(),
            nn.Dropout(0.2),
            nn.Linear(MLP_HIDDEN, n_outputs),
        )
    raise ValueError(f"model.head {kind!r}: choose one of {', '.join(HEADS)}")


class EncoderHead(nn.Module):
    """A frozen encoder and the head trained on its features: tiles → logits [B, T]."""

    def __init__(self, encoder: Encoder, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).float())


class HeadClassifier(TileClassifier):
    """A :class:`TileClassifier` over batches ``{"features": [B, D], "xy", "target",
    "slide_idx"}``; ``net`` is the head."""

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.net(batch["features"].float())
        loss = self._loss(logits, batch["target"], batch.get("weight"))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str, preds: Any) -> None:
        logits = self.net(batch["features"].float())
        preds.update(logits, batch["target"], batch["slide_idx"], batch["xy"])

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        probs = torch.sigmoid(self.net(batch["features"].float()).float())
        return {"xy": batch["xy"], "slide_idx": batch["slide_idx"], "probs": probs}


class HeadRegressor(HeadClassifier, TileRegressor):
    """A :class:`~cscvision.training.regression.TileRegressor` (standardised outputs, MSE or
    Pearson loss, metrics over patients) over batches of stored features."""

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        values = self.to_units(self.net(batch["features"].float()).float())
        return {"xy": batch["xy"], "slide_idx": batch["slide_idx"], "probs": values}


def load_head_net(
    card: ModelCard, head_state: Mapping[str, torch.Tensor], encoder_weights: str | Path | None
) -> EncoderHead:
    """The card's encoder from ``encoder_weights`` (default: the file named at training,
    if it is still there) joined to the head; :class:`ModelError` says what does not fit,
    including weights whose sha256 differs from those the head was trained on."""
    spec, encoder = load_card_encoder(card, encoder_weights)
    head = make_head(card.backbone, spec.dim, len(card.targets))
    try:
        head.load_state_dict(dict(head_state), strict=True)
    except RuntimeError as e:
        raise ModelError(
            f"model {card.name!r}: head weights do not fit a {card.backbone} head on "
            f"{spec.name} ({str(e).splitlines()[0]})"
        ) from None
    return EncoderHead(encoder, head)


def load_card_encoder(
    card: ModelCard, encoder_weights: str | Path | None
) -> tuple[EncoderSpec, Encoder]:
    """The encoder a card names, from ``encoder_weights`` or the file named at training;
    :class:`ModelError` when it is missing or its sha256 is not the one trained with."""
    ref = card.encoder
    try:
        spec = get_encoder_spec(str(ref.get("name")))
        path = _encoder_file(card, spec, encoder_weights)
        digest = file_sha256(path)
        want = str(ref.get("weights_sha256", ""))
        if digest != want:
            raise ModelError(
                f"{path}: these {spec.name} weights (sha256 {digest[:16]}…) differ from the "
                f"ones model {card.name!r} was trained on (sha256 {want[:16]}…, "
                f"{ref.get('weights_file')}); its head would read the wrong features: pass "
                "--encoder-weights with that file"
            )
        return spec, load_encoder(spec, path)
    except (EncoderError, FeaturesUnavailable) as e:
        raise ModelError(str(e)) from None


def _encoder_file(card: ModelCard, spec: EncoderSpec, given: str | Path | None) -> Path:
    if given is not None:
        return Path(given)
    trained_with = Path(str(card.encoder.get("weights_file") or ""))
    if trained_with.is_file():
        return trained_with
    raise ModelError(
        f"model {card.name!r} is a head on encoder {spec.name}: pass --encoder-weights FILE "
        f"(the {spec.name} weights, {spec.weights_file}, sha256 "
        f"{str(card.encoder.get('weights_sha256'))[:16]}…; trained with {trained_with})"
    )


def check_head_config(model: Any) -> None:
    """``model.encoder`` names a registered encoder, ``model.weights`` a file and
    ``model.head`` a known head; raises ``ValueError`` naming the key."""
    try:
        get_encoder_spec(str(model.encoder))
    except EncoderError as e:
        raise ValueError(f"model.encoder: {e}") from None
    if model.head not in HEADS:
        raise ValueError(f"model.head: {model.head!r} is not one of {', '.join(HEADS)}")
    if not model.weights:
        raise ValueError(
            f"model.weights: name the local weights file of encoder {model.encoder} "
            "(nothing is downloaded)"
        )

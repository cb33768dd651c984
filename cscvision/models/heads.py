"""Networks on a foundation-model encoder: a head on its features (``linear`` or
``mlp``), and the encoder joined to its head (:class:`EncoderHead`), optionally with its
last blocks fine-tuned.

The exported folder of such a model holds the head's weights (and any tuned blocks); its
card names the encoder (registry name, sha256 of the weights file, the file used in
training). :func:`load_head_net` joins the two again for inference: :class:`EncoderHead`
maps normalised tiles to logits, so every inference path (local, shards, Ray) runs
unchanged. No Lightning here: the training systems are in :mod:`cscvision.training.heads`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cscvision.core.io import file_sha256
from cscvision.models.card import ModelCard, ModelError
from cscvision.models.encoders import Encoder, FeaturesUnavailable, load_encoder
from cscvision.models.registry import EncoderError, EncoderSpec, get_encoder_spec

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


def encoder_blocks(encoder: Encoder) -> list[tuple[str, nn.Module]]:
    """The encoder's blocks in order, named as in its state dict (``trunk.blocks.11``):
    a ViT's transformer blocks, a ResNet's stages, the small CNN's layers with weights."""
    trunk = encoder.trunk
    if isinstance(getattr(trunk, "blocks", None), nn.Sequential):
        return [(f"trunk.blocks.{i}", b) for i, b in enumerate(trunk.blocks)]
    stages = [f"layer{i}" for i in range(1, 5) if hasattr(trunk, f"layer{i}")]
    if stages:
        return [(f"trunk.{name}", getattr(trunk, name)) for name in stages]
    if isinstance(trunk, nn.Sequential):
        return [(f"trunk.{i}", m) for i, m in enumerate(trunk) if _has_parameters(m)]
    raise ValueError(f"encoder {encoder.spec.name}: no blocks to fine-tune")


def tuned_prefixes(encoder: Encoder, blocks: int) -> list[str]:
    """State-dict prefixes of what ``model.finetune_blocks: blocks`` trains: the last
    ``blocks`` blocks and, for a ViT, the norm after them (``trunk.norm``; not ``fc_norm``,
    which ``forward_features`` never applies)."""
    named = encoder_blocks(encoder)
    if not 1 <= blocks <= len(named):
        raise ValueError(
            f"model.finetune_blocks: {blocks}: encoder {encoder.spec.name} has {len(named)} "
            f"blocks; give 1 to {len(named)}, or 0 to train a head on stored features"
        )
    prefixes = [name for name, _ in named[-blocks:]]
    if isinstance(getattr(encoder.trunk, "blocks", None), nn.Sequential):
        if _has_parameters(getattr(encoder.trunk, "norm", nn.Identity())):
            prefixes.append("trunk.norm")
    return prefixes


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class EncoderHead(nn.Module):
    """An encoder and the head trained on its features: tiles → logits [B, T].

    Frozen, unless :meth:`tune` opens its last blocks to training (``model.finetune_blocks``).
    """

    def __init__(self, encoder: Encoder, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.tuned: list[str] = []  # encoder state-dict prefixes that train

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).float())

    def tune(self, blocks: int) -> list[str]:
        """Freeze the encoder but its last ``blocks`` blocks (:func:`tuned_prefixes`);
        returns the names of the encoder parameters that now train."""
        self.tuned = tuned_prefixes(self.encoder, blocks)
        names = []
        for name, param in self.encoder.named_parameters():
            param.requires_grad_(_under(name, self.tuned))
            if param.requires_grad:
                names.append(name)
        self.train(self.training)
        return names

    def train(self, mode: bool = True) -> EncoderHead:
        """As :meth:`nn.Module.train`, but the frozen part of the encoder stays in eval mode
        (its dropout off, its batch-norm statistics fixed) while the rest trains."""
        super().train(mode)
        if mode:
            self.encoder.eval()
            for name, module in self.encoder.named_modules():
                if name and _under(name, self.tuned):
                    module.train()
        return self

    def exported_state(self) -> dict[str, torch.Tensor]:
        """What an exported model keeps: the head's weights (their own names, as for a head
        on stored features) and the tuned encoder weights as ``encoder.<name>``; the frozen
        rest comes from the encoder's own file when the model is loaded."""
        state = dict(self.head.state_dict())
        for name, value in self.encoder.state_dict().items():
            if _under(name, self.tuned):
                state[f"encoder.{name}"] = value
        return state


def encoder_reference(
    spec: EncoderSpec, *, weights_sha256: str, weights_file: str, **extra: Any
) -> dict[str, Any]:
    """A card's ``encoder`` record: the registered encoder, the sha256 and path of the
    weights file it was trained with, the file as published, its embedding; ``extra``
    adds what the kind needs (``features_dir``; ``finetune_blocks`` and ``tuned``)."""
    return {
        "name": spec.name,
        "weights_sha256": weights_sha256,
        "weights_file": weights_file,
        "expected_file": spec.weights_file,
        "timm_name": spec.timm_name,
        "dim": spec.dim,
        "pool": spec.pool,
        **extra,
    }


def load_head_net(
    card: ModelCard, head_state: Mapping[str, torch.Tensor], encoder_weights: str | Path | None
) -> EncoderHead:
    """The card's encoder from ``encoder_weights`` (default: the file named at training,
    if it is still there) joined to the head; :class:`ModelError` says what does not fit,
    including weights whose sha256 differs from those the head was trained on."""
    spec, encoder = load_card_encoder(card, encoder_weights)
    head = make_head(card.backbone, spec.dim, len(card.targets))
    state = dict(head_state)
    tuned = {k[len("encoder.") :]: state.pop(k) for k in list(state) if k.startswith("encoder.")}
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(
            f"model {card.name!r}: head weights do not fit a {card.backbone} head on "
            f"{spec.name} ({str(e).splitlines()[0]})"
        ) from None
    net = EncoderHead(encoder, head)
    blocks = int(card.encoder.get("finetune_blocks") or 0)
    if blocks or tuned:
        _load_tuned(net, card, blocks, tuned)
    return net


def _load_tuned(
    net: EncoderHead, card: ModelCard, blocks: int, tuned: Mapping[str, torch.Tensor]
) -> None:
    """Replace the encoder's last ``blocks`` blocks with the fine-tuned ones of the model."""
    try:
        prefixes = tuned_prefixes(net.encoder, blocks)
    except ValueError as e:
        raise ModelError(f"model {card.name!r}: {e}") from None
    want = {k for k in net.encoder.state_dict() if _under(k, prefixes)}
    if set(tuned) != want:
        missing, extra = sorted(want - set(tuned)), sorted(set(tuned) - want)
        raise ModelError(
            f"model {card.name!r}: its fine-tuned encoder weights do not fit the last "
            f"{blocks} blocks of {net.encoder.spec.name} (missing {missing[:3]}, "
            f"unexpected {extra[:3]})"
        )
    try:
        net.encoder.load_state_dict(dict(tuned), strict=False)
    except RuntimeError as e:  # a tensor of another shape
        raise ModelError(
            f"model {card.name!r}: fine-tuned encoder weights do not fit "
            f"{net.encoder.spec.name} ({str(e).splitlines()[0]})"
        ) from None
    net.tuned = prefixes


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

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

from collections.abc import Mapping, Sequence
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


def encoder_system(
    cfg: Any,
    targets: Sequence[str],
    dm: Any,
    net: nn.Module,
    kinds: tuple[type[TileClassifier], type[TileRegressor]],
    **options: Any,
) -> TileClassifier:
    """The training system of a network on an encoder (``cfg.model.encoder``): the first of
    ``kinds`` for classification (with ``pos_weight`` from ``dm``'s training targets when
    ``data.balance`` says so), the second for ``task: regression`` (standardised by them,
    its bootstrap grouped by patient); ``options`` add to the config's settings."""
    from cscvision.features.registry import get_encoder_spec
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
    if cfg.task == "regression":
        mean, std = standardise_stats(train_targets)
        module = kinds[1](target_mean=mean, target_std=std, loss=cfg.regression.loss,
                          n_boot=cfg.regression.bootstrap, **common)  # fmt: skip
        patient = {t.slide_id: t.patient_id for tiles in dm.slides.values() for t in tiles}
        module.slide_groups = [patient[i] for i in dm.slide_ids]  # bootstrap over patients
        return module
    weights = None
    if cfg.data.balance == "pos_weight":
        weights = [float(w) for w in pos_weight(train_targets)]
    return kinds[0](pos_weight=weights, **common)


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

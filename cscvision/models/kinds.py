"""The kinds of model, behind one interface, and the one registry that tells them apart.

A model kind says what a model reads (tile px, µm/px, normalisation: the card's), how
its network is rebuilt from an exported folder, how a batch of tiles becomes per-tile
outputs, how per-tile outputs become the slide's outputs (MIL aggregates; the others
pass them on) and which maps it writes. Four kinds ship:

| kind | network | trained by |
|---|---|---|
| ``tile`` | a tile CNN (:mod:`cscvision.models.backbones`) | ``training.train:train_tiles`` |
| ``head`` | a head on a frozen encoder's stored features | same, features from stores |
| ``finetune`` | a head with the encoder's last blocks tuned | same, on tile images |
| ``mil`` | attention MIL over a slide's tile features | ``training.mil_train:train_mil`` |

A fifth kind is one subclass of :class:`ModelKind` and one :func:`register_kind` call;
nothing outside this module asks which kind a model is. Training functions are named by
``"module:function"`` strings (``trainer``, ``pieces``), resolved by ``cscvision train``:
the model stage sits below ``training/`` and never imports it.

No torch at import: networks are built inside :meth:`ModelKind.build`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from cscvision.models.card import NEEDS, ModelCard, ModelError, legacy_kind

if TYPE_CHECKING:
    import numpy as np
    import torch

TILE_TRAINER = "cscvision.training.train:train_tiles"


class UnknownKind(ModelError, ValueError):
    """A model kind that is not registered (the message lists those that are)."""


@dataclass(frozen=True)
class ModelInput:
    """What a model reads: square tiles of ``tile_px`` at ``mpp`` µm/px, as
    ``(x / 255 − mean) / std``."""

    tile_px: int
    mpp: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class ModelKind:
    """One kind of model. Subclasses set ``name`` and implement :meth:`build`; the other
    methods have the defaults of a model whose per-tile outputs are its maps."""

    name: ClassVar[str] = ""
    # "module:function" running a whole training run: f(cfg, kind, *, resume, progress)
    trainer: ClassVar[str] = TILE_TRAINER
    # for TILE_TRAINER: "module:function" f(cfg, targets, by_split, run_dir, progress)
    # -> (datamodule, Lightning system holding a models/ network, card["encoder"] record)
    pieces: ClassVar[str] = ""
    slide_level: ClassVar[bool] = False  # predicts slide labels (its maps explain them)
    # the card's typed parts this kind needs (models.card.CARD_RECORDS: encoder, mil)
    card_records: ClassVar[tuple[str, ...]] = ()

    def reads(self, card: ModelCard) -> ModelInput:
        return ModelInput(card.tile_px, card.mpp, tuple(card.mean), tuple(card.std))

    def build(
        self, card: ModelCard, state: Mapping[str, torch.Tensor], encoder_weights: Any = None
    ) -> torch.nn.Module:
        """The network of an exported model with its weights ``state`` loaded."""
        raise NotImplementedError

    def output_width(self, card: ModelCard) -> int:
        """Columns the network gives per tile."""
        return len(card.targets)

    def tile_outputs(self, card: ModelCard, logits: torch.Tensor) -> np.ndarray:
        """A batch's network outputs [B, W] → per-tile outputs float32 [B, W]: calibrated
        probabilities (classification) or scores in the card's units (regression), floored
        where the card says (:meth:`~cscvision.models.card.ModelCard.floors`)."""
        import numpy as np
        import torch

        from cscvision.models.calibration import calibrate

        if card.is_regression:
            scale = card.output_scale
            mean = torch.tensor(scale.get("mean", [0.0]), device=logits.device)
            std = torch.tensor(scale.get("std", [1.0]), device=logits.device)
            scores = (logits * std + mean).cpu().numpy()
            floors = np.array([np.nan if f is None else f for f in card.floors()])
            clipped = np.where(np.isnan(floors), scores, np.maximum(scores, floors))
            return clipped.astype(np.float32)  # a NaN score stays NaN (np.fmax made it 0)
        if not card.calibration:
            return torch.sigmoid(logits).cpu().numpy()
        return calibrate(logits.cpu().numpy(), card.targets, card.calibration)

    def slide_outputs(
        self, net: torch.nn.Module, card: ModelCard, rows: np.ndarray
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """A slide's per-tile outputs [N, W] → its map channels [N, T] and the extra
        fields of its prediction (``tile_values``, ``slide_prediction``)."""
        return rows, {}

    def map_targets(self, card: ModelCard) -> tuple[str, ...]:
        """The maps it writes, one per channel: the card's targets."""
        return tuple(card.targets)

    def check_config(self, cfg: Any) -> None:
        """Raise ``ValueError`` for a training config this kind cannot train."""

    def check_card(self, card: ModelCard, where: str = "") -> None:
        """Raise :class:`ModelError` when ``card`` lacks a part this kind needs
        (``card_records``; each part's own types are checked by the card)."""
        for part in self.card_records:
            if not getattr(card, part):
                raise ModelError(
                    f"{where or card.name}: a model of kind {self.name} needs its {part} "
                    f"record ({NEEDS[part]}); was it exported by cscvision train?"
                )

    def training_note(self, cfg: Any) -> str | None:
        """What the card's ``training.pretrained`` says of the starting weights."""
        return None

    def legacy_task(self, card: ModelCard) -> str:
        """The 0.1.0 card's ``task`` (output digests stay as they were)."""
        return card.target_type


class TileCNN(ModelKind):
    name = "tile"
    pieces = "cscvision.training.train:tile_pieces"

    def build(self, card, state, encoder_weights=None):
        from cscvision.models.backbones import get_model

        net = get_model(card.backbone, len(card.targets), head_dropout=card.head_dropout)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ModelError(
                f"model {card.name!r}: weights do not match backbone {card.backbone!r} with "
                f"{len(card.targets)} outputs ({str(e).splitlines()[0]})"
            ) from None
        return net


class EncoderHeadKind(ModelKind):
    """A head on a frozen foundation-model encoder's stored features."""

    name = "head"
    pieces = "cscvision.training.featuredata:head_pieces"
    card_records = ("encoder",)

    def build(self, card, state, encoder_weights=None):
        from cscvision.models.heads import load_head_net

        return load_head_net(card, state, encoder_weights)

    def training_note(self, cfg: Any) -> str | None:
        return f"frozen encoder {cfg.model.encoder}"


class FineTunedEncoder(EncoderHeadKind):
    """A head trained end to end with the encoder's last ``model.finetune_blocks`` blocks."""

    name = "finetune"
    pieces = "cscvision.training.finetune:finetune_pieces"

    def check_config(self, cfg: Any) -> None:
        """The block count against the encoder's architecture, built on the meta device (no
        weights, no memory): at the start of training, not while the config is read."""
        from cscvision.models.encoders import FeaturesUnavailable, build_encoder
        from cscvision.models.heads import tuned_prefixes
        from cscvision.models.registry import EncoderError

        blocks = cfg.model.finetune_blocks
        if not blocks:
            raise ValueError("kind finetune: set model.finetune_blocks to the blocks to tune")
        try:
            tuned_prefixes(build_encoder(str(cfg.model.encoder), device="meta"), blocks)
        except (EncoderError, FeaturesUnavailable) as e:
            raise ValueError(str(e)) from None

    def training_note(self, cfg: Any) -> str | None:
        blocks = cfg.model.finetune_blocks
        return f"encoder {cfg.model.encoder}, its last {blocks} block(s) fine-tuned"


class AttentionMIL(ModelKind):
    """Attention MIL on slide-level labels: per-tile parts, one aggregation per slide."""

    name = "mil"
    trainer = "cscvision.training.mil_train:train_mil"
    slide_level = True
    card_records = ("encoder", "mil")

    def build(self, card, state, encoder_weights=None):
        from cscvision.models.mil import load_mil_net

        return load_mil_net(card, state, encoder_weights)

    def output_width(self, card: ModelCard) -> int:
        mil = card.mil
        classes = sum(len(c["classes"]) for c in mil.get("classification", []))
        return 1 + len(mil.get("regression", [])) + classes

    def tile_outputs(self, card, logits):
        return logits.cpu().numpy()  # per-tile parts, aggregated per slide afterwards

    def slide_outputs(self, net, card, rows):
        from cscvision.models.mil import mil_slide_outputs, slide_prediction_record

        channels, raw, out = mil_slide_outputs(rows, net.mil, card.mil)
        return channels, {"tile_values": raw, "slide_prediction": slide_prediction_record(out)}

    def check_config(self, cfg: Any) -> None:
        from cscvision.models.mil_net import ARCHITECTURES

        if cfg.model.finetune_blocks:
            raise ValueError(
                "model.finetune_blocks: kind mil trains on stored features; set it to 0"
            )
        if not cfg.model.encoder:
            raise ValueError(
                "kind mil: name the encoder whose features form the bags (model.encoder "
                "and model.weights; see cscvision encoders)"
            )
        if not cfg.mil.labels:
            raise ValueError("mil.labels: name the slide-label CSV (slide_id or patient_id column)")
        if cfg.mil.architecture not in ARCHITECTURES:
            raise ValueError(f"mil.architecture: {cfg.mil.architecture!r} is not one of "
                             f"{', '.join(ARCHITECTURES)}")  # fmt: skip
        if cfg.cv.folds < 0 or min(cfg.mil.epochs, cfg.mil.max_bag, cfg.mil.accumulate) < 1:
            raise ValueError("cv.folds must be ≥ 0, mil.epochs, mil.max_bag and mil.accumulate ≥ 1")

    def legacy_task(self, card: ModelCard) -> str:
        return "mil"


KINDS: dict[str, ModelKind] = {}


def register_kind(kind: ModelKind, *, replace: bool = False) -> ModelKind:
    """Add ``kind`` to the registry under ``kind.name``."""
    if not kind.name:
        raise ValueError(f"{type(kind).__name__}: a model kind needs a name")
    if kind.name in KINDS and not replace:
        raise ValueError(f"model kind {kind.name!r} is registered already")
    KINDS[kind.name] = kind
    return kind


for _kind in (TileCNN(), EncoderHeadKind(), FineTunedEncoder(), AttentionMIL()):
    register_kind(_kind)


def get_kind(name: str) -> ModelKind:
    try:
        return KINDS[name]
    except KeyError:
        raise UnknownKind(
            f"model kind {name!r} is not registered; known kinds: {', '.join(sorted(KINDS))}"
        ) from None


def kind_of_config(cfg: Any) -> ModelKind:
    """The kind a training config trains: ``kind`` when set, else as 0.1.0 chose it."""
    if cfg.kind:
        return get_kind(cfg.kind)
    encoder = {"name": cfg.model.encoder} if cfg.model.encoder else None
    return get_kind(legacy_kind(None, encoder, cfg.model.finetune_blocks))


def resolve(reference: str) -> Callable[..., Any]:
    """The function a ``"module:function"`` string names."""
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)

"""The training config's schema: typed sections with ranges and choices (pydantic).

Each section is a frozen pydantic dataclass with no unknown keys; ``model`` is one
variant per model kind (``cscvision.models.kinds``), picked by the config's ``kind``.
The choices are written here, not learnt by importing the modules they configure (no
torch, no encoder built while a file is read); ``tests/test_config.py`` holds them equal
to the modules' own lists. :mod:`cscvision.training.config` reads files into these.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    model_validator,
)
from pydantic.dataclasses import dataclass
from pydantic_core import ArgsKwargs

from cscvision.models.card import legacy_kind
from cscvision.models.kinds import KINDS, get_kind
from cscvision.models.registry import IMAGENET_MEAN, IMAGENET_STD
from cscvision.slides.grid import GridSpec
from cscvision.slides.settings import Fraction, MaskMpp, Mpp, TilePx

SECTION = ConfigDict(extra="forbid", allow_inf_nan=False)


def _number(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a number, got true/false")
    if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ValueError("expected a number") from None
    return value


Int = Annotated[int, Strict()]
Count = Annotated[int, Strict(), Field(ge=1)]
Float = Annotated[float, BeforeValidator(_number)]
Bool = Annotated[bool, Strict()]
Text = Annotated[str, Strict()]
RGB = tuple[Annotated[int, Field(ge=0, le=255)], ...]
Normalisation = tuple[Float, Float, Float]

BACKBONES = ("small_cnn", "resnet18", "resnet34", "resnet50", "efficientnet_b0",
             "convnext_tiny", "mobilenet_v3_large")  # fmt: skip
Backbone = Literal[BACKBONES]  # type: ignore[valid-type]
AUGMENTS = ("none", "flips", "histo", "strong", "stain")
BALANCE = ("none", "pos_weight", "sampler")
SCHEDULERS = ("cosine", "onecycle", "none")
CALIBRATION = ("temperature", "isotonic", "none")
LOSSES = ("mse", "pearson")
TARGET_TYPES = ("classification", "regression")
HEADS = ("linear", "mlp")
MIL_ARCHITECTURES = ("auto", "gated_attention", "clam_sb", "mean", "instance_linear")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu")
PRECISIONS = ("auto", "32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16", "16-true",
              "bf16-true", "64-true", "64", "transformer-engine")  # fmt: skip


@dataclass(frozen=True, config=SECTION)
class CohortConfig:
    csv: Text = ""  # cohort manifest: slide_path, patient_id[, slide_id, annotation_path, split]
    split_fractions: tuple[Fraction, Fraction, Fraction] = (0.7, 0.15, 0.15)  # train, val, test
    split_seed: Annotated[int, Strict(), Field(ge=0)] = 0
    stratify: Bool = True  # balance the annotated targets across splits


@dataclass(frozen=True, config=SECTION)
class GridConfig(GridSpec):
    """Which tiles to cut (:class:`cscvision.slides.grid.GridSpec`, with the ranges the
    slide commands' flags have)."""

    mpp: Mpp = 0.5
    tile_px: Annotated[TilePx, Strict()] = 224
    overlap: Annotated[float, Field(ge=0, lt=1)] = 0.0
    min_tissue: Fraction = 0.5
    mask_mpp: MaskMpp = 8.0


@dataclass(frozen=True, config=SECTION)
class DataConfig:
    batch_size: Annotated[int, Strict(), Field(ge=1, le=65536)] = 64
    eval_batch_size: Count | None = None  # default: batch_size
    num_workers: Annotated[int, Strict(), Field(ge=0, le=256)] = 2  # DataLoader processes
    max_tiles_per_slide: Count | None = None  # random subset of training tiles per slide
    eval_max_tiles_per_slide: Count | None = None  # same for validation and test
    balance: Literal[BALANCE] = "pos_weight"  # type: ignore[valid-type]
    augment: Literal[AUGMENTS] = "histo"  # type: ignore[valid-type]
    # kind tile: a stain reference (cscvision stain fit) every tile is normalised to before
    # augmentation; the card keeps it, so infer applies it unasked
    stain: Text | None = None
    cache_dir: Text | None = None  # grids + targets cache; default <run_dir>/cache


@dataclass(frozen=True, config=SECTION)
class ModelSection:
    """Keys every model kind reads (a config written for 0.1.0 lists them all); each
    kind's variant below adds what it requires."""

    kind: Text = "tile"  # set from the config's ``kind``
    backbone: Backbone = "resnet18"
    pretrained: Text | None = None  # local weights file (.safetensors or state dict)
    mean: Normalisation = IMAGENET_MEAN
    std: Normalisation = IMAGENET_STD
    channels_last: Bool = True
    # tile CNNs: a dropout of this rate before the last linear layer (0: none), so that
    # infer --uncertainty mc works on backbones without dropout (resnet, convnext, ...)
    head_dropout: Annotated[Float, Field(ge=0, lt=1)] = 0.0
    # A head on a frozen encoder's stored features instead of a backbone (training/heads.py)
    encoder: Text | None = None  # registered encoder name (cscvision encoders)
    weights: Text | None = None  # the encoder's local weights file
    head: Literal[HEADS] = "linear"  # type: ignore[valid-type]
    features_dir: Text | None = None  # feature stores; default <run_dir>/features
    # > 0: train the encoder's last N blocks with the head, end to end on tile images
    finetune_blocks: Annotated[int, Strict(), Field(ge=0, le=1000)] = 0
    # the tuned blocks' learning rate, as a share of optim.lr
    finetune_lr_scale: Annotated[Float, Field(gt=0, le=10)] = 0.1


def _no_blocks(model: ModelSection, why: str) -> None:
    if model.finetune_blocks:
        raise ValueError(f"model.finetune_blocks: {why}")


def _needs_encoder(model: ModelSection) -> None:
    from cscvision.models.registry import EncoderError, get_encoder_spec

    if not model.encoder:
        raise ValueError(
            f"model.encoder: kind {model.kind} needs an encoder (model.encoder and "
            "model.weights; see cscvision encoders)"
        )
    try:
        get_encoder_spec(model.encoder)
    except EncoderError as e:
        raise ValueError(f"model.encoder: {e}") from None
    if not model.weights:
        raise ValueError(
            f"model.weights: name the local weights file of encoder {model.encoder} "
            "(nothing is downloaded)"
        )


@dataclass(frozen=True, config=SECTION)
class TileModel(ModelSection):
    """``kind: tile``: a tile CNN (``backbone``), from scratch or ``pretrained``."""

    kind: Literal["tile"] = "tile"

    def __post_init__(self) -> None:
        _no_blocks(self, "name the encoder to fine-tune (model.encoder and model.weights; "
                         "see cscvision encoders)")  # fmt: skip
        if self.encoder:
            raise ValueError("model.encoder: kind tile trains model.backbone; remove the "
                             "encoder or set kind: head")  # fmt: skip


@dataclass(frozen=True, config=SECTION)
class HeadModel(ModelSection):
    """``kind: head``: a head on a frozen encoder's stored features."""

    kind: Literal["head"] = "head"

    def __post_init__(self) -> None:
        _needs_encoder(self)
        _no_blocks(self, "kind head keeps the encoder frozen; set it to 0 or kind: finetune")


@dataclass(frozen=True, config=SECTION)
class FinetuneModel(ModelSection):
    """``kind: finetune``: a head trained with the encoder's last blocks."""

    kind: Literal["finetune"] = "finetune"

    def __post_init__(self) -> None:
        _needs_encoder(self)
        if not self.finetune_blocks:
            raise ValueError("model.finetune_blocks: kind finetune tunes the encoder's last "
                             "blocks; set it to 1 or more")  # fmt: skip


@dataclass(frozen=True, config=SECTION)
class MILModel(ModelSection):
    """``kind: mil``: attention MIL over an encoder's stored tile features."""

    kind: Literal["mil"] = "mil"

    def __post_init__(self) -> None:
        _needs_encoder(self)
        _no_blocks(self, "kind mil trains on stored features; set it to 0")


MODEL_SECTIONS: dict[str, type[ModelSection]] = {
    "tile": TileModel,
    "head": HeadModel,
    "finetune": FinetuneModel,
    "mil": MILModel,
}
OTHER = "registered"  # a kind registered later (a plugin): the common keys, its own checks


def _model_tag(value: Any) -> str:
    kind = value.get("kind") if isinstance(value, Mapping) else getattr(value, "kind", None)
    return kind if kind in MODEL_SECTIONS else OTHER


_VARIANTS = (
    *(Annotated[c, Tag(k)] for k, c in MODEL_SECTIONS.items()),
    Annotated[ModelSection, Tag(OTHER)],
)
ModelConfig = Annotated[Union[_VARIANTS], Discriminator(_model_tag)]  # noqa: UP007


@dataclass(frozen=True, config=SECTION)
class OptimConfig:
    lr: Annotated[Float, Field(gt=0, le=10)] = 1e-3
    weight_decay: Annotated[Float, Field(ge=0, le=10)] = 1e-4
    scheduler: Literal[SCHEDULERS] = "cosine"  # type: ignore[valid-type]
    warmup_frac: Annotated[Float, Field(ge=0, lt=1)] = 0.05


@dataclass(frozen=True, config=SECTION)
class MetricsConfig:
    slide_cutoff: Fraction = 0.05  # a slide is positive when its mean target exceeds this
    monitor: Text = "val/auroc_mean"  # what picks the best checkpoint
    monitor_mode: Literal["max", "min"] = "max"
    calibration: Literal[CALIBRATION] = "temperature"  # type: ignore[valid-type]


@dataclass(frozen=True, config=SECTION)
class RegressionConfig:
    """``target_type: regression``: continuous targets (e.g. spatial-transcriptomics scores)."""

    loss: Literal[LOSSES] = "mse"  # type: ignore[valid-type]
    bootstrap: Annotated[int, Strict(), Field(ge=0, le=1_000_000)] = 1000  # CI resamples
    units: Text = "score"  # what the targets measure, shown on the model card and colour bars


@dataclass(frozen=True, config=SECTION)
class MILNetConfig:
    """The MIL network and its training schedule: one record, one set of defaults, for
    ``kind: mil`` (the ``mil`` section) and ``cscvision mil`` (``training.mil.MILConfig``)."""

    # auto: instance_linear for regression-only labels, gated_attention with a class target
    architecture: Literal[MIL_ARCHITECTURES] = "auto"  # type: ignore[valid-type]
    hidden: Annotated[int, Strict(), Field(ge=1, le=65536)] = 128
    attention: Annotated[int, Strict(), Field(ge=1, le=65536)] = 64
    dropout: Annotated[Float, Field(ge=0, lt=1)] = 0.1
    max_bag: Annotated[int, Strict(), Field(ge=1)] = 2048  # tiles per bag per training step
    accumulate: Annotated[int, Strict(), Field(ge=1)] = 8  # bags per optimiser step
    epochs: Annotated[int, Strict(), Field(ge=1, le=100_000)] = 30


MILTargets = Union[list[Text], dict[Text, dict[Text, Any]], None]  # noqa: UP007


@dataclass(frozen=True, config=SECTION)
class MILSection(MILNetConfig):
    """``kind: mil``: a slide-level model over bags of stored encoder features
    (``model.encoder`` and ``model.weights`` name the encoder; training/mil_train.py)."""

    labels: Text = ""  # slide-label CSV keyed by slide_id or patient_id
    targets: MILTargets = None  # ["mRNAsi", "mRNAsi:tercile"] or {name: {target_type, ...}}
    covariates: list[Text] | None = None  # label-table columns given to the model (CV only)
    units: Text = "label units"  # what the regression labels measure, shown on the card


@dataclass(frozen=True, config=SECTION)
class CVConfig:
    folds: Annotated[int, Strict(), Field(ge=0, le=1000)] = 5  # k-fold CV over patients (mil)


_DEVICES = re.compile(r"^(auto|-1|\d+|\d+(\s*,\s*\d+)*,?)$")


def _devices(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a count, -1, a list of device ids, or auto")
    if isinstance(value, int) and value >= -1:
        return value
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        return value
    if isinstance(value, str) and _DEVICES.match(value.strip()):
        return value
    raise ValueError("expected a count, -1 (every device), a list of device ids, or auto")


def _precision(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


@dataclass(frozen=True, config=SECTION)
class TrainerConfig:
    """Passed to ``lightning.Trainer`` (``None`` leaves Lightning's default)."""

    max_epochs: Annotated[int, Strict(), Field(ge=1, le=100_000)] = 10
    accelerator: Literal[ACCELERATORS] = "auto"  # type: ignore[valid-type]
    devices: Annotated[Union[int, list[int], str], AfterValidator(_devices)] = 1  # noqa: UP007
    strategy: Text = "auto"  # auto | ddp | ddp_spawn | ...
    num_nodes: Count = 1
    precision: Annotated[Literal[PRECISIONS], BeforeValidator(_precision)] = "auto"  # type: ignore[valid-type]
    log_every_n_steps: Count = 10
    limit_train_batches: Annotated[Float, Field(gt=0)] | None = None
    limit_val_batches: Annotated[Float, Field(ge=0)] | None = None
    check_val_every_n_epoch: Count = 1
    gradient_clip_val: Annotated[Float, Field(gt=0)] | None = None
    accumulate_grad_batches: Count = 1
    deterministic: Bool = False


@dataclass(frozen=True, config=SECTION)
class CardConfig:
    trained_on: Text = ""  # a human summary of the training data, written on the model card
    synthetic: Bool = False  # the cohort is synthetic: the card says so in bold
    colors: dict[Text, Annotated[RGB, Field(min_length=3, max_length=3)]] = dataclasses.field(
        default_factory=dict
    )  # target → RGB
    intended_use: Text = "Research use only; not for diagnosis."


def _class_map(value: Any) -> Any:
    if value is None:
        return value
    from cscvision.labels.annotations import ClassMap

    try:
        ClassMap.from_dict(value)
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(str(e)) from None
    return value


@dataclass(frozen=True, config=SECTION)
class TrainConfig:
    name: Annotated[Text, Field(min_length=1)] = "cscvision"  # run and model name
    seed: Annotated[int, Strict(), Field(ge=0)] = 0
    threads: Count | None = None  # torch CPU threads of the training process; None: all cores
    # the model kind (cscvision.models.kinds): tile, head, finetune, mil or a registered one;
    # empty: head or finetune when model.encoder is set (finetune with blocks), else tile
    kind: Text = ""
    target_type: Literal[TARGET_TYPES] = "classification"  # type: ignore[valid-type]
    targets: list[Text] | None = None  # tile-label table columns; default: all of the first
    run_dir: Text | None = None  # default runs/<name>
    export_dir: Text | None = None  # default models/<name>
    cohort: CohortConfig = dataclasses.field(default_factory=CohortConfig)
    classes: Annotated[dict[Text, Any] | None, AfterValidator(_class_map)] = None  # class map
    grid: GridConfig = dataclasses.field(default_factory=GridConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=TileModel)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    regression: RegressionConfig = dataclasses.field(default_factory=RegressionConfig)
    mil: MILSection = dataclasses.field(default_factory=MILSection)
    cv: CVConfig = dataclasses.field(default_factory=CVConfig)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    card: CardConfig = dataclasses.field(default_factory=CardConfig)

    @model_validator(mode="before")
    @classmethod
    def _kind(cls, data: Any) -> Any:
        """``kind`` resolved (as 0.1.0 chose it when empty) and handed to ``model``."""
        if isinstance(data, ArgsKwargs):
            return ArgsKwargs(data.args, _with_kind(dict(data.kwargs or {})))
        return _with_kind(dict(data)) if isinstance(data, Mapping) else data


def _with_kind(values: dict[str, Any]) -> dict[str, Any]:
    model = values.get("model", {})
    if dataclasses.is_dataclass(model) and not isinstance(model, type):
        model = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}
    if not isinstance(model, Mapping):
        return values  # the section's own error says what is wrong
    model = dict(model)
    kind = (
        values.get("kind")
        or model.get("kind")
        or legacy_kind(None, model.get("encoder"), model.get("finetune_blocks", 0))
    )
    if isinstance(kind, str) and kind not in KINDS:
        try:
            get_kind(kind)
        except ValueError as e:  # UnknownKind lists the registered kinds
            raise ValueError(f"kind: {e}") from None
    model["kind"] = kind
    return {**values, "kind": kind, "model": model}

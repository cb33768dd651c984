"""Training configuration: frozen dataclasses built from YAML plus dotted overrides.

``load_config("cpu_demo", ["trainer.max_epochs=3", "data.batch_size=32"])`` starts from
the defaults below, applies the YAML file (a path, or the name of a packaged config), then
each override (its value parsed as YAML: ``3``, ``0.5``, ``null``, ``[1, 2]``, ``true``).
Unknown keys are errors that list the valid ones. The packaged ``default`` config
(``cscvision config show default``) documents every key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cscvision.core.errors import CscvisionError
from cscvision.core.resources import packaged_dir, packaged_names
from cscvision.models.card import IMAGENET_MEAN, IMAGENET_STD
from cscvision.slides.grid import GridSpec


class ConfigError(CscvisionError, ValueError):
    """A configuration that does not fit; the message names the key and the valid choices."""


@dataclass(frozen=True)
class CohortConfig:
    csv: str = ""  # cohort manifest: slide_path, patient_id[, slide_id, annotation_path, split]
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)  # train, val, test
    split_seed: int = 0
    stratify: bool = True  # balance the annotated targets across splits


@dataclass(frozen=True)
class DataConfig:
    batch_size: int = 64
    eval_batch_size: int | None = None  # default: batch_size
    num_workers: int = 2  # DataLoader worker processes, each reading whole batches
    max_tiles_per_slide: int | None = None  # random subset of training tiles per slide
    eval_max_tiles_per_slide: int | None = None  # same for validation and test
    balance: str = "pos_weight"  # none | pos_weight | sampler
    augment: str = "histo"  # none | flips | histo | strong
    cache_dir: str | None = None  # grids + targets cache; default <run_dir>/cache


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet18"
    pretrained: str | None = None  # local weights file (.safetensors or state dict)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channels_last: bool = True
    # A head on a frozen encoder's stored features instead of a backbone (training/heads.py)
    encoder: str | None = None  # registered encoder name (cscvision encoders)
    weights: str | None = None  # the encoder's local weights file
    head: str = "linear"  # linear | mlp
    features_dir: str | None = None  # feature stores; default <run_dir>/features
    # > 0: train the encoder's last N blocks with the head, end to end on tile images
    finetune_blocks: int = 0
    finetune_lr_scale: float = 0.1  # the tuned blocks' learning rate, as a share of optim.lr


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 1e-4
    scheduler: str = "cosine"  # cosine | onecycle | none
    warmup_frac: float = 0.05


@dataclass(frozen=True)
class MetricsConfig:
    slide_cutoff: float = 0.05  # a slide is positive when its mean target fraction exceeds this
    monitor: str = "val/auroc_mean"  # what picks the best checkpoint
    monitor_mode: str = "max"
    calibration: str = "temperature"  # temperature | isotonic | none, fitted on validation


@dataclass(frozen=True)
class RegressionConfig:
    """``target_type: regression``: continuous targets (e.g. spatial-transcriptomics scores)."""

    loss: str = "mse"  # mse | pearson, on targets standardised by the training tiles
    bootstrap: int = 1000  # resamples of held-out patients for the correlations' 95 % CI
    units: str = "score"  # what the targets measure, shown on the model card and colour bars


@dataclass(frozen=True)
class MILSection:
    """``kind: mil``: a slide-level model over bags of stored encoder features
    (``model.encoder`` and ``model.weights`` name the encoder; training/mil_train.py)."""

    labels: str = ""  # slide-label CSV keyed by slide_id or patient_id
    targets: Any = None  # ["mRNAsi", "mRNAsi:tercile"] or {name: {target_type, classes, ...}}
    covariates: Any = None  # label-table columns given to the model (CV analyses only)
    architecture: str = "auto"  # auto (mean if regression only) | gated_attention | clam_sb | mean
    hidden: int = 128
    attention: int = 64
    dropout: float = 0.1
    max_bag: int = 2048  # tiles sampled from a bag per training step; whole bags in eval
    accumulate: int = 8  # bags whose gradients make one optimiser step
    epochs: int = 30
    units: str = "label units"  # what the regression labels measure, shown on the card


@dataclass(frozen=True)
class CVConfig:
    folds: int = 5  # k-fold cross-validation over patients (kind mil); 0 or 1: none


@dataclass(frozen=True)
class TrainerConfig:
    """Passed to ``lightning.Trainer`` (``None`` leaves Lightning's default)."""

    max_epochs: int = 10
    accelerator: str = "auto"
    devices: Any = 1  # a count, a list of ids, or "auto"
    strategy: str = "auto"  # auto | ddp | ddp_spawn | ...
    num_nodes: int = 1
    precision: str = "auto"  # auto | 32-true | bf16-mixed | 16-mixed
    log_every_n_steps: int = 10
    limit_train_batches: float | None = None
    limit_val_batches: float | None = None
    check_val_every_n_epoch: int = 1
    gradient_clip_val: float | None = None
    accumulate_grad_batches: int = 1
    deterministic: bool = False


@dataclass(frozen=True)
class CardConfig:
    trained_on: str = ""  # a human summary of the training data, written on the model card
    synthetic: bool = False  # the cohort is synthetic: the card says so in bold
    colors: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # target → RGB
    intended_use: str = "Research use only; not for diagnosis."


@dataclass(frozen=True)
class TrainConfig:
    name: str = "cscvision"  # run and model name
    seed: int = 0
    threads: int | None = None  # torch CPU threads of the training process; None: all cores
    # the model kind (cscvision.models.kinds): tile, head, finetune, mil or a registered one;
    # empty: head or finetune when model.encoder is set (finetune with blocks), else tile
    kind: str = ""
    target_type: str = "classification"  # classification | regression (tile targets)
    targets: Any = None  # tile-label table columns to train on; default: all of the first
    run_dir: str | None = None  # default runs/<name>
    export_dir: str | None = None  # default models/<name>
    cohort: CohortConfig = field(default_factory=CohortConfig)
    classes: dict[str, Any] | None = None  # class map (ClassMap.from_dict); default built in
    grid: GridSpec = field(default_factory=GridSpec)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    regression: RegressionConfig = field(default_factory=RegressionConfig)
    mil: MILSection = field(default_factory=MILSection)
    cv: CVConfig = field(default_factory=CVConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    card: CardConfig = field(default_factory=CardConfig)


_FREE_FORM = {
    "classes",
    "colors",
    "covariates",
    "devices",
    "targets",
}  # values checked by their consumers


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        section = f"section {where!r}" if where else "top level"
        raise ConfigError(
            f"unknown key(s) {unknown} at {section}; valid keys: {', '.join(sorted(fields))}"
        )
    defaults = cls()
    values = {}
    for name, value in data.items():
        values[name] = _coerce(getattr(defaults, name), value, f"{where}.{name}".lstrip("."))
    try:
        return dataclasses.replace(defaults, **values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None


def _coerce(default: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(default):
        return _build(type(default), value or {}, key)
    if key.rsplit(".", 1)[-1] in _FREE_FORM or value is None:
        return value
    if isinstance(default, bool) or default is None:
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, str):
        try:  # PyYAML reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if isinstance(default, (int, float)) and isinstance(value, (int, float)):
        if isinstance(value, bool) or (isinstance(default, int) and not isinstance(value, int)):
            raise ConfigError(f"{key}: expected {type(default).__name__}, got {value!r}")
        return type(default)(value)
    if isinstance(default, tuple) and isinstance(value, (list, tuple)):
        if len(value) != len(default):
            raise ConfigError(f"{key}: expected {len(default)} values, got {value!r}")
        return tuple(float(v) for v in value)
    if not isinstance(value, type(default)):
        raise ConfigError(f"{key}: expected {type(default).__name__}, got {value!r}")
    return value


def _set(data: dict[str, Any], override: str) -> None:
    import yaml

    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r}: write KEY=VALUE, e.g. trainer.max_epochs=3")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: value is not valid YAML ({e})") from None


def config_names() -> list[str]:
    """Names of the packaged configs (``default``, ``cpu_demo``, ...)."""
    return packaged_names("configs", ".yaml")


def resolve_config(name_or_path: str | Path) -> Path:
    """A config file: an existing file as given, else a packaged config by name.

    ``default`` and ``default.yaml`` both name the packaged ``default.yaml``; a file of that
    name in the working directory wins.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = str(name_or_path)
    packaged = packaged_dir("configs") / (name if name.endswith(".yaml") else f"{name}.yaml")
    if path.name == name and packaged.is_file():
        return packaged
    raise ConfigError(
        f"{name_or_path}: no such config file and no packaged config of that name; "
        f"pass a YAML file or one of: {', '.join(config_names())} (cscvision config list)"
    )


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A training config: the defaults, then a YAML file, then overrides.

    Parameters
    ----------
    path
        A YAML file, or a packaged config name (``default``, ``cpu_demo``, ``gpu``, ...);
        None for the defaults alone.
    overrides
        Dotted ``KEY=VALUE`` strings, values parsed as YAML (``trainer.max_epochs=3``).

    Returns
    -------
    TrainConfig
        The resolved, checked config.

    Raises
    ------
    ConfigError
        An unknown key (the message lists the valid ones), a value of the wrong type or
        range, or a file that cannot be read; the message names the file or the key.

    Examples
    --------
    >>> cfg = cscvision.load_config("cpu_demo", ["cohort.csv=cohort.csv", "trainer.max_epochs=1"])
    >>> cfg.grid.tile_px
    """
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        path = resolve_config(path)
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config ({e})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
    for override in overrides:
        _set(data, override)
    data = _from_task(data)
    try:
        cfg = _build(TrainConfig, data, "")
        check_choices(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None
    return cfg


def _from_task(data: Any) -> Any:
    """A 0.1.0 config's ``task`` (classification | regression | mil) held the target type
    and, for ``mil``, the model kind: read it as ``kind: mil`` or ``target_type``."""
    if not isinstance(data, Mapping) or "task" not in data:
        return data
    from cscvision.models.card import split_task

    data = dict(data)
    for key, value in split_task(data.pop("task")).items():
        data.setdefault(key, value)
    return data


def check_choices(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` for a value outside its named choices."""
    from cscvision.models.backbones import BACKBONES
    from cscvision.models.calibration import METHODS
    from cscvision.models.kinds import UnknownKind, kind_of_config
    from cscvision.training.augment import AUGMENT_PRESETS
    from cscvision.training.data import BALANCE_MODES
    from cscvision.training.lit import SCHEDULERS
    from cscvision.training.regression import LOSSES, TARGET_TYPES

    choices = {
        "model.backbone": (cfg.model.backbone, sorted(BACKBONES)),
        "data.augment": (cfg.data.augment, sorted(AUGMENT_PRESETS)),
        "data.balance": (cfg.data.balance, BALANCE_MODES),
        "optim.scheduler": (cfg.optim.scheduler, SCHEDULERS),
        "metrics.monitor_mode": (cfg.metrics.monitor_mode, ("max", "min")),
        "target_type": (cfg.target_type, TARGET_TYPES),
        "regression.loss": (cfg.regression.loss, LOSSES),
        "metrics.calibration": (cfg.metrics.calibration, METHODS),
    }
    for key, (value, valid) in choices.items():
        if value not in valid:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(valid)}")
    if cfg.model.encoder is not None:
        from cscvision.models.heads import check_head_config

        try:
            check_head_config(cfg.model)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    _check_finetune(cfg)
    if cfg.classes is not None:
        from cscvision.labels.annotations import ClassMap

        try:
            ClassMap.from_dict(cfg.classes)
        except (ValueError, TypeError, AttributeError) as e:
            raise ConfigError(f"classes: {e}") from None
    if cfg.threads is not None and (not isinstance(cfg.threads, int) or cfg.threads < 1):
        raise ConfigError(f"threads: {cfg.threads!r} must be a whole number ≥ 1, or null")
    if cfg.targets is not None and (
        not isinstance(cfg.targets, list) or not all(isinstance(t, str) for t in cfg.targets)
    ):
        raise ConfigError(f"targets: {cfg.targets!r} must be a list of column names, or null")
    try:
        kind_of_config(cfg).check_config(cfg)
    except (UnknownKind, ValueError) as e:
        raise ConfigError(f"kind: {e}" if isinstance(e, UnknownKind) else str(e)) from None
    if cfg.data.batch_size < 1 or cfg.data.num_workers < 0:
        raise ConfigError("data.batch_size must be ≥ 1 and data.num_workers ≥ 0")


def _check_finetune(cfg: TrainConfig) -> None:
    blocks, scale = cfg.model.finetune_blocks, cfg.model.finetune_lr_scale
    if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 0:
        raise ConfigError(f"model.finetune_blocks: {blocks!r} must be a whole number ≥ 0")
    if not scale > 0:
        raise ConfigError(f"model.finetune_lr_scale: {scale!r} must be > 0")
    if blocks and not cfg.model.encoder:
        raise ConfigError("model.finetune_blocks: name the encoder to fine-tune (model.encoder "
                          "and model.weights; see cscvision encoders)")  # fmt: skip
    if blocks:  # the block count, on the architecture alone (meta device: no weights, no memory)
        from cscvision.models.encoders import FeaturesUnavailable, build_encoder
        from cscvision.models.heads import tuned_prefixes
        from cscvision.models.registry import EncoderError

        try:
            tuned_prefixes(build_encoder(str(cfg.model.encoder), device="meta"), blocks)
        except (ValueError, EncoderError, FeaturesUnavailable) as e:
            raise ConfigError(str(e)) from None


def with_absolute_paths(cfg: TrainConfig, base: str | Path | None = None) -> TrainConfig:
    """``cfg`` with its file and folder paths made absolute from ``base`` (default: cwd)."""
    base = Path(base or Path.cwd())

    def absolute(value: str | None) -> str | None:
        return None if value in (None, "") else str((base / Path(value).expanduser()).resolve())

    return dataclasses.replace(
        cfg,
        run_dir=absolute(cfg.run_dir or str(Path("runs") / cfg.name)),
        export_dir=absolute(cfg.export_dir or str(Path("models") / cfg.name)),
        cohort=dataclasses.replace(cfg.cohort, csv=absolute(cfg.cohort.csv) or ""),
        mil=dataclasses.replace(cfg.mil, labels=absolute(cfg.mil.labels) or ""),
        data=dataclasses.replace(cfg.data, cache_dir=absolute(cfg.data.cache_dir)),
        model=dataclasses.replace(
            cfg.model,
            pretrained=absolute(cfg.model.pretrained),
            weights=absolute(cfg.model.weights),
            features_dir=absolute(cfg.model.features_dir),
        ),
    )


def config_to_dict(cfg: Any) -> Any:
    """Plain dicts, lists and scalars (for YAML and JSON)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {str(k): config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    return cfg

"""Training as one flat function: ``train(config) -> TrainResult``, for the CLI and notebooks.

A run folder (``runs/<name>/`` unless ``run_dir`` says otherwise) holds the resolved
``config.yaml``, ``versions.json``, the patient-level split (``splits.csv``), the tile cache,
CSV and TensorBoard logs (``logs/``), checkpoints (``checkpoints/last.ckpt`` and the best by
validation AUROC) and ``metrics.json``. A run folder with ``last.ckpt`` resumes from it.
At the end the best checkpoint is exported (``models/<name>/`` unless ``export_dir``):
weights, ``model.json`` with thresholds chosen on validation, and a human ``README.md``.

Configuration: :mod:`cscvision.training.config` (YAML plus dotted ``key=value`` overrides).
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from cscvision import __version__
from cscvision.core.errors import CscvisionError
from cscvision.core.io import write_json, write_text
from cscvision.core.palette import target_colors
from cscvision.labels.annotations import DEFAULT_CLASS_MAP, ClassMap
from cscvision.labels.cohort import (
    CohortEntry,
    annotation_strata,
    check_splittable,
    read_cohort,
    read_splits,
    split_by_patient,
    write_splits,
)
from cscvision.models.calibration import calibration_report, fit_calibration
from cscvision.models.export import export_model
from cscvision.models.kinds import ModelKind, kind_of_config, resolve
from cscvision.models.readme import write_model_readme
from cscvision.training.confidence import export_confidence
from cscvision.training.config import (
    ConfigError,
    TrainConfig,
    config_to_dict,
    load_config,
    with_absolute_paths,
)
from cscvision.training.data import (
    TileDataModule,
    pos_weight,
    prepare_cohort,
    stain_sources_of,
    subsample,
)
from cscvision.training.export import TrainResult, run_card
from cscvision.training.featuredata import with_encoder_grid
from cscvision.training.lit import TileClassifier, check_checkpoint
from cscvision.training.ood import export_run_ood
from cscvision.training.regression import TileRegressor, standardise_stats, target_range
from cscvision.training.tables import check_target_range, cohort_targets
from cscvision.training.tilecache import require_positives

log = logging.getLogger(__name__)

__all__ = ["ConfigError", "TrainConfig", "TrainError", "TrainResult", "load_config", "train"]


class TrainError(CscvisionError, RuntimeError):
    """A training run that cannot go on; the message says which file and what to do."""


def train(
    config: TrainConfig | str | Path,
    *,
    resume: bool | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train, validate, test and export a model as ``config`` says.

    Slides are split by patient; the best checkpoint (by the monitored validation metric) is
    calibrated and thresholded on validation, scored once on test, and exported.

    Parameters
    ----------
    config
        A config (``load_config``), or a YAML file or packaged config name.
    resume
        None resumes from ``<run_dir>/checkpoints/last.ckpt`` when it exists; True requires
        it; False starts afresh (overwriting the run's checkpoints).
    progress
        Show progress bars.

    Returns
    -------
    TrainResult
        The run folder, the exported model folder, the best checkpoint, validation and test
        metrics, thresholds and the split summary.

    Raises
    ------
    ConfigError
        The config is invalid.
    TrainError
        The cohort cannot be split by patient, a target has no positive training tile, a
        label table's grid differs from the config's, or a resume does not fit the run.

    Examples
    --------
    >>> result = cscvision.train(cscvision.load_config("cpu_demo", ["cohort.csv=cohort.csv"]))
    >>> result.metrics["test"]
    """
    cfg = config if isinstance(config, TrainConfig) else load_config(config)
    kind = kind_of_config(cfg)
    try:  # what the kind checks beyond the config's schema, before any file is read
        kind.check_config(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    cfg = with_encoder_grid(with_absolute_paths(cfg))
    if not cfg.cohort.csv:
        raise ConfigError("cohort.csv: name the cohort manifest (CSV) to train on")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    return resolve(kind.trainer)(cfg, kind, resume=resume, progress=progress)


def train_tiles(
    cfg: TrainConfig, kind: ModelKind, *, resume: bool | None = None, progress: bool = True
) -> TrainResult:
    """A model trained on tile targets (every kind but MIL): labels, patient split, the
    kind's data module and system (``kind.pieces``), fit, evaluate, export."""
    if cfg.data.stain and kind.name != "tile":
        raise TrainError(
            f"data.stain: stain normalisation in training is for kind tile, not {kind.name}; "
            "remove it (a foundation encoder's features come from tiles as read)"
        )
    _stain(cfg)  # an unreadable reference fails here, before tiling
    if cfg.model.encoder and not Path(cfg.model.weights or "").is_file():  # before tiling
        raise TrainError(
            f"model.weights: {cfg.model.weights} is not a file; name the local weights file "
            f"of encoder {cfg.model.encoder} (nothing is downloaded)"
        )
    run_dir = Path(cfg.run_dir)
    class_map = ClassMap.from_dict(cfg.classes) if cfg.classes else DEFAULT_CLASS_MAP
    entries = read_cohort(cfg.cohort.csv)
    targets = cohort_targets(entries, cfg.targets) or class_map.targets
    splits = _splits(run_dir / "splits.csv", entries, cfg, class_map)
    _write_run_files(run_dir, cfg, entries, splits)
    cache_dir = Path(cfg.data.cache_dir or run_dir / "cache")
    by_split = prepare_cohort(
        entries, splits, spec=cfg.grid, class_map=class_map, cache_dir=cache_dir,
        progress=progress, targets=targets,
    )  # fmt: skip
    check_target_range(by_split, targets, cfg.target_type)
    if cfg.target_type == "classification":
        require_positives(by_split["train"], entries, class_map, targets)
    dm, module, encoder = resolve(kind.pieces)(cfg, targets, by_split, run_dir, progress)
    ckpt = _resume_checkpoint(run_dir, resume, module)
    trainer, checkpoints = _trainer(cfg, run_dir, progress)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt, weights_only=True)
    best = Path(checkpoints.best_model_path or run_dir / "checkpoints" / "last.ckpt")
    metrics = _evaluate(trainer, module, dm, best, cfg.metrics.calibration)
    thresholds = {}
    if cfg.target_type == "classification":
        thresholds = dict(zip(targets, module.thresholds.tolist(), strict=True))
    model_dir = None
    if trainer.is_global_zero:
        write_json(run_dir / "calibration.json", _calibration_figures(module, metrics))
        write_json(run_dir / "metrics.json", {"best_checkpoint": best, **metrics})
        model_dir = _export(cfg, kind, module, dm, metrics, thresholds, best, encoder)
    return TrainResult(run_dir, model_dir, best, metrics, thresholds, dm.summary())


# --- run folder ----------------------------------------------------------------------------------


def _splits(
    path: Path, entries: Sequence[CohortEntry], cfg: TrainConfig, class_map: ClassMap
) -> dict[str, str]:
    """The run's split: kept from ``splits.csv`` when resuming, else made per patient."""
    if path.exists():
        splits = read_splits(path)
        missing = [e.slide_id for e in entries if e.slide_id not in splits]
        if not missing:
            _check_kept_splits(path, entries, splits)
            return splits
        raise TrainError(
            f"{path}: the run's split lacks slide(s) {missing[:5]} of the cohort; the cohort "
            "changed since this run began: use a new run folder (--run-dir)"
        )
    check_splittable(entries)
    strata = annotation_strata(entries, class_map) if cfg.cohort.stratify else None
    return split_by_patient(
        entries, fractions=cfg.cohort.split_fractions, seed=cfg.cohort.split_seed, strata=strata
    )


def _check_kept_splits(
    path: Path, entries: Sequence[CohortEntry], splits: Mapping[str, str]
) -> None:
    """A kept split must still put each patient of the manifest in one split and agree with
    the splits the manifest fixes: else a test patient's slide could be trained on."""
    seen: dict[str, str] = {}
    for e in entries:
        split = splits[e.slide_id]
        if e.split is not None and e.split != split:
            raise TrainError(
                f"{path}: slide {e.slide_id!r} is in {split!r} here but the manifest fixes it "
                f"to {e.split!r}; the cohort changed since this run began: use a new run "
                "folder (--run-dir)"
            )
        if seen.setdefault(e.patient_id, split) != split:
            raise TrainError(
                f"{path}: patient {e.patient_id!r} now has slides in {seen[e.patient_id]!r} "
                f"and {split!r}; the cohort changed since this run began: use a new run "
                "folder (--run-dir)"
            )


def package_versions() -> dict[str, str]:
    import lightning
    import numpy
    import torchmetrics
    import torchvision

    from cscvision.slides.slide import openslide_library_version

    return {
        "cscvision": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": lightning.__version__,
        "torchmetrics": torchmetrics.__version__,
        "numpy": numpy.__version__,
        "openslide": openslide_library_version(),
        "cuda": str(torch.version.cuda),
    }


def _write_run_files(
    run_dir: Path, cfg: TrainConfig, entries: Sequence[CohortEntry], splits: Mapping[str, str]
) -> None:
    import yaml

    resolved = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
    write_text(run_dir / "config.yaml", resolved)
    write_json(run_dir / "versions.json", {"seed": cfg.seed, **package_versions()})
    write_splits(run_dir / "splits.csv", entries, splits)


# --- building the pieces -------------------------------------------------------------------------


def tile_pieces(
    cfg: TrainConfig,
    targets: Sequence[str],
    by_split: Mapping[str, Sequence[Any]],
    run_dir: Path,
    progress: bool = True,
) -> tuple[TileDataModule, TileClassifier, dict[str, Any]]:
    """Kind ``tile``: tile images and a system holding a backbone; no encoder."""
    dm = tile_datamodule(cfg, by_split)
    module = _module(cfg, targets, dm)
    if module.stain is not None:  # Macenko/Vahadane: unmix each slide with its own stains
        module.use_slide_stains(dm.slide_sources())
    return dm, module, {}


def tile_datamodule(cfg: TrainConfig, by_split: Mapping[str, Sequence[Any]]) -> TileDataModule:
    limit = {"train": cfg.data.max_tiles_per_slide}
    limit["val"] = limit["test"] = cfg.data.eval_max_tiles_per_slide
    slides = {s: [subsample(t, limit[s], cfg.seed) for t in tiles] for s, tiles in by_split.items()}
    return TileDataModule(
        slides=slides,
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.eval_batch_size,
        num_workers=cfg.data.num_workers,
        balance="sampler" if cfg.data.balance == "sampler" else "none",
        seed=cfg.seed,
        pin_memory=torch.cuda.is_available(),
    )


def _module(cfg: TrainConfig, targets: Sequence[str], dm: TileDataModule) -> TileClassifier:
    if cfg.target_type == "regression":
        return _regressor(cfg, targets, dm)
    weights = None
    if cfg.data.balance == "pos_weight":
        weights = [float(w) for w in pos_weight(dm.datasets["train"].targets)]
        log.info("pos_weight per target %s: %s", list(targets), [round(w, 2) for w in weights])
    return TileClassifier(
        **_system_kwargs(cfg, targets),
        pos_weight=weights,
        slide_cutoff=cfg.metrics.slide_cutoff,
    )


def _stain(cfg: TrainConfig) -> dict[str, Any] | None:
    """``data.stain``'s reference as the card keeps it, or None."""
    from cscvision.slides.stain import read_stain_reference

    return read_stain_reference(cfg.data.stain).to_dict() if cfg.data.stain else None


def _system_kwargs(cfg: TrainConfig, targets: Sequence[str]) -> dict[str, Any]:
    """What every tile system takes from the config: backbone, optimiser, input, augment."""
    return {
        "backbone": cfg.model.backbone,
        "targets": tuple(targets),
        "pretrained": cfg.model.pretrained,
        "lr": cfg.optim.lr,
        "weight_decay": cfg.optim.weight_decay,
        "scheduler": cfg.optim.scheduler,
        "warmup_frac": cfg.optim.warmup_frac,
        "mean": cfg.model.mean,
        "std": cfg.model.std,
        "augment": cfg.data.augment,
        "channels_last": cfg.model.channels_last,
        "head_dropout": cfg.model.head_dropout,
        "stain": _stain(cfg),
    }


def _regressor(cfg: TrainConfig, targets: Sequence[str], dm: TileDataModule) -> TileRegressor:
    mean, std = standardise_stats(dm.datasets["train"].targets)
    module = TileRegressor(
        target_mean=mean,
        target_std=std,
        loss=cfg.regression.loss,
        n_boot=cfg.regression.bootstrap,
        **_system_kwargs(cfg, targets),
    )
    patient = {s.slide_id: s.patient_id for tiles in dm.slides.values() for s in tiles}
    module.slide_groups = [patient[i] for i in dm.slide_ids]  # bootstrap over patients
    return module


def _resume_checkpoint(run_dir: Path, resume: bool | None, module: TileClassifier) -> str | None:
    last = run_dir / "checkpoints" / "last.ckpt"
    if resume is False:
        return None
    if not last.exists():
        if resume:
            raise TrainError(f"{last}: no checkpoint to resume from; drop --resume to start")
        return None
    check_checkpoint(last, module)
    log.info("resuming from %s", last)
    return str(last)


def _trainer(cfg: TrainConfig, run_dir: Path, progress: bool) -> tuple[L.Trainer, Any]:
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    t = cfg.trainer
    monitor = cfg.metrics.monitor
    if cfg.target_type == "regression" and monitor == "val/auroc_mean":
        monitor = "val/pearson_mean"
    checkpoints = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best-{epoch:03d}",
        monitor=monitor,
        mode=cfg.metrics.monitor_mode,
        save_last=True,
        save_top_k=1,
    )
    loggers = [  # version_0, version_1 after a resume, ...: no log is overwritten
        CSVLogger(run_dir / "logs", name="csv"),
        TensorBoardLogger(run_dir / "logs", name="tensorboard", default_hp_metric=False),
    ]
    extra = {k: v for k, v in dataclasses.asdict(t).items() if v is not None}
    extra["precision"] = resolve_precision(t.precision, t.accelerator)
    trainer = L.Trainer(
        default_root_dir=run_dir,
        logger=loggers,
        callbacks=[checkpoints, LearningRateMonitor(logging_interval="step")],
        enable_progress_bar=progress,
        enable_model_summary=progress,
        **extra,
    )
    return trainer, checkpoints


def resolve_precision(precision: str, accelerator: str) -> str:
    """``"auto"``: bf16-mixed where the device computes bf16 fast, else 16-mixed on older
    GPUs and 32-true on CPUs without bf16 kernels; any other value is passed through."""
    if precision != "auto":
        return precision
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true"


# --- after training ------------------------------------------------------------------------------


def _strip(results: Sequence[Mapping[str, float]], stage: str) -> dict[str, float]:
    prefix = f"{stage}/"
    merged = {k: float(v) for r in results for k, v in r.items()}
    return {k[len(prefix) :]: v for k, v in merged.items() if k.startswith(prefix)}


def _evaluate(
    trainer: L.Trainer, module: TileClassifier, dm: TileDataModule, best: Path, method: str
) -> dict[str, dict[str, float]]:
    """Validation metrics of the best checkpoint, calibration fitted on them (thresholds are
    then chosen on the calibrated probabilities), then the held-out test split."""
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    module.calibration = {}
    metrics = {"val": _strip(trainer.validate(module, datamodule=dm, verbose=False), "val")}
    calibrated = not isinstance(module, TileRegressor) and method != "none"  # probabilities
    if "val" not in module.last_predictions and calibrated:
        log.warning(
            "calibration skipped: this process did not see the validation predictions "
            "(trainer.strategy ddp_spawn keeps them in its workers); use strategy ddp"
        )
    if "val" in module.last_predictions:
        logits, soft = (a.numpy() for a in module.last_predictions["val"])
        module.calibration = fit_calibration(logits, soft, module.target_names, method)
        if module.calibration:
            metrics["val"] = _strip(trainer.validate(module, datamodule=dm, verbose=False), "val")
    metrics["val"] |= _unlogged(module, "val")
    chosen = [metrics["val"].get(f"threshold_{t}", 0.5) for t in module.target_names]
    module.thresholds.copy_(torch.tensor(chosen))
    if len(dm.datasets["test"]):
        metrics["test"] = _strip(trainer.test(module, datamodule=dm, verbose=False), "test")
        metrics["test"] |= _unlogged(module, "test")
    else:
        log.warning("no held-out test slides: test metrics are not reported")
        metrics["test"] = {}
    return metrics


def _unlogged(module: TileClassifier, stage: str) -> dict[str, float]:
    """Metrics Lightning does not log (NaN: an undefined correlation or CI), kept as null."""
    return {
        k: None
        for k, v in module.last_metrics.get(stage, {}).items()
        if isinstance(v, float) and v != v and isinstance(module, TileRegressor)
    }


def _calibration_figures(module: TileClassifier, metrics: dict[str, dict[str, float]]) -> dict:
    """ECE before/after calibration into ``metrics`` (per split); the test split's (else
    validation's) reliability bins for ``calibration.json``."""
    reports = {}
    for split in ("val", "test"):
        if split not in module.last_predictions or not metrics.get(split):
            continue
        logits, soft = (a.numpy() for a in module.last_predictions[split])
        reports[split] = calibration_report(logits, soft, module.target_names, module.calibration)
        for t, rec in reports[split].items():
            metrics[split][f"ece_uncalibrated_{t}"] = rec["ece_before"]
            metrics[split][f"ece_{t}"] = rec["ece_after"]
    split = "test" if "test" in reports else "val"
    return {
        "method": module.calibration.get("method", "none"),
        "split": split,
        "targets": reports.get(split, {}),
    }


def _export(
    cfg: TrainConfig,
    kind: ModelKind,
    module: TileClassifier,
    dm: TileDataModule,
    metrics: Mapping[str, Any],
    thresholds: Mapping[str, float],
    best: Path,
    encoder: Mapping[str, Any],
) -> Path:
    out_dir = Path(cfg.export_dir)
    targets = module.target_names
    colors = target_colors(targets, cfg.card.colors)
    scale = {}
    if isinstance(module, TileRegressor):
        low, high = target_range(dm.datasets["train"].targets)
        scale = {"mean": module.target_mean.tolist(), "std": module.target_std.tolist(),
                 "min": low, "max": high}  # fmt: skip
    regression = cfg.target_type == "regression"
    card = run_card(
        cfg,
        kind,
        target_type=cfg.target_type,
        units={t: cfg.regression.units for t in targets} if regression else {},
        output_scale=scale,
        backbone=module.hparams.backbone,
        head_dropout=float(module.hparams.get("head_dropout", 0.0)),
        stain=dict(module.hparams.get("stain") or {}),
        targets=targets,
        colors=colors,
        thresholds=dict(thresholds),
        calibration=module.calibration,
        tile_px=cfg.grid.tile_px,
        mpp=cfg.grid.mpp,
        # what the weights were trained with (a resumed run keeps the checkpoint's buffers)
        mean=tuple(round(v, 7) for v in module.mean.tolist()),  # float32 → decimal
        std=tuple(round(v, 7) for v in module.std.tolist()),
        training={
            "cohort": dm.summary(),
            "pretrained": kind.training_note(cfg)
            or cfg.model.pretrained
            or "none (trained from scratch)",
            "best_checkpoint": best.name,
        },
        metrics=metrics,
        encoder=dict(encoder),
    )
    net = module.net.to(memory_format=torch.contiguous_format)
    # a network that keeps only part of its weights (a head and its tuned encoder blocks)
    state = net.exported_state() if hasattr(net, "exported_state") else None
    export_model(net, card, out_dir, state=state)
    card = export_run_ood(net, card, dm, out_dir)  # the OOD record beside the weights
    sources = stain_sources_of(dm, card.stain)  # each slide's own stains (Macenko/Vahadane)
    card = export_confidence(net, card, dm._loader("val"), out_dir, stain_sources=sources)
    write_model_readme(card, out_dir)
    log.info("exported the model to %s", out_dir)
    return out_dir

"""``kind: mil`` (0.1.0: ``task: mil``) in ``cscvision train``: slide-level labels, bags
of stored features, CV and an exported MIL model that ``cscvision infer`` runs on slides.

Each cohort slide is tiled at the encoder's geometry (``model.encoder``); its tissue tiles
are embedded once into ``<features_dir>/<slide_id>.h5`` (extracted where the store lacks
them, reused where it holds them with the same encoder weights) and form the slide's bag.
With ``cv.folds`` ≥ 2 the model is cross-validated over patients first (per-fold and
pooled metrics with bootstrap CIs, held-out predictions and per-tile maps under
``<run_dir>/cv``); the exported model is then trained on every labelled slide, and its
card carries the pooled CV metrics (the only honest estimate: the final model has no
held-out data).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from cscvision.core.io import write_json
from cscvision.labels.cohort import CohortEntry, read_cohort
from cscvision.labels.slide_table import SlideLabels, parse_targets, read_slide_labels
from cscvision.models.card import ModelCard
from cscvision.models.export import export_model
from cscvision.models.kinds import ModelKind
from cscvision.models.mil import MAP_SCALE, MAP_UNIT, map_targets
from cscvision.models.readme import write_model_readme
from cscvision.slides.grid import make_grid
from cscvision.slides.slide import open_slide
from cscvision.training.config import TrainConfig, config_to_dict
from cscvision.training.export import TrainResult, run_card
from cscvision.training.featuredata import (
    _extractor,
    encoder_reference,
    slide_features,
    with_encoder_grid,
)
from cscvision.training.mil import Bag, MILConfig, fit_mil, resolve_architecture
from cscvision.training.mil_cv import (
    _standardise,
    cross_validate,
    targets_from_labels,
    write_cv_outputs,
)
from cscvision.training.mil_ood import export_mil_ood
from cscvision.training.tilecache import SlideTiles

log = logging.getLogger(__name__)


def mil_settings(cfg: TrainConfig) -> MILConfig:
    m = cfg.mil
    return MILConfig(
        architecture=m.architecture,
        hidden=m.hidden,
        attention=m.attention,
        dropout=m.dropout,
        max_bag=m.max_bag,
        accumulate=m.accumulate,
        epochs=m.epochs,
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        seed=cfg.seed,
    )


def slide_bag(entry: CohortEntry, cfg: TrainConfig, extractor, features_dir: Path) -> Bag:
    """Every tissue tile of ``entry`` at the encoder's grid, as stored features."""
    with open_slide(entry.slide_path) as slide:
        grid = make_grid(slide, cfg.grid)
    tiles = SlideTiles(
        slide_id=entry.slide_id,
        patient_id=entry.patient_id,
        split="",
        slide_path=str(entry.slide_path),
        plan=grid.plan,
        mpp_override=None,
        xy_l0=grid.xy_l0,
        targets=np.zeros((len(grid), 0), np.float32),
        tissue=grid.tissue,
    )
    if len(tiles) == 0:
        raise ValueError(
            f"{entry.slide_path}: no tile reaches grid.min_tissue {cfg.grid.min_tissue}; drop "
            "the slide from the cohort or lower grid.min_tissue"
        )
    feats = slide_features(
        tiles, extractor, features_dir, batch_size=cfg.data.batch_size, progress=False
    )
    return Bag(entry.slide_id, feats.astype(np.float32), grid.xy_l0)


def labelled(entries: Sequence[CohortEntry], labels: SlideLabels) -> list[int]:
    """Rows of the slides with at least one label."""
    keep = np.zeros(len(entries), bool)
    for spec in labels.specs:
        v = labels.values[spec.name]
        keep |= np.isfinite(v) if spec.target_type == "regression" else v >= 0
    return list(np.flatnonzero(keep))


def _subset_labels(labels: SlideLabels, rows: Sequence[int]) -> SlideLabels:
    rows = list(rows)
    return dataclasses.replace(
        labels,
        slide_ids=tuple(labels.slide_ids[i] for i in rows),
        patient_ids=tuple(labels.patient_ids[i] for i in rows),
        values={k: v[rows] for k, v in labels.values.items()},
        covariates={k: v[rows] for k, v in labels.covariates.items()},
    )


def labelled_slides(cfg: TrainConfig) -> tuple[list[CohortEntry], SlideLabels]:
    """The cohort's slides with at least one label, and their labels."""
    entries = read_cohort(cfg.cohort.csv)
    specs = parse_targets(cfg.mil.targets, "mil.targets")
    labels = read_slide_labels(
        cfg.mil.labels, specs, [(e.slide_id, e.patient_id) for e in entries],
        list(cfg.mil.covariates or []),
    )  # fmt: skip
    rows = labelled(entries, labels)
    return [entries[i] for i in rows], _subset_labels(labels, rows)


def slide_bags(
    cfg: TrainConfig, entries: Sequence[CohortEntry], extractor, features_dir: Path, *,
    progress: bool = True,
) -> list[Bag]:  # fmt: skip
    """Each slide's bag (:func:`slide_bag`; stored features reused)."""
    return [
        slide_bag(e, cfg, extractor, features_dir)
        for e in tqdm(entries, desc="features", unit="slide", disable=not progress)
    ]


def train_mil(
    cfg: TrainConfig, kind: ModelKind, *, resume: bool | None = None, progress: bool = True
) -> TrainResult:
    """Train (and cross-validate) a MIL model as ``cfg`` says; a :class:`TrainResult`.
    ``resume`` is accepted for the trainer interface; MIL runs start afresh."""
    cfg = with_encoder_grid(cfg)
    run_dir = Path(cfg.run_dir)
    entries, labels = labelled_slides(cfg)
    write_json(run_dir / "config.json", config_to_dict(cfg))
    covariates = list(cfg.mil.covariates or [])
    extractor = _extractor(cfg)
    features_dir = Path(cfg.model.features_dir or run_dir / "features")
    bags = slide_bags(cfg, entries, extractor, features_dir, progress=progress)
    settings = mil_settings(cfg)
    metrics: dict[str, Any] = {}
    if cfg.cv.folds >= 2:
        result = cross_validate(
            bags, labels, settings, k=cfg.cv.folds, covariates=covariates,
            progress=log.info if not progress else lambda line: tqdm.write(line),
        )  # fmt: skip
        write_cv_outputs(run_dir / "cv", bags, labels, result)
        metrics = {"cv": {"folds": cfg.cv.folds, "pooled": result.pooled}}
    targets = targets_from_labels(labels, covariates)
    scaled, mean, sd = _standardise(targets, np.arange(len(bags)))
    net = fit_mil(bags, scaled, settings, labels.patient_ids)
    record = mil_record(cfg, labels, bags[0].features.shape[1], mean, sd)
    reference = encoder_reference(cfg, extractor, features_dir)
    counts = counts_of(bags, labels)
    card = mil_card(cfg, kind, record, reference, metrics, counts)
    write_json(run_dir / "metrics.json", json.loads(json.dumps(metrics)))
    out_dir = export_model(net, card, cfg.export_dir)
    card = export_mil_ood(net, card, bags, labels.patient_ids, out_dir, seed=cfg.seed)
    write_model_readme(card, out_dir)
    return TrainResult(run_dir, out_dir, run_dir / "cv", metrics, {}, {"all": counts})


def counts_of(bags: Sequence[Bag], labels: SlideLabels) -> dict[str, int]:
    return {
        "slides": len(bags),
        "patients": len(set(labels.patient_ids)),
        "tiles": sum(len(b.features) for b in bags),
    }


def mil_record(
    cfg: TrainConfig, labels: SlideLabels, in_dim: int, mean: np.ndarray, sd: np.ndarray
) -> dict[str, Any]:
    """The card's ``mil`` record: everything inference needs to rebuild and read the net."""
    reg = [s for s in labels.specs if s.target_type == "regression"]
    return {
        "architecture": resolve_architecture(
            cfg.mil.architecture,
            has_classes=any(s.target_type == "classification" for s in labels.specs),
        ),
        "in_dim": int(in_dim),
        "hidden": cfg.mil.hidden,
        "attention": cfg.mil.attention,
        "dropout": cfg.mil.dropout,
        "regression": [
            {"name": s.name, "mean": float(m), "sd": float(d), "units": cfg.mil.units}
            for s, m, d in zip(reg, mean, sd, strict=True)
        ],
        "classification": [
            {"name": s.name, "classes": list(s.classes), "tercile_of": s.tercile_of}
            for s in labels.specs
            if s.target_type == "classification"
        ],
        "covariates": list(cfg.mil.covariates or []),
        "map_scale": MAP_SCALE,
        "labels_table": str(cfg.mil.labels),
    }


def mil_card(
    cfg: TrainConfig,
    kind: ModelKind,
    record: dict[str, Any],
    encoder: dict[str, Any],
    metrics: dict[str, Any],
    counts: dict[str, int],
) -> ModelCard:
    from cscvision.models.registry import get_encoder_spec

    spec = get_encoder_spec(encoder["name"])
    targets = map_targets(record)
    return run_card(
        cfg,
        kind,
        backbone=record["architecture"],
        target_type="rank",
        targets=targets,
        units=dict.fromkeys(targets, MAP_UNIT),
        thresholds={},
        tile_px=cfg.grid.tile_px,
        mpp=cfg.grid.mpp,
        mean=spec.mean,
        std=spec.std,
        training={"cohort": counts, "pretrained": f"frozen encoder {encoder['name']}"},
        metrics=metrics,
        encoder=encoder,
        mil=record,
    )

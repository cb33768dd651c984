"""The OOD record of a trained model (:mod:`cscvision.models.ood`), fitted on its run's
training tiles and calibrated on its validation slides: at export, or afterwards for a
model exported without one (:func:`cscvision.training.refit.refit_ood`, the weights
untouched).

Why the thresholds come from whole slides: training drops the tiles a label table marks
invalid and keeps only labelled tiles, but inference scores every tissue tile, folds, pen
and glass edges included. Thresholds set on the training loader's validation tiles then
flag the model's own held-out slides (a fresh demo model flagged 24-66 % of the tiles of
its held-out slides). Reading the validation slides as ``infer`` reads them (same tissue
detection, grid, µm/px, normalisation and stain template) judges new slides against tiles
like their own.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cscvision.core.io import write_json
from cscvision.models.card import CARD_FILE, ModelCard
from cscvision.models.ood import (
    BLOCK_FEATURES,
    SLIDE_SHARE_FLOOR,
    GaussianRecord,
    export_ood,
    feature_tap,
    fit_gaussians,
    fit_ood,
    load_ood,
    ood_scores_of,
    reference_thresholds,
)
from cscvision.slides.grid import GridSpec, detect_tissue, make_grid
from cscvision.slides.settings import ReadSettings
from cscvision.slides.slide import open_slide
from cscvision.slides.tilebatches import TileBatches

log = logging.getLogger(__name__)

CALIBRATED_ON = "validation slides' tissue tiles as inference reads them"
CALIBRATED_ON_CROSS_FITTED = (
    "tissue tiles read as inference reads them of the validation slides and of the training "
    "slides, each training patient fold scored against the Gaussian fitted without its tiles"
)
RULE_CROSS_FITTED = (
    "a slide is out of distribution when the share of its tissue tiles whose OOD score "
    "exceeds the 99th percentile of the reference tiles (validation slides, and training "
    "slides scored out of fold) is above slide_share_threshold (the larger of {floor:g} and "
    "twice the highest share of a reference slide)"
)
REFERENCES = ("validation", "cross-fitted")  # the slides the thresholds are set on
MAX_FOLDS = 5  # patient folds of the out-of-fold scores (fewer patients: one fold each)


@dataclasses.dataclass(frozen=True)
class SlideRef:
    """A slide to calibrate on: its path and the level-0 µm/px to open it with (None: from
    its metadata)."""

    path: str | Path
    mpp: float | None = None


@dataclasses.dataclass(frozen=True)
class TrainingSlides:
    """The training slides, to be scored out of fold: each slide, its patient, the features
    the record was fitted on (the training loader's tiles of that slide) and their Gaussian
    groups (None: one Gaussian)."""

    refs: Sequence[SlideRef]
    patients: Sequence[str]
    features: Sequence[np.ndarray]
    groups: Sequence[np.ndarray] | None = None


def fold_gaussians(
    features: Sequence[np.ndarray],
    patients: Sequence[str],
    *,
    groups: Sequence[np.ndarray] | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, dict[int, GaussianRecord]]:
    """Each slide's patient fold (``min(5, patients)`` folds, a patient's slides in one) and
    each fold's Gaussian, fitted on the other folds' ``features`` alone (one patient: one
    fold, fitted on every slide); ``groups``: each slide's Gaussian groups
    (:func:`~cscvision.models.ood.fit_gaussians`)."""
    from cscvision.training.mil_cv import patient_folds

    k = min(MAX_FOLDS, len(set(patients)))
    folds = patient_folds(patients, k, seed) if k >= 2 else np.zeros(len(patients), int)
    records: dict[int, GaussianRecord] = {}
    for f in np.unique(folds).tolist():
        rest = [i for i, g in enumerate(folds) if g != f or k < 2]
        fold_groups = None if groups is None else np.concatenate([groups[i] for i in rest])
        records[f] = fit_gaussians(np.concatenate([features[i] for i in rest]), fold_groups)
    return folds, records


def held_out_scores(
    features: Sequence[np.ndarray],
    patients: Sequence[str],
    *,
    score: Iterable[np.ndarray] | None = None,
    groups: Sequence[np.ndarray] | None = None,
    seed: int = 0,
) -> list[np.ndarray]:
    """Each slide's scores against its fold's Gaussian (:func:`fold_gaussians`: fitted on
    the other patient folds' ``features`` alone). ``score``: each slide's features to score,
    in slide order (default: ``features`` themselves); the Gaussians are fitted first, then
    ``score`` is read one slide at a time, each slide dropped once scored, so a generator
    that reads the slides keeps one slide's features alive at a time."""
    folds, records = fold_gaussians(features, patients, groups=groups, seed=seed)
    out = scores_one_at_a_time(features if score is None else score, (records[f] for f in folds))
    if len(out) != len(folds):
        raise ValueError(f"held-out OOD scores: {len(out)} slides to score, {len(folds)} fitted")
    return out


def scores_one_at_a_time(
    slides: Iterable[np.ndarray], records: Iterable[GaussianRecord]
) -> list[np.ndarray]:
    """Each slide's features [N, D] scored against its record, in order (an empty slide
    scores empty); a slide's features are dropped before the next slide's are read."""
    records = iter(records)
    out: list[np.ndarray] = []
    for x in slides:
        record = next(records, None)
        if record is None:
            raise ValueError(f"OOD scores: more slides than the {len(out)} records")
        out.append(ood_scores_of(record, x) if len(x) else np.zeros(0, np.float32))
        del x  # else the loop variable holds it while the next slide is read
    return out


def export_run_ood(
    net: Any,
    card: ModelCard,
    dm: Any,
    model_dir: str | Path,
    *,
    note: str = "",
    features: str | None = None,
    calibrate: bool = True,
    reference: str = "validation",
) -> ModelCard:
    """Fit the record on ``dm``'s training tiles (in order, unaugmented), write it beside
    the exported weights and set its thresholds from the validation slides read as
    inference reads them (models reading tiles; models trained on stored features keep the
    validation tiles' thresholds); ``reference="cross-fitted"`` adds the training slides,
    each patient fold scored against the Gaussian fitted without it (on the demo cohort it
    stopped flagging new synthetic patients and stopped flagging unseen tissue too:
    docs/how-to/trust.md). Returns the card that keeps it."""
    if reference not in REFERENCES:
        raise ValueError(f"OOD reference {reference!r}: choose one of {REFERENCES}")
    from cscvision.training.data import stain_sources_of

    sources = stain_sources_of(dm, card.stain)
    loaders = dm._loader("train"), dm._loader("val")
    fit = fit_ood(net, card, *loaders, features=features, stain_sources=sources)
    block = {**fit.block, "note": note} if note else fit.block
    card = export_ood(model_dir, card, fit.record, block)
    slides = [SlideRef(s.slide_path, s.mpp_override) for s in dm.slides.get("val", ())]
    if not (calibrate and slides and block["features"] in (*BLOCK_FEATURES, "penultimate")):
        return card
    training = None
    if reference == "cross-fitted":
        train = dm.slides.get("train", ())
        mine = [fit.train_slide_idx == i for i in range(len(train))]  # train slides come first
        training = TrainingSlides(
            [SlideRef(s.slide_path, s.mpp_override) for s in train],
            [s.patient_id for s in train],
            [fit.train[m] for m in mine],
            None if fit.groups is None else [fit.groups[m] for m in mine],
        )
    return calibrate_on_slides(net, card, model_dir, slides, training=training)


def calibrate_on_slides(
    net: nn.Module,
    card: ModelCard,
    model_dir: str | Path,
    slides: Sequence[SlideRef],
    settings: ReadSettings | None = None,
    *,
    training: TrainingSlides | None = None,
) -> ModelCard:
    """Set the card's OOD tile and slide thresholds from every tissue tile, read as
    inference reads them (``settings``: the default ``infer`` flags), of the validation
    ``slides`` (scored against the fitted record) and, when given, of the ``training``
    slides of two or more patients (each patient fold scored against the Gaussian fitted
    without it, as a new patient would be), keeping the fitted record. Slides are read one
    at a time and only their scores kept. Returns the new card; the weights and the record
    file are untouched."""
    scorer = load_ood(model_dir, card)
    if scorer is None:
        raise ValueError(f"{model_dir}: its card keeps no OOD record to calibrate")
    record = GaussianRecord(scorer.means.numpy(), scorer.precision.numpy(), 0.0)
    read = _slides_features(net, card, scorer.features, slides, settings)
    val = [s for s in scores_one_at_a_time(read, itertools.repeat(record)) if len(s)]
    oof: list[np.ndarray] = []
    if training is not None and len(set(training.patients)) >= 2:
        read = _slides_features(net, card, scorer.features, training.refs, settings)
        scored = held_out_scores(
            training.features, training.patients, score=read, groups=training.groups
        )
        oof = [s for s in scored if len(s)]
    if not val + oof:
        log.warning("OOD calibration: no reference slide has tissue tiles; thresholds kept")
        return card
    threshold, share_threshold, shares = reference_thresholds(val + oof)
    block = {
        **card.ood,
        "tile_threshold": threshold,
        "slide_share_threshold": round(share_threshold, 4),
        "val_tiles": int(sum(map(len, val))),
        "val_slides": len(val),
        "val_slide_shares_max": round(float(shares[: len(val)].max(initial=0.0)), 4),
        "calibrated_on": CALIBRATED_ON,
    }
    if oof:
        block.update({
            "rule": RULE_CROSS_FITTED.format(floor=SLIDE_SHARE_FLOOR),
            "train_slides_out_of_fold": len(oof),
            "train_tiles_out_of_fold": int(sum(map(len, oof))),
            "train_slide_shares_out_of_fold": [round(float(x), 4) for x in shares[len(val):]],
            "calibrated_on": CALIBRATED_ON_CROSS_FITTED,
        })  # fmt: skip
    path = Path(model_dir) / CARD_FILE
    write_json(path, {**json.loads(path.read_text()), "ood": block})
    return dataclasses.replace(card, ood=block)


def _slides_features(
    net: nn.Module,
    card: ModelCard,
    features: str,
    refs: Sequence[SlideRef],
    settings: ReadSettings | None,
) -> Iterator[np.ndarray]:
    """Each slide's OOD features in turn (:func:`_slide_features`), read when asked for."""
    for ref in refs:
        yield _slide_features(net, card, features, ref, settings)


def _slide_features(
    net: nn.Module,
    card: ModelCard,
    features: str,
    ref: SlideRef,
    settings: ReadSettings | None,
) -> np.ndarray:
    """OOD features [N, D] of one slide's tissue tiles, read with inference's grid and
    normalisation."""
    from cscvision.slides.slide_stains import slide_stains
    from cscvision.slides.stain import StainReference, normalise_batch

    settings = settings or ReadSettings()
    spec = GridSpec(mpp=card.mpp, tile_px=card.tile_px, overlap=settings.overlap,
                    min_tissue=settings.min_tissue, mask_mpp=settings.mask_mpp)  # fmt: skip
    stain = StainReference.from_dict(card.stain) if card.stain else None
    device = next(net.parameters()).device
    mean = torch.tensor(card.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(card.std, device=device).view(1, 3, 1, 1) * 255
    out = []
    was_training = net.training
    with open_slide(ref.path, mpp=ref.mpp) as slide:
        _, mask = detect_tissue(slide, spec.mask_mpp)
        grid = make_grid(slide, spec, mask=mask)
        if len(grid) == 0:
            return np.zeros((0, 0), np.float32)
        batches = TileBatches(grid, settings.batch_size)
        batches.use_slide(slide)
        source = slide_stains(slide, stain) if stain is not None else None
        with torch.inference_mode(), feature_tap(net.eval(), features) as seen:
            for i in range(len(batches)):
                batch = batches.read(i)
                x = batch["image"][~batch["corrupt"]].to(device)
                if stain is not None:
                    x = normalise_batch(x, stain, source=source)
                net((x.float() - mean) / std)
                out.append(seen.pop().cpu().numpy())
    net.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

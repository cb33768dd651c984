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
import json
import logging
from collections.abc import Sequence
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
    TILE_QUANTILE,
    OODScorer,
    export_ood,
    feature_tap,
    fit_ood,
    load_ood,
)
from cscvision.slides.grid import GridSpec, detect_tissue, make_grid
from cscvision.slides.settings import ReadSettings
from cscvision.slides.slide import open_slide
from cscvision.slides.tilebatches import TileBatches

log = logging.getLogger(__name__)

CALIBRATED_ON = "validation slides' tissue tiles as inference reads them"


@dataclasses.dataclass(frozen=True)
class SlideRef:
    """A slide to calibrate on: its path and the level-0 µm/px to open it with (None: from
    its metadata)."""

    path: str | Path
    mpp: float | None = None


def export_run_ood(
    net: Any,
    card: ModelCard,
    dm: Any,
    model_dir: str | Path,
    *,
    note: str = "",
    features: str | None = None,
    calibrate: bool = True,
) -> ModelCard:
    """Fit the record on ``dm``'s training tiles (in order, unaugmented), write it beside
    the exported weights and set its thresholds from the validation slides as inference
    reads them (models reading tiles; models trained on stored features keep the
    validation tiles' thresholds). Returns the card that keeps it."""
    from cscvision.training.data import stain_sources_of

    sources = stain_sources_of(dm, card.stain)
    loaders = dm._loader("train"), dm._loader("val")
    record, block = fit_ood(net, card, *loaders, features=features, stain_sources=sources)
    if note:
        block["note"] = note
    card = export_ood(model_dir, card, record, block)
    slides = [SlideRef(s.slide_path, s.mpp_override) for s in dm.slides.get("val", ())]
    if calibrate and slides and block["features"] in (*BLOCK_FEATURES, "penultimate"):
        card = calibrate_on_slides(net, card, model_dir, slides)
    return card


def calibrate_on_slides(
    net: nn.Module,
    card: ModelCard,
    model_dir: str | Path,
    slides: Sequence[SlideRef],
    settings: ReadSettings | None = None,
) -> ModelCard:
    """Set the card's OOD tile and slide thresholds from every tissue tile of ``slides``
    read as inference reads them (``settings``: the default ``infer`` flags), keeping the
    fitted record. Returns the new card; the weights and the record file are untouched."""
    scorer = load_ood(model_dir, card)
    if scorer is None:
        raise ValueError(f"{model_dir}: its card keeps no OOD record to calibrate")
    scored = (_slide_scores(net, card, scorer, ref, settings) for ref in slides)
    per_slide = [s for s in scored if len(s)]
    if not per_slide:
        log.warning("OOD calibration: no validation slide has tissue tiles; thresholds kept")
        return card
    threshold = float(np.quantile(np.concatenate(per_slide), TILE_QUANTILE))
    shares = np.array([np.mean(s > threshold) for s in per_slide])
    block = {
        **card.ood,
        "tile_threshold": threshold,
        "slide_share_threshold": round(max(SLIDE_SHARE_FLOOR, 2 * float(shares.max())), 4),
        "val_tiles": int(sum(map(len, per_slide))),
        "val_slides": len(per_slide),
        "val_slide_shares_max": round(float(shares.max()), 4),
        "calibrated_on": CALIBRATED_ON,
    }
    path = Path(model_dir) / CARD_FILE
    write_json(path, {**json.loads(path.read_text()), "ood": block})
    return dataclasses.replace(card, ood=block)


def _slide_scores(
    net: nn.Module,
    card: ModelCard,
    scorer: OODScorer,
    ref: SlideRef,
    settings: ReadSettings | None,
) -> np.ndarray:
    """OOD scores of one slide's tissue tiles, read with inference's grid and normalisation."""
    from cscvision.slides.slide_stains import slide_stains
    from cscvision.slides.stain import StainReference, normalise_batch

    settings = settings or ReadSettings()
    spec = GridSpec(mpp=card.mpp, tile_px=card.tile_px, overlap=settings.overlap,
                    min_tissue=settings.min_tissue, mask_mpp=settings.mask_mpp)  # fmt: skip
    stain = StainReference.from_dict(card.stain) if card.stain else None
    device = next(net.parameters()).device
    mean = torch.tensor(card.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(card.std, device=device).view(1, 3, 1, 1) * 255
    scorer = scorer.to(device)
    scores = []
    was_training = net.training
    with open_slide(ref.path, mpp=ref.mpp) as slide:
        _, mask = detect_tissue(slide, spec.mask_mpp)
        grid = make_grid(slide, spec, mask=mask)
        if len(grid) == 0:
            return np.zeros(0, np.float32)
        batches = TileBatches(grid, settings.batch_size)
        batches.use_slide(slide)
        source = slide_stains(slide, stain) if stain is not None else None
        with torch.inference_mode(), feature_tap(net.eval(), scorer.features) as seen:
            for i in range(len(batches)):
                batch = batches.read(i)
                x = batch["image"][~batch["corrupt"]].to(device)
                if stain is not None:
                    x = normalise_batch(x, stain, source=source)
                net((x.float() - mean) / std)
                scores.append(scorer(seen.pop()).cpu().numpy())
    net.train(was_training)
    return np.concatenate(scores) if scores else np.zeros(0, np.float32)

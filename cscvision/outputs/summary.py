"""``summary.json`` and the run's ``results.csv``: statistics of the stitched maps.

Areas are tissue-weighted over the scored map pixels, and a target's region is the one
definition of :mod:`cscvision.outputs.regions` (the GeoJSON outlines and the overlay
outline use the same pixels). Co-localisation of the first two targets (stemness,
immunosuppressive) is :mod:`cscvision.outputs.statistics`, each figure with its
permutation null; the README's "Statistics" section says what each one means.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cscvision import __version__
from cscvision.models.card import ModelCard
from cscvision.models.thresholds import confidence_thresholds
from cscvision.outputs.likelihood import DEFAULT_FACTOR
from cscvision.outputs.nulls import null_seed
from cscvision.outputs.prediction import SlidePrediction
from cscvision.outputs.regions import niche_name, region_masks, tissue_weights
from cscvision.outputs.statistics import colocalisation, within_fraction
from cscvision.outputs.trust import ood_columns, ood_row, ood_summary
from cscvision.slides.tiling import corrupt_tiles_record

DEFAULT_WITHIN_UM = 100.0  # "near" for the co-localisation figures (a few cell diameters)
DEFAULT_PERMUTATIONS = 199
NULL_STATISTICS = ("colocation_quotient", "lee_l", "hotspot_jaccard", "morisita_horn")
NULL_MODEL = (
    "rigid moves (toroidal shift and a symmetry of the bounding rectangle of the scored "
    "pixels) of the second target's map, regions and hot spots, keeping pixels that land "
    "on scored tissue; one-sided p for attraction"
)


# --- statistics (pure) -------------------------------------------------------------------


def within_key(a: str, b: str, within_um: float) -> str:
    return f"{a}_within_{within_um:g}um_of_{b}"


def region_statistics(
    maps: np.ndarray,
    tissue_map: np.ndarray,
    *,
    targets: Sequence[str],
    thresholds: Sequence[float],
    cell_mm2: float,
    cell_um: float,
    within_um: float = DEFAULT_WITHIN_UM,
    permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
) -> dict[str, Any]:
    """Tissue-weighted areas per target and the niche, over the scored map pixels, and the
    co-localisation figures of the first two targets."""
    tissue = tissue_weights(maps, tissue_map)
    analysed_mm2 = float(tissue.sum() * cell_mm2)
    regions = region_masks(maps, tissue_map, targets, thresholds)

    def area(mask: np.ndarray) -> dict[str, float | None]:
        mm2 = float((tissue * mask).sum() * cell_mm2)
        return {"area_mm2": mm2, "fraction_of_tissue": mm2 / analysed_mm2 if analysed_mm2 else None}

    per_target = {}
    filled = np.nan_to_num(maps, nan=0.0)
    for i, (t, thr) in enumerate(zip(targets, thresholds, strict=True)):
        mean = float((tissue * filled[i]).sum() / tissue.sum()) if tissue.sum() else None
        per_target[t] = {"threshold": thr, **area(regions[t]), "mean_probability": mean}
    stats: dict[str, Any] = {"analysed_tissue_mm2": analysed_mm2, "targets": per_target}
    if len(targets) >= 2:
        a, b = targets[0], targets[1]
        ra, rb = regions[a], regions[b]
        figures = colocalisation(
            maps[:2], tissue, ra, rb, cell_um=cell_um, within_um=within_um,
            permutations=permutations, seed=seed,
        )  # fmt: skip
        stats["niche"] = {
            "name": niche_name(targets[:2]),
            **area(ra & rb),
            "within_um": within_um,
            within_key(a, b, within_um): within_fraction(ra, rb, tissue, cell_um, within_um),
            within_key(b, a, within_um): within_fraction(rb, ra, tissue, cell_um, within_um),
            **figures,
            "null": {"model": NULL_MODEL, "permutations": permutations, "seed": seed},
        }
    return stats


def score_statistics(
    maps: np.ndarray, tissue_map: np.ndarray, *, targets: Sequence[str], units: Sequence[str]
) -> dict[str, Any]:
    """Threshold-free statistics of continuous (regression) maps: tissue-weighted mean and
    quantiles of each target's score over the scored map pixels; no areas (they need a
    threshold) and no niche."""
    valid = np.isfinite(maps[0]) & (tissue_map > 0)
    weight = tissue_map[valid].astype(np.float64)
    per_target = {}
    for i, (t, unit) in enumerate(zip(targets, units, strict=True)):
        v = maps[i][valid].astype(np.float64)
        stats: dict[str, Any] = {
            "unit": unit,
            "mean": None,
            "p10": None,
            "median": None,
            "p90": None,
        }
        if weight.sum() > 0:
            stats["mean"] = float((weight * v).sum() / weight.sum())
            stats["p10"], stats["median"], stats["p90"] = (
                float(q) for q in np.quantile(v, [0.1, 0.5, 0.9])
            )
        per_target[t] = stats
    return {
        "targets": per_target,
        "thresholded_statistics": "not computed: these maps have no threshold (regression "
        "scores or MIL within-slide percentiles)",
    }


def summarize(
    pred: SlidePrediction, card: ModelCard, model_info: dict, settings: dict, outputs: list[str]
) -> dict[str, Any]:
    grid, plan = pred.grid, pred.grid.plan
    cell_um = pred.map_transform.px_l0 * grid.slide_mpp
    stats = _map_statistics(pred, card, settings, pred.maps, pred.tissue_map)
    uncertainty = uncertainty_summary(pred, card, settings)
    return {
        "slide_id": grid.slide_id,
        "slide_path": str(Path(grid.slide_path).resolve()),
        "status": "complete",
        "model": model_info,
        "settings": settings,
        "resolution": {
            "slide_mpp": grid.slide_mpp,
            "mpp_source": grid.mpp_source,
            "mpp": plan.mpp,
            "tile_px": plan.tile_px,
            "level": plan.level,
            "downsample": plan.downsample,
            "read_px": plan.read_px,
            "resize_factor": plan.resize_factor,
            "tile_l0": plan.tile_l0,
            "stride_l0": grid.stride_l0,
            "map_px_l0": pred.map_transform.px_l0,
            "map_um_per_px": cell_um,
            "likelihood_map_factor": DEFAULT_FACTOR,
        },
        "dimensions": list(grid.dimensions),
        "bounds": list(grid.bounds),
        "n_tiles": len(grid),
        "tissue_mm2": pred.tissue_mm2,
        **stats,
        **({"slide_prediction": pred.slide_prediction} if pred.slide_prediction else {}),
        **corrupt_tile_fields(pred),
        **({"ood": ood} if (ood := ood_summary(pred, card)) else {}),
        **({"uncertainty": uncertainty} if uncertainty else {}),
        **({"stain_normalisation": pred.stain} if pred.stain else {}),
        "outputs": outputs,
        "device": pred.device,
        "amp": pred.amp,
        "seconds": round(pred.seconds, 3),
        "predict_seconds": round(pred.predict_seconds, 3),
        "cscvision_version": __version__,
    }


def _map_statistics(
    pred: SlidePrediction, card: ModelCard, settings: dict, maps: np.ndarray, tissue: np.ndarray
) -> dict[str, Any]:
    """Area, niche and co-localisation figures of ``maps`` (score statistics for a model
    without thresholds)."""
    grid = pred.grid
    if not card.thresholded:  # no threshold: no areas, niche or co-localisation figures
        units = [card.unit(t) for t in pred.targets]
        stats = score_statistics(maps, tissue, targets=pred.targets, units=units)
        for t in pred.targets:  # the span the overlay's colour bar and the viewer draw over
            stats["targets"][t]["value_range"] = list(card.value_range(t))
        return stats
    return region_statistics(
        maps,
        tissue,
        targets=pred.targets,
        thresholds=[card.threshold(t) for t in pred.targets],
        cell_mm2=pred.map_cell_mm2,
        cell_um=pred.map_transform.px_l0 * grid.slide_mpp,
        within_um=float(settings.get("within_um", DEFAULT_WITHIN_UM)),
        permutations=int(settings.get("permutations", DEFAULT_PERMUTATIONS)),
        seed=null_seed(grid.slide_id),
    )


def uncertainty_summary(
    pred: SlidePrediction, card: ModelCard, settings: dict
) -> dict[str, Any] | None:
    """With ``--uncertainty``: per target the card's confidence threshold (chosen on
    validation tiles), the share of tissue tiles above it, and the slide's statistics
    again without the map cells where any target's standard deviation is above its
    threshold (``without_uncertain``), with the share of tissue left out. None without
    ``--uncertainty``."""
    method = settings.get("uncertainty")
    if not method or not any(k.startswith("std_") for k in pred.trust):
        return None
    thresholds = confidence_thresholds(card, method)
    block: dict[str, Any] = {"method": method, "thresholds": thresholds}
    if not thresholds:
        block["note"] = (
            "the model's card keeps no confidence threshold for this method (trained before "
            "they existed, or its validation tiles did not separate): nothing is left out"
        )
        return block
    uncertain = np.zeros(pred.tissue_map.shape, bool)
    shares = {}
    for t, limit in thresholds.items():
        std = pred.trust.get(f"std_{t}")
        if std is None:
            continue
        shares[t] = round(float(np.mean(std > limit)), 4) if len(std) else 0.0
        uncertain |= np.nan_to_num(pred.trust_maps[f"std_{t}"], nan=0.0) > limit
    tissue = np.nan_to_num(pred.tissue_map, nan=0.0)
    total = float(tissue.sum()) or 1.0
    kept_tissue = np.where(uncertain, 0.0, tissue)
    kept_maps = np.where(uncertain[None], np.nan, pred.maps)
    return {
        **block,
        "share_of_tiles_above": shares,
        "share_of_tissue_left_out": round(1 - float(kept_tissue.sum()) / total, 4)
        if total
        else 0.0,
        "rule": card.confidence.get("rule", ""),
        "without_uncertain": _map_statistics(pred, card, settings, kept_maps, kept_tissue),
    }


# --- run-level table ---------------------------------------------------------------------


def result_columns(
    targets: Sequence[str],
    within_um: float = DEFAULT_WITHIN_UM,
    mil: dict | None = None,
    ood: bool = False,
) -> list[str]:
    """``results.csv`` columns; ``mil`` (a MIL card's record) adds the slide predictions,
    ``ood`` (the model keeps an OOD record) the slide's OOD share and flag."""
    cols = ["slide_id", "slide_path", "status", "n_tiles", "tissue_mm2", "analysed_tissue_mm2"]
    cols += ood_columns() if ood else []
    if mil:  # a MIL model's maps are within-slide ranks: no areas, no niche
        return [*cols, *slide_prediction_columns(mil), "seconds", "error"]
    for t in targets:
        cols += [f"{t}_area_mm2", f"{t}_fraction"]
    if len(targets) >= 2:
        a, b = targets[0], targets[1]
        cols += ["niche_area_mm2", "niche_fraction"]
        cols += [within_key(a, b, within_um), within_key(b, a, within_um)]
        for name in NULL_STATISTICS:
            cols += [name, f"{name}_z", f"{name}_p"]
    return [*cols, "seconds", "error"]


def result_row(summary: dict, targets: Sequence[str]) -> dict[str, Any]:
    """One ``results.csv`` row from a slide's summary."""
    row: dict[str, Any] = {k: summary.get(k) for k in ("slide_id", "slide_path", "n_tiles")}
    row.update(status="ok", tissue_mm2=summary.get("tissue_mm2"), error="")
    row["analysed_tissue_mm2"] = summary.get("analysed_tissue_mm2")
    row.update(slide_prediction_row(summary))
    row.update(ood_row(summary))
    for t in targets:
        stats = summary.get("targets", {}).get(t, {})
        row[f"{t}_area_mm2"] = stats.get("area_mm2")
        row[f"{t}_fraction"] = stats.get("fraction_of_tissue")
    niche = summary.get("niche") or {}
    if len(targets) >= 2:
        row.update(
            niche_area_mm2=niche.get("area_mm2"), niche_fraction=niche.get("fraction_of_tissue")
        )
        within_um = niche.get("within_um", DEFAULT_WITHIN_UM)
        for a, b in ((targets[0], targets[1]), (targets[1], targets[0])):
            row[within_key(a, b, within_um)] = niche.get(within_key(a, b, within_um))
        for name in NULL_STATISTICS:
            figure = niche.get(name) or {}
            row.update({name: figure.get("observed"), f"{name}_z": figure.get("z")})
            row[f"{name}_p"] = figure.get("p")
    row["seconds"] = summary.get("seconds")
    return {k: _fmt(v) for k, v in row.items()}


def slide_prediction_columns(record: dict[str, Any]) -> list[str]:
    """``results.csv`` columns of a MIL card's ``mil`` record: ``pred_<target>`` for each
    target, and ``p_<target>_<class>`` for each class."""
    cols = [f"pred_{r['name']}" for r in record.get("regression", [])]
    for spec in record.get("classification", []):
        cols.append(f"pred_{spec['name']}")
        cols += [f"p_{spec['name']}_{c}" for c in spec["classes"]]
    return cols


def slide_prediction_row(summary: dict[str, Any]) -> dict[str, Any]:
    """The :func:`slide_prediction_columns` values of one slide's summary."""
    pred = summary.get("slide_prediction") or {}
    row: dict[str, Any] = {f"pred_{k}": v for k, v in pred.get("regression", {}).items()}
    for target, rec in pred.get("classification", {}).items():
        row[f"pred_{target}"] = rec["predicted"]
        row.update({f"p_{target}_{c}": p for c, p in rec["probabilities"].items()})
    return row


def _fmt(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


# --- tiles dropped as corrupt (--on-corrupt-tile skip) -----------------------------------


def corrupt_tile_fields(pred: SlidePrediction) -> dict[str, Any]:
    """``corrupt_tiles``: how many tiles were dropped as undecodable and their level-0
    ``[x, y]`` corners (empty when none were, or with ``--on-corrupt-tile fail``)."""
    xy = pred.corrupt_xy_l0 if pred.corrupt_xy_l0 is not None else np.zeros((0, 2), np.int64)
    return corrupt_tiles_record(xy)

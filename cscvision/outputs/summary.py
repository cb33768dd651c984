"""``summary.json`` and the run's ``results.csv``: statistics of the stitched maps.

Areas are tissue-weighted: a map pixel counts with the fraction of it that is tissue
(from the tissue mask), over the pixels that tiles scored. A target's region is where its
blended probability is at or above the model card's threshold; the niche is where the
first two targets (stemness, immunosuppressive) both are.

Co-localisation of the two targets is reported two ways:

* ``morisita_horn``: the Morisita–Horn index of the two tissue-weighted probability
  maps, 0 (disjoint) to 1 (the same spatial distribution). It uses the probabilities
  themselves, so it needs no threshold, and it does not depend on how much of each
  target there is, only on where (the index ecologists use for species overlap).
* ``<a>_within_100um_of_<b>``: the share of ``a``'s thresholded area lying within
  100 µm (centre to centre of map pixels) of ``b``'s: the "niche" question asked with a
  distance a pathologist can picture (a few cell diameters). Its resolution is the map
  pixel (``resolution.map_um_per_px``), so at 0 overlap a tile.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from cscvision import __version__
from cscvision.outputs.geojson import niche_name
from cscvision.outputs.likelihood import DEFAULT_FACTOR
from cscvision.outputs.prediction import SlidePrediction
from cscvision.training.card import ModelCard

PROXIMITY_UM = 100.0  # "near" for the co-localisation proximity fraction


# --- statistics (pure) -------------------------------------------------------------------


def morisita_horn(x: np.ndarray, y: np.ndarray) -> float | None:
    """Morisita–Horn overlap of two non-negative abundance maps: 1 = same spatial
    distribution, 0 = disjoint; ``None`` when either map is all zero."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    sx, sy = x.sum(), y.sum()
    if sx <= 0 or sy <= 0:
        return None
    p, q = x / sx, y / sy
    return float(2 * (p * q).sum() / ((p * p).sum() + (q * q).sum()))


def near_fraction(
    a: np.ndarray, b: np.ndarray, weight: np.ndarray, cell_um: float, within_um: float
) -> float | None:
    """Share of ``a``'s (weighted) area whose map pixel centre lies within ``within_um`` of
    a pixel of ``b``; ``None`` when ``a`` or ``b`` is empty."""
    if not a.any() or not b.any():
        return None
    distance_um = ndimage.distance_transform_edt(~b, sampling=cell_um)
    total = float((weight * a).sum())
    if total <= 0:
        return None
    return float((weight * (a & (distance_um <= within_um))).sum() / total)


def region_statistics(
    maps: np.ndarray,
    tissue_map: np.ndarray,
    *,
    targets: Sequence[str],
    thresholds: Sequence[float],
    cell_mm2: float,
    cell_um: float,
) -> dict[str, Any]:
    """Tissue-weighted areas per target and the niche, over the scored map pixels."""
    valid = np.isfinite(maps[0])
    tissue = np.where(valid, tissue_map, 0.0).astype(np.float64)
    analysed_mm2 = float(tissue.sum() * cell_mm2)
    filled = np.nan_to_num(maps, nan=0.0)
    above = {
        t: valid & (filled[i] >= thr)
        for i, (t, thr) in enumerate(zip(targets, thresholds, strict=True))
    }

    def area(mask: np.ndarray) -> dict[str, float | None]:
        mm2 = float((tissue * mask).sum() * cell_mm2)
        return {"area_mm2": mm2, "fraction_of_tissue": mm2 / analysed_mm2 if analysed_mm2 else None}

    per_target = {}
    for i, (t, thr) in enumerate(zip(targets, thresholds, strict=True)):
        mean = float((tissue * filled[i]).sum() / tissue.sum()) if tissue.sum() else None
        per_target[t] = {"threshold": thr, **area(above[t]), "mean_probability": mean}
    stats: dict[str, Any] = {"analysed_tissue_mm2": analysed_mm2, "targets": per_target}
    if len(targets) >= 2:
        a, b = targets[0], targets[1]
        stats["niche"] = {
            "name": niche_name(targets[:2]),
            **area(above[a] & above[b]),
            "morisita_horn": morisita_horn(tissue * filled[0], tissue * filled[1]),
            f"{a}_within_{PROXIMITY_UM:g}um_of_{b}": near_fraction(
                above[a], above[b], tissue, cell_um, PROXIMITY_UM
            ),
            f"{b}_within_{PROXIMITY_UM:g}um_of_{a}": near_fraction(
                above[b], above[a], tissue, cell_um, PROXIMITY_UM
            ),
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
        "thresholded_statistics": "not computed: regression targets have no threshold",
    }


def summarize(
    pred: SlidePrediction, card: ModelCard, model_info: dict, settings: dict, outputs: list[str]
) -> dict[str, Any]:
    grid, plan = pred.grid, pred.grid.plan
    cell_um = pred.map_transform.px_l0 * grid.slide_mpp
    if card.is_regression:
        units = [card.unit(t) for t in pred.targets]
        stats = score_statistics(pred.maps, pred.tissue_map, targets=pred.targets, units=units)
    else:
        stats = region_statistics(
            pred.maps,
            pred.tissue_map,
            targets=pred.targets,
            thresholds=[card.threshold(t) for t in pred.targets],
            cell_mm2=pred.map_cell_mm2,
            cell_um=cell_um,
        )
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
        "outputs": outputs,
        "device": pred.device,
        "amp": pred.amp,
        "seconds": round(pred.seconds, 3),
        "predict_seconds": round(pred.predict_seconds, 3),
        "cscvision_version": __version__,
    }


# --- run-level table ---------------------------------------------------------------------


def result_columns(targets: Sequence[str]) -> list[str]:
    cols = ["slide_id", "slide_path", "status", "n_tiles", "tissue_mm2", "analysed_tissue_mm2"]
    for t in targets:
        cols += [f"{t}_area_mm2", f"{t}_fraction"]
    if len(targets) >= 2:
        a, b = targets[0], targets[1]
        cols += ["niche_area_mm2", "niche_fraction", "morisita_horn"]
        cols += [f"{a}_within_{PROXIMITY_UM:g}um_of_{b}"]
    return [*cols, "seconds", "error"]


def result_row(summary: dict, targets: Sequence[str]) -> dict[str, Any]:
    """One ``results.csv`` row from a slide's summary."""
    row: dict[str, Any] = {k: summary.get(k) for k in ("slide_id", "slide_path", "n_tiles")}
    row.update(status="ok", tissue_mm2=summary.get("tissue_mm2"), error="")
    row["analysed_tissue_mm2"] = summary.get("analysed_tissue_mm2")
    for t in targets:
        stats = summary.get("targets", {}).get(t, {})
        row[f"{t}_area_mm2"] = stats.get("area_mm2")
        row[f"{t}_fraction"] = stats.get("fraction_of_tissue")
    niche = summary.get("niche") or {}
    if len(targets) >= 2:
        key = f"{targets[0]}_within_{PROXIMITY_UM:g}um_of_{targets[1]}"
        row.update(
            niche_area_mm2=niche.get("area_mm2"), niche_fraction=niche.get("fraction_of_tissue")
        )
        row.update({"morisita_horn": niche.get("morisita_horn"), key: niche.get(key)})
    row["seconds"] = summary.get("seconds")
    return {k: _fmt(v) for k, v in row.items()}


def _fmt(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value

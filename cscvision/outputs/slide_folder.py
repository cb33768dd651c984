"""Per-slide inference outputs, written atomically into ``OUT/<slide_id>/``.

=================================  ==========================================================
``tiles.csv``                      x, y (level-0), tissue fraction, ``prob_<target>`` per tile
``maps.npz``                       one stitched map per target (key = target name), ``tissue``
                                   (tissue fraction per map pixel), ``transform`` = level-0
                                   (x0, y0, px_l0), ``targets``, ``slide_mpp``; no pickles
``overlay_<target>.png``           thumbnail + heatmap, threshold outline, colour bar, legend
``<id>_likelihood_map_<t>.tif``    pyramidal uint8 map at 1/16 of level 0 (ASAP, QuPath)
``<slide>_likelihood_map.tif``     with ``--asap-target T``: T's map under the name ASAP
                                   opens beside the slide (``<slide>`` = slide file stem)
``<id>.geojson``                   QuPath tiles with measurements + classified region outlines
``summary.json``                   areas, fractions, niche, co-localisation, model, resolution
=================================  ==========================================================

``summary.json`` is written last: its presence, with the same model and settings, marks
the slide complete, so an interrupted batch redoes only unfinished slides. Outputs are
deterministic (no timestamps inside files); only the ``seconds`` fields change between
runs. Statistics are pure functions of the maps (:mod:`cscvision.outputs.summary`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cscvision.core.io import (
    atomic_path,
    file_sha256,
    inside,
    is_stale_temp,
    write_csv,
    write_json,
    write_png,
)
from cscvision.models.card import WEIGHTS_FILE, ModelCard
from cscvision.models.thresholds import legend_threshold
from cscvision.outputs.geojson import (
    region_features,
    target_colors,
    tile_features,
    write_geojson,
)
from cscvision.outputs.likelihood import asap_name, likelihood_map_name, write_likelihood_map
from cscvision.outputs.overlay import heat_image, render_overlay
from cscvision.outputs.prediction import SlidePrediction
from cscvision.outputs.regions import region_masks
from cscvision.outputs.summary import DEFAULT_PERMUTATIONS, DEFAULT_WITHIN_UM, summarize
from cscvision.outputs.trust import write_trust_maps
from cscvision.slides.slide import MPP_FROM_OVERRIDE

if TYPE_CHECKING:
    from cscvision.models.export import LoadedModel

SUMMARY = "summary.json"
TILES = "tiles.csv"
MAPS = "maps.npz"


# --- model identity and completion -------------------------------------------------------


# Card fields the outputs depend on: editing one (re-tuned thresholds) makes old outputs stale.
_CARD_OUTPUT_FIELDS = (
    "targets",
    "colors",
    "thresholds",
    "tile_px",
    "mpp",
    "mean",
    "std",
    "calibration",
    "units",
    "output_scale",
    "ood",
    "stain",
    "confidence",
)  # fmt: skip  (and the kind's legacy_task, as 0.1.0's "task")


def model_identity(model: LoadedModel) -> dict[str, str]:
    """Name, version, a weights digest and a digest of the card fields the outputs use:
    a re-trained model under the same name, or one with re-tuned thresholds, differs."""
    from cscvision.models.ensemble import LoadedEnsemble, ensemble_weights_digest

    if isinstance(model, LoadedEnsemble):
        digest = ensemble_weights_digest(model)
    else:
        digest = file_sha256(Path(model.path) / WEIGHTS_FILE)
    card = model.card
    used = {k: v for k, v in card.to_json().items() if k in _CARD_OUTPUT_FIELDS}
    used["task"] = model.kind.legacy_task(card)  # 0.1.0's name: earlier outputs stay complete
    if not used.get("calibration"):  # uncalibrated cards keep the digest they had before
        used.pop("calibration", None)
    for key in ("ood", "stain", "confidence"):  # nor do cards without these records
        if not used.get(key):
            used.pop(key, None)
    card_digest = hashlib.sha256(json.dumps(used, sort_keys=True).encode()).hexdigest()
    return {
        "name": card.name,
        "version": card.cscvision_version,
        "backbone": card.backbone,
        "weights_sha256": digest[:16],
        "card_sha256": card_digest[:16],
    }


def outputs_complete(folder: str | Path, model_info: dict, settings: dict) -> bool:
    """True if ``folder/summary.json`` exists, records this model and these settings, and
    every output it lists is there."""
    folder = Path(folder)
    try:
        summary = json.loads((folder / SUMMARY).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (
        summary.get("model") == model_info
        and summary.get("settings") == settings
        and all((folder / name).is_file() for name in summary.get("outputs", []))
    )


def clear_partial(folder: str | Path) -> None:
    """Before (re)writing a slide: drop its summary (so it reads incomplete until done)
    and temporary files left by a run that was killed while writing (never those of a
    process that is still running: :func:`~cscvision.core.io.is_stale_temp`)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    (folder / SUMMARY).unlink(missing_ok=True)
    for stale in folder.glob(".*.tmp*"):
        if is_stale_temp(stale):
            stale.unlink(missing_ok=True)


# --- writers -----------------------------------------------------------------------------


def write_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Like ``np.savez_compressed`` but byte-for-byte reproducible (fixed zip timestamps)."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)
    return Path(path)


def write_tile_table(path: str | Path, pred: SlidePrediction) -> Path:
    """``tiles.csv``: corner, tissue fraction, ``prob_<target>`` per map channel (MIL: its
    within-slide percentile), then any raw per-tile columns (MIL: attention × N and the
    contributions in label units), then the trust columns (``ood``, ``std_<t>``, ``mi_<t>``)."""
    values = {**pred.tile_values, **pred.trust}
    extra = list(values)
    header = ["x", "y", "tissue", *(f"prob_{t}" for t in pred.targets), *extra]
    columns = np.stack([values[k] for k in extra], 1) if extra else None
    rows = (
        [
            int(x),
            int(y),
            f"{tissue:.4f}",
            *(f"{p:.6f}" for p in probs),
            *(f"{v:.6g}" for v in (columns[i] if columns is not None else ())),
        ]
        for i, ((x, y), tissue, probs) in enumerate(
            zip(pred.grid.xy_l0, pred.grid.tissue, pred.probs, strict=True)
        )
    )
    return write_csv(path, header, rows)


def write_maps(path: str | Path, pred: SlidePrediction) -> Path:
    reserved = {"tissue", "transform", "targets", "slide_mpp", "bounds", "dimensions"}
    clash = reserved & set(pred.targets) | set(pred.targets) & set(pred.trust_maps)
    if clash:
        raise ValueError(f"target names {sorted(clash)} clash with maps.npz keys; rename them")
    arrays = {t: pred.maps[i] for i, t in enumerate(pred.targets)}
    arrays.update(pred.trust_maps)  # ood, std_<t>, mi_<t>: their values, not scaled
    arrays.update(
        tissue=pred.tissue_map,
        transform=pred.map_transform.as_array(),
        targets=np.array(pred.targets),
        slide_mpp=np.float64(pred.grid.slide_mpp),
        bounds=np.array(pred.grid.bounds, np.int64),
        dimensions=np.array(pred.grid.dimensions, np.int64),
    )
    return write_npz(path, arrays)


def write_overlays(folder: Path, pred: SlidePrediction, card: ModelCard, thumb) -> list[Path]:
    colors = target_colors(pred.targets, card.colors)
    # regression: no threshold, so no region (an infinite threshold selects nothing)
    thresholds = [card.threshold(t) if card.thresholded else np.inf for t in pred.targets]
    regions = region_masks(pred.maps, pred.tissue_map, pred.targets, thresholds)
    paths = []
    for i, target in enumerate(pred.targets):
        # regression: no threshold outline; the map is shown over the card's value range
        threshold = thresholds[i] if card.thresholded else None
        heat = heat_image(
            thumb,
            pred.mask,
            unit_map(pred.maps[i], card, target),
            pred.map_transform,
            pred.grid.dimensions,
            region=regions[target],
            contour_rgb=colors[target],
        )
        image = render_overlay(
            heat,
            title=f"{pred.slide_id} — {target}",
            subtitle=(
                f"model {card.name} · tiles of {card.tile_px} px at {card.mpp:g} µm/px · "
                f"{len(pred.grid)} tiles · research use only"
            ),
            target=target,
            threshold=threshold,
            contour_rgb=colors[target],
            min_tissue=pred.grid.spec.min_tissue,
            value_range=card.value_range(target),
            unit=card.unit(target),
            threshold_label=legend_threshold(card, target) if card.thresholded else None,
        )
        paths.append(write_png(folder / f"overlay_{target}.png", image))
    return paths


def unit_map(values: np.ndarray, card: ModelCard, target: str) -> np.ndarray:
    """``values`` mapped from the card's value range of ``target`` to [0, 1] (not clipped)."""
    lo, hi = card.value_range(target)
    return values if (lo, hi) == (0.0, 1.0) else (values - lo) / (hi - lo)


def run_settings(
    *,
    overlap: float,
    min_tissue: float,
    mask_mpp: float,
    slide_mpp: float | None,
    within_um: float = DEFAULT_WITHIN_UM,
    permutations: int = DEFAULT_PERMUTATIONS,
    asap_target: str | None = None,
    uncertainty: str | None = None,
) -> dict[str, Any]:
    """What must match for earlier outputs of a slide to count as complete
    (``slide_mpp``: the level-0 µm/px override given for the slide, if any)."""
    return {
        "overlap": overlap,
        "min_tissue": min_tissue,
        "mask_mpp": mask_mpp,
        "slide_mpp_override": slide_mpp,
        "within_um": within_um,
        "permutations": permutations,
        "asap_target": asap_target,
        **({"uncertainty": uncertainty} if uncertainty else {}),  # absent: as before
    }


def _settings_of(pred: SlidePrediction) -> dict[str, Any]:
    spec, grid = pred.grid.spec, pred.grid
    override = grid.slide_mpp if grid.mpp_source == MPP_FROM_OVERRIDE else None
    return run_settings(
        overlap=spec.overlap, min_tissue=spec.min_tissue, mask_mpp=spec.mask_mpp, slide_mpp=override
    )


def write_slide_outputs(
    pred: SlidePrediction,
    out_dir: str | Path,
    card: ModelCard,
    thumb: np.ndarray | None = None,
    *,
    model_info: dict | None = None,
    settings: dict | None = None,
) -> dict[str, Any]:
    """Write every per-slide output of a prediction into the slide's folder.

    ``tiles.csv``, ``maps.npz``, the overlays, the likelihood TIFFs, the GeoJSON and
    ``summary.json``, each atomically; ``summary.json`` goes last and marks the folder
    complete.

    Parameters
    ----------
    pred
        The slide's prediction (``predict_slide``).
    out_dir
        The slide's folder (``OUT/<slide_id>``).
    card
        The model's card (targets, thresholds, colours, units).
    thumb
        The slide's thumbnail for the overlays; the prediction's when not given.
    model_info, settings
        What ``summary.json`` records about the model and the run's settings.

    Returns
    -------
    dict
        The summary written to ``summary.json``.

    Examples
    --------
    >>> cscvision.write_slide_outputs(pred, f"results/{pred.slide_id}", model.card)
    """
    folder = Path(out_dir)
    names = [
        f"{pred.slide_id}.geojson",
        *(likelihood_map_name(pred.slide_id, t) for t in card.targets),
    ]
    for name in names:  # named by slide id: refuse any that would land outside the folder
        if inside(folder, folder / name).parent != folder.resolve():
            raise ValueError(f"slide id {pred.slide_id!r}: not a plain file name; use a safe id")
    clear_partial(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_info = model_info or {"name": card.name, "version": card.cscvision_version}
    settings = settings or _settings_of(pred)
    written = [write_tile_table(folder / TILES, pred), write_maps(folder / MAPS, pred)]
    asap_target = settings.get("asap_target")
    names = [(t, likelihood_map_name(pred.slide_id, t)) for t in pred.targets]
    if asap_target is not None:
        names.append((asap_target, asap_name(pred.grid.slide_path)))
    for target, name in names:
        written.append(
            write_likelihood_map(
                folder / name,
                unit_map(pred.maps[pred.targets.index(target)], card, target),
                pred.map_transform,
                dimensions=pred.grid.dimensions,
                slide_mpp=pred.grid.slide_mpp,
            )
        )
    written += write_overlays(folder, pred, card, pred.thumb if thumb is None else thumb)
    written += write_trust_maps(folder, pred, card)
    written.append(folder / f"{pred.slide_id}.geojson")
    write_geojson(written[-1], _geojson_features(pred, card))

    summary = summarize(pred, card, model_info, settings, [p.name for p in written])
    write_json(folder / SUMMARY, summary)
    return summary


def _geojson_features(pred: SlidePrediction, card: ModelCard) -> Iterator[dict]:
    grid = pred.grid
    offset = (int(grid.bounds[0]), int(grid.bounds[1]))
    names, values = list(pred.targets), pred.probs
    extra = {**pred.tile_values, **pred.trust}  # MIL's raw values, trust: measurements too
    if extra:
        names += list(extra)
        values = np.column_stack([values, *extra.values()])
    tiles = tile_features(
        grid.xy_l0, values, grid.plan.tile_l0, names, offset, slide_id=pred.slide_id
    )
    if not card.thresholded:  # region outlines need a threshold; tiles carry the scores
        return tiles
    regions = region_features(
        pred.maps,
        pred.tissue_map,
        pred.map_transform,
        targets=pred.targets,
        thresholds=[card.threshold(t) for t in pred.targets],
        colors=card.colors,
        cell_mm2=pred.map_cell_mm2,
        offset=offset,
        slide_id=pred.slide_id,
    )
    return itertools.chain(tiles, regions)

"""From an H&E slide and its IHC slides to a tile-label table and positive-region outlines."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from skimage import measure

from cscvision.labels.ihc import (
    MarkerConfig,
    combine,
    he_frame_maps,
    he_tiles,
    positive_regions,
    positivity_maps,
    stain_setup,
    tile_values,
)
from cscvision.labels.ihc_threshold import (
    MIN_SEPARATION,
    SPLIT_AGAIN,
    Threshold,
    mixture_threshold,
    pooled,
)
from cscvision.labels.registration import Registration, RegistrationParams, register_slides
from cscvision.labels.registration_qc import registration_exclusions
from cscvision.labels.table import LabelTable
from cscvision.slides.grid import GridSpec
from cscvision.slides.slide import open_slide

MARKER_COLOR = (150, 75, 0)


@dataclass(frozen=True)
class MarkerResult:
    marker: str
    ihc_path: str
    registration: Registration
    qc: np.ndarray
    stain: dict = field(default_factory=dict)
    frame: dict | None = None  # H&E-frame maps (tissue, positive, density); None if refused


@dataclass(frozen=True)
class SlideMeasure:
    """Everything of one H&E slide before the positivity thresholds are applied."""

    slide_id: str
    grid: object  # TileGrid of the H&E tissue tiles
    mask: np.ndarray  # H&E tissue mask at spec.mask_mpp
    he_mpp: float
    bounds: tuple
    markers: tuple[MarkerResult, ...]

    @property
    def accepted(self) -> tuple[MarkerResult, ...]:
        return tuple(m for m in self.markers if m.registration.ok)

    def densities(self, marker: str, spec: GridSpec, map_mpp: float) -> np.ndarray:
        """The marker's densities of the map cells on H&E and IHC tissue (for thresholds)."""
        for m in self.accepted:
            if m.marker == marker:
                frame = m.frame
                rows, cols = frame["density"].shape
                rr, cc = np.mgrid[0:rows, 0:cols]
                px = (cc + 0.5) * map_mpp / spec.mask_mpp
                py = (rr + 0.5) * map_mpp / spec.mask_mpp
                he = self.mask[np.clip(py.astype(int), 0, self.mask.shape[0] - 1),
                               np.clip(px.astype(int), 0, self.mask.shape[1] - 1)]  # fmt: skip
                return frame["density"][he & (frame["tissue"] > 0.5)]
        return np.zeros(0, np.float32)


@dataclass(frozen=True)
class IhcLabels:
    table: LabelTable | None  # None when every marker's registration failed
    markers: tuple[MarkerResult, ...]
    geojson: dict
    reason: str = ""  # why there is no table, or which markers were refused
    counts: dict = field(default_factory=dict)
    positive_share: dict = field(default_factory=dict)  # marker -> share of valid tiles


def measure_slide(
    slide_id: str,
    he_path: str | Path,
    pairs: Sequence[tuple[str, str | Path]],
    cfg: MarkerConfig,
    spec: GridSpec,
    reg_params: RegistrationParams | None = None,
    slide_mpp: float | None = None,
) -> SlideMeasure:
    """Register every (marker, IHC slide) of an H&E slide and map its DAB into the H&E
    frame. A refused registration keeps its result (``ok`` False) and no maps."""
    results = []
    with open_slide(he_path, mpp=slide_mpp) as he:
        grid, mask = he_tiles(he, spec)
        he_dims, bounds, he_mpp = he.info.dimensions, he.info.bounds, he.info.mpp
        for name, ihc_path in pairs:
            if name not in cfg.markers:
                raise ValueError(f"marker {name!r} ({ihc_path}) is not in the marker config")
            marker = cfg.markers[name]
            with open_slide(ihc_path, mpp=slide_mpp) as ihc:
                reg, qc = register_slides(he, ihc, reg_params, title=f"{slide_id}  {name}")
                if not reg.ok:
                    results.append(MarkerResult(name, str(ihc_path), reg, qc))
                    continue
                setup = stain_setup(ihc, cfg, marker)
                maps = positivity_maps(ihc, marker, setup, cfg.map_mpp)
            frame = he_frame_maps(maps, reg, he_dims, cfg.map_mpp, marker)
            stain = {k: v for k, v in setup.items() if k != "matrix"}
            results.append(MarkerResult(name, str(ihc_path), reg, qc, stain, frame))
    return SlideMeasure(slide_id, grid, mask, he_mpp, bounds, tuple(results))


def thresholds_for(
    measures: Sequence[SlideMeasure], cfg: MarkerConfig, spec: GridSpec
) -> dict[str, Threshold]:
    """Per marker: its ``min_density`` when the config sets one, else the mixture threshold
    of the densities pooled over ``measures`` (:mod:`cscvision.labels.ihc_threshold`)."""
    out = {}
    for name, marker in cfg.markers.items():
        if marker.min_density is not None:
            out[name] = Threshold(name, float(marker.min_density), "min_density in the config")
            continue
        samples = [m.densities(name, spec, cfg.map_mpp) for m in measures]
        if sum(len(x) for x in samples):
            out[name] = mixture_threshold(name, pooled(samples))
    return out


def slide_thresholds(
    measure: SlideMeasure, cohort: dict[str, Threshold], cfg: MarkerConfig, spec: GridSpec
) -> dict[str, Threshold]:
    """The thresholds for one slide: its own mixture threshold where its densities separate
    into two components (Ashman's D ≥ ``MIN_SEPARATION``, the upper one ≥ 2 % of its
    tissue), since a slide's DAB threshold and stain strength shift its densities; else
    the cohort's (:func:`thresholds_for`), and always a threshold the config fixes."""
    out = dict(cohort)
    for name in cohort:
        if cfg.markers[name].min_density is not None:
            continue
        x = measure.densities(name, spec, cfg.map_mpp)
        try:
            own = mixture_threshold(name, x)
        except ValueError:
            continue
        if own.separation >= MIN_SEPARATION and own.weights[1] >= 0.02:
            rule = "two-component Gaussian mixture on this slide's densities (they separate)"
            again = SPLIT_AGAIN if SPLIT_AGAIN in own.rule else ""
            out[name] = dataclasses.replace(own, rule=rule + again)
    return out


def label_slide(
    measure: SlideMeasure, cfg: MarkerConfig, spec: GridSpec, thresholds: dict[str, Threshold]
) -> IhcLabels:
    """The tile-label table of a measured slide. A refused marker drops only its own
    columns (its target is left unknown unless another marker of it was accepted)."""
    refused = [m for m in measure.markers if not m.registration.ok]
    why = "; ".join(f"registration of {m.marker} slide {m.ihc_path} refused: "
                    f"{m.registration.reason}" for m in refused)  # fmt: skip
    if not measure.accepted:
        return IhcLabels(None, measure.markers, _geojson({}, 0, measure.bounds), why)
    values, frames, share = {}, {}, {}
    grid, he_mpp = measure.grid, measure.he_mpp
    for m in measure.accepted:
        frame = {**m.frame, "region": positive_regions(m.frame, thresholds[m.marker].value)}
        frames[m.marker] = frame
        values[m.marker] = tile_values(frame, measure.mask, spec.mask_mpp, grid.xy_l0,
                                       grid.plan.tile_l0, he_mpp, cfg.map_mpp)  # fmt: skip
    centres = (grid.xy_l0 + grid.plan.tile_l0 / 2) * he_mpp
    by_reg = {m.marker: registration_exclusions(m.registration, centres) for m in measure.accepted}
    table, counts = _table(measure.slide_id, grid, values, cfg, spec, measure.markers, thresholds,
                           by_reg)  # fmt: skip
    for name, v in values.items():
        ok = table.valid & np.isfinite(v["fraction"])
        share[name] = float((v["fraction"][ok] >= 0.5).mean()) if ok.any() else float("nan")
    geo = _geojson(frames, cfg.map_mpp / he_mpp, measure.bounds)
    return IhcLabels(table, measure.markers, geo, why, counts, share)


def ihc_labels(
    slide_id: str,
    he_path: str | Path,
    pairs: Sequence[tuple[str, str | Path]],
    cfg: MarkerConfig,
    spec: GridSpec,
    reg_params: RegistrationParams | None = None,
    slide_mpp: float | None = None,
) -> IhcLabels:
    """Register every (marker, IHC slide) pair of one H&E slide and turn DAB into tile targets.

    One slide alone: :func:`measure_slide`, positivity thresholds from this slide's own
    densities (a cohort's are better: ``cscvision labels ihc`` pools them), :func:`label_slide`.

    Parameters
    ----------
    slide_id
        The H&E slide's id (the table's name).
    he_path
        The H&E slide.
    pairs
        ``(marker, IHC slide path)`` for each IHC slide of this H&E slide.
    cfg
        The marker config (``marker_config``): marker → target, thresholds, maps.
    spec
        The H&E tile grid the targets are computed on (the training grid).
    reg_params
        Registration settings; the defaults when not given.
    slide_mpp
        Level-0 µm/px for slides whose metadata gives none.

    Returns
    -------
    IhcLabels
        The tile-label table (a refused marker leaves only its own target empty, with the
        reason in the sidecar), each marker's result, the QuPath GeoJSON of positive regions
        and counts.

    Raises
    ------
    ValueError
        A marker of ``pairs`` that ``cfg`` does not name.
    SlideError
        A slide cannot be read.

    Examples
    --------
    >>> cfg = cscvision.marker_config(yaml.safe_load(open("markers.yaml")))
    >>> out = cscvision.ihc_labels("S01", "he/S01.svs", [("CD44", "ihc/S01_CD44.svs")], cfg,
    ...                            cscvision.GridSpec(mpp=0.5, tile_px=224))
    """
    measure = measure_slide(slide_id, he_path, pairs, cfg, spec, reg_params, slide_mpp)
    cohort = thresholds_for([measure], cfg, spec)
    return label_slide(measure, cfg, spec, slide_thresholds(measure, cohort, cfg, spec))


def _registration_columns(by_reg: dict, valid: np.ndarray, xy_l0: np.ndarray):
    """Tiles excluded for the registration (any marker; see
    :mod:`cscvision.labels.registration_qc`) among those otherwise valid, and per marker
    how many for each reason."""
    excluded = np.zeros(len(valid), bool)
    per = {}
    for name, (over, unmeasured) in by_reg.items():
        excluded |= over | unmeasured
        per[name] = {"local_error_over_bound": int((over & valid).sum()),
                     "unmeasured_on_warned_pair": int((unmeasured & valid).sum())}  # fmt: skip
    excluded &= valid
    record = {"tiles": int(excluded.sum()), "per_marker": per,
              "xy_l0": xy_l0[excluded].astype(int).tolist()}  # fmt: skip
    return excluded, record


def _table(slide_id, grid, values, cfg: MarkerConfig, spec: GridSpec, results, thresholds,
           by_reg: dict | None = None):  # fmt: skip
    n = len(grid.xy_l0)
    valid = np.ones(n, bool)
    for v in values.values():
        valid &= v["cover"] >= cfg.min_ihc_tissue
    columns, names = [], []
    for target in cfg.targets:
        used = [m for m in values if cfg.markers[m].target == target]
        columns.append(combine([values[m]["fraction"] for m in used], cfg.combine) if used
                       else np.full(n, np.nan))  # fmt: skip
        names.append(target)
    for m, v in values.items():
        columns.append(v["positive"])
        names.append(f"{m}_positive")
    data = np.stack(columns, axis=1).astype(np.float32) if columns else np.zeros((n, 0))
    known = [j for j, t in enumerate(cfg.targets) if not np.isnan(data[:, j]).all()]
    valid &= ~np.isnan(data[:, known]).any(axis=1)
    by_registration, reg_record = _registration_columns(by_reg or {}, valid, grid.xy_l0)
    valid &= ~by_registration
    counts = {"tiles": n, "valid": int(valid.sum()), "excluded": int((~valid).sum()),
              "excluded_registration": reg_record["tiles"]}  # fmt: skip
    provenance = {
        "he_slide": str(grid.slide_path),
        "label_targets": list(cfg.targets),
        "markers": {
            r.marker: {
                "ihc_slide": r.ihc_path,
                "target": cfg.markers[r.marker].target,
                "refused": not r.registration.ok,
                "reason": r.registration.reason,
                "marker_mpp": cfg.markers[r.marker].mpp,
                "threshold": thresholds[r.marker].as_dict() if r.marker in thresholds else None,
                "registration_error_um": r.registration.error_um,
                "registration_qc": r.registration.qc,
                "registration_qc_reason": r.registration.qc_reason,
                "deformation_um": r.registration.deformation_um,
                "stain": r.stain,
            }
            for r in results
        },
        "combine": cfg.combine,
        "map_mpp": cfg.map_mpp,
        "min_ihc_tissue": cfg.min_ihc_tissue,
        "excluded": "tiles whose H&E tissue lies on IHC tissue for less than min_ihc_tissue, "
        "and tiles where the registration is unsure (excluded_for_registration)",
        "excluded_for_registration": {
            **reg_record,
            "rule": "local held-out registration error above max_local_error_um, or, on a "
            "pair whose QC warns, no local measure and an error extrapolated from the field's "
            "bend above it (cscvision.labels.registration_qc)",
        },
    }
    table = LabelTable(
        slide_id=slide_id,
        xy_l0=grid.xy_l0.astype(np.int64),
        targets=tuple(names),
        values=data,
        tile_px=spec.tile_px,
        mpp=spec.mpp,
        source="ihc",
        valid=valid,
        provenance=provenance,
        label_targets=tuple(cfg.targets),
    )
    return table, counts


def _geojson(frames: dict, cell_l0: float, bounds) -> dict:
    """QuPath annotations of each marker's positive regions (outer outlines, H&E level-0
    pixels relative to the bounds corner, as QuPath expects)."""
    features = []
    for name, frame in frames.items():
        region = np.pad(frame["region"], 1)
        labels = measure.label(region)
        for prop in measure.regionprops(labels):
            if prop.area < 4:
                continue
            filled = np.pad(prop.image_filled, 1)
            for contour in measure.find_contours(filled.astype(float), 0.5)[:1]:
                r0, c0 = prop.bbox[0] - 1, prop.bbox[1] - 1
                xy = np.stack([contour[:, 1] + c0 - 0.5, contour[:, 0] + r0 - 0.5], axis=1)
                xy = (xy + 0.5) * cell_l0 - np.asarray(bounds[:2])
                ring = np.round(xy, 1).tolist()
                if ring[0] != ring[-1]:
                    ring.append(ring[0])
                features.append({
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": [ring]},
                    "properties": {
                        "objectType": "annotation",
                        "classification": {"name": f"{name} positive",
                                           "color": list(MARKER_COLOR)},
                    },
                })  # fmt: skip
    return {"type": "FeatureCollection", "features": features}

"""From an H&E slide and its IHC slides to a tile-label table and positive-region outlines."""

from __future__ import annotations

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
    positivity_maps,
    stain_setup,
    tile_values,
)
from cscvision.labels.registration import Registration, RegistrationParams, register_slides
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


@dataclass(frozen=True)
class IhcLabels:
    table: LabelTable | None  # None when a registration failed
    markers: tuple[MarkerResult, ...]
    geojson: dict
    reason: str = ""  # why there is no table
    counts: dict = field(default_factory=dict)


def ihc_labels(
    slide_id: str,
    he_path: str | Path,
    pairs: Sequence[tuple[str, str | Path]],
    cfg: MarkerConfig,
    spec: GridSpec,
    reg_params: RegistrationParams | None = None,
    slide_mpp: float | None = None,
) -> IhcLabels:
    """Register every (marker, IHC slide) pair of an H&E slide and turn DAB into tile targets.

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
        The tile-label table (None when a registration failed, with ``reason`` saying which
        and why), each marker's result, the QuPath GeoJSON of positive regions and counts.

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
    results, values, frames = [], {}, {}
    with open_slide(he_path, mpp=slide_mpp) as he:
        grid, mask = he_tiles(he, spec)
        he_dims, bounds = he.info.dimensions, he.info.bounds
        for name, ihc_path in pairs:
            if name not in cfg.markers:
                raise ValueError(f"marker {name!r} ({ihc_path}) is not in the marker config")
            marker = cfg.markers[name]
            with open_slide(ihc_path, mpp=slide_mpp) as ihc:
                reg, qc = register_slides(he, ihc, reg_params)
                if not reg.ok:
                    results.append(MarkerResult(name, str(ihc_path), reg, qc))
                    why = f"registration of {name} slide {ihc_path} failed: {reg.reason}"
                    return IhcLabels(None, tuple(results), _geojson({}, 0, bounds), why)
                setup = stain_setup(ihc, cfg, marker)
                maps = positivity_maps(ihc, marker, setup, cfg.map_mpp)
            frame = he_frame_maps(maps, reg, he_dims, cfg.map_mpp, marker)
            frames[name] = frame
            values[name] = tile_values(frame, mask, spec.mask_mpp, grid.xy_l0,
                                       grid.plan.tile_l0, he.info.mpp, cfg.map_mpp)  # fmt: skip
            stain = {k: v for k, v in setup.items() if k != "matrix"}
            results.append(MarkerResult(name, str(ihc_path), reg, qc, stain))
    table, counts = _table(slide_id, grid, values, cfg, spec, results)
    return IhcLabels(table, tuple(results), _geojson(frames, cfg.map_mpp / he.info.mpp, bounds),
                     counts=counts)  # fmt: skip


def _table(slide_id, grid, values, cfg: MarkerConfig, spec: GridSpec, results):
    n = len(grid)
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
    valid &= ~np.isnan(data[:, : len(cfg.targets)]).any(axis=1)
    counts = {"tiles": n, "valid": int(valid.sum()), "excluded": int((~valid).sum())}
    provenance = {
        "he_slide": str(grid.slide_path),
        "markers": {
            r.marker: {
                "ihc_slide": r.ihc_path,
                "target": cfg.markers[r.marker].target,
                "marker_mpp": cfg.markers[r.marker].mpp,
                "min_density": cfg.markers[r.marker].min_density,
                "registration_error_um": r.registration.error_um,
                "stain": r.stain,
            }
            for r in results
        },
        "combine": cfg.combine,
        "map_mpp": cfg.map_mpp,
        "min_ihc_tissue": cfg.min_ihc_tissue,
        "excluded": "tiles whose H&E tissue lies on IHC tissue for less than min_ihc_tissue",
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

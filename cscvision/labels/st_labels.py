"""Tile-label tables from spatial transcriptomics: one tile centred on each spot in tissue.

A tile is ``tile_px`` pixels at ``mpp`` µm/px (default 224 px at 0.5 µm/px = 112 µm, as the
HEST benchmark uses): wider than a 55 µm Visium spot, so neighbouring tiles overlap at the
100 µm pitch (the patient-level split keeps a slide's tiles together). Each tile carries the
spot's panel scores; ``binarize_quantile`` adds ``<panel>_high`` (1 where the score reaches the
cohort's quantile).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cscvision.labels.programmes import ProgrammeConfig, score_programmes
from cscvision.labels.st import read_st, spots_to_level0, tile_corners
from cscvision.labels.table import LabelTable
from cscvision.slides.slide import open_slide, plan_read

HIGH_SUFFIX = "_high"


def _digest(files: Sequence[str]) -> str:
    """SHA-256 over the files a sample was read from (names and bytes), in 1 MiB chunks."""
    h = hashlib.sha256()
    for name in files:
        path = Path(name)
        if not path.exists():
            continue
        h.update(path.name.encode())
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def st_label_table(
    slide_path: str | Path,
    st_path: str | Path,
    config: ProgrammeConfig,
    *,
    slide_id: str,
    mpp_override: float | None = None,
    scale: float = 1.0,
    offset_px: tuple[float, float] = (0.0, 0.0),
) -> LabelTable:
    """The tile-label table of one slide: panel scores of its spots, tiles centred on them."""
    sample = read_st(st_path)
    with open_slide(slide_path, mpp=mpp_override) as slide:
        info = slide.info
    centres = spots_to_level0(
        sample.centres_px, info.dimensions, scale=scale, offset_px=offset_px, source=str(st_path)
    )
    plan = plan_read(info, mpp=config.mpp, tile_px=config.tile_px)
    scores, genes = score_programmes(sample.adata, config, source=str(st_path))
    spot_px = sample.spot_diameter_px
    spot_um = None if spot_px is None else spot_px * scale * info.mpp
    return LabelTable(
        slide_id=slide_id,
        xy_l0=tile_corners(centres, plan.tile_l0),
        targets=tuple(config.panels),
        values=scores,
        tile_px=config.tile_px,
        mpp=config.mpp,
        source="st",
        provenance={
            "st_path": str(st_path),
            "st_files": sample.details.get("files", []),
            "st_sha256": _digest(sample.details.get("files", [])),
            "layout": sample.layout,
            "slide_path": str(slide_path),
            "slide_mpp": info.mpp,
            "spots_in_tissue": len(sample),
            "spots_dropped_outside_tissue": sample.n_dropped,
            "spot_diameter_um": spot_um,
            "image_to_slide": {"scale": scale, "offset_px": list(offset_px)},
            "method": config.method,
            "target_sum": config.target_sum,
            "genes_used": genes,
            "barcodes": [str(b) for b in sample.adata.obs_names],
        },
    )


def binarize(tables: Sequence[LabelTable], quantile: float) -> list[LabelTable]:
    """Each table with ``<panel>_high`` columns: score ≥ the cohort's ``quantile`` of it."""
    if not tables:
        return []
    targets = tables[0].targets
    pooled = np.concatenate([t.values for t in tables])
    cuts = np.nanquantile(pooled, quantile, axis=0)
    out = []
    for t in tables:
        high = np.where(np.isnan(t.values), np.nan, (t.values >= cuts).astype(np.float32))
        provenance = {**t.provenance, "binarize": {"quantile": quantile, "cutoffs": cuts.tolist()}}
        out.append(
            dataclasses.replace(
                t,
                targets=(*targets, *(f"{n}{HIGH_SUFFIX}" for n in targets)),
                values=np.concatenate([t.values, high], axis=1).astype(np.float32),
                provenance=provenance,
            )
        )
    return out

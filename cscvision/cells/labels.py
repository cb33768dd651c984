"""Tile-label tables from cells: any per-tile cell feature becomes a training target.

A feature is a column of ``cscvision cells``' ``tiles.csv`` (``density_lymphocyte``,
``share_macrophage``, ``nn_lymphocyte_to_tumour_um``, ``mixing_inflammatory_tumour``, ...),
also written the other way round (``lymphocyte_density``, ``macrophage_share``), or
``share_<marker>_pos``: the share of a tile's cells positive for a marker (tables with
``<marker>_pos`` columns). Values are computed on the same non-overlapping tissue tiles as
``cscvision cells`` (:func:`~cscvision.cells.tiles.tile_cell_features`) and written as the
label-table contract (:mod:`cscvision.labels.table`): the raw value (regression; density in
cells / mm² of tissue) or, with a threshold, 1 where it is reached (``<feature>_high``).
Tiles where the feature is undefined (no cell of the type for a share or distance) are
left empty (unknown: not trained on). The sidecar's provenance names the cell table, its
source tool and version, the class map and the feature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cscvision.cells import features as f
from cscvision.cells.table import CellTable
from cscvision.cells.tiles import CellFeatureSpec, tile_cell_features
from cscvision.cells.types import cell_types
from cscvision.core.errors import CscvisionError
from cscvision.labels.table import LabelTable

HIGH_SUFFIX = "_high"
KINDS = ("density", "share", "count")


class CellLabelError(CscvisionError, ValueError):
    """A feature name that no cell feature answers."""


def canonical_feature(name: str) -> str:
    """``lymphocyte_density`` → ``density_lymphocyte`` (tiles.csv spelling); others as given."""
    name = name.strip()
    for kind in KINDS:
        if name.endswith(f"_{kind}") and not name.startswith(f"{kind}_"):
            return f"{kind}_{name[: -len(kind) - 1]}"
    return name


@dataclass(frozen=True)
class CellLabelSpec:
    """Which feature, and an optional threshold making it a 0/1 target."""

    feature: str
    threshold: float | None = None

    @property
    def column(self) -> str:
        return canonical_feature(self.feature)

    @property
    def target(self) -> str:
        return self.column + (HIGH_SUFFIX if self.threshold is not None else "")


def marker_share(table: CellTable, marker: str, tile: np.ndarray, n_tiles: int) -> np.ndarray:
    """Share of each tile's cells positive for ``marker`` (NaN where a tile has no cell)."""
    key = f"{marker}_pos"
    if key not in table.markers:
        raise CellLabelError(
            f"cell table of {table.slide_id or 'the slide'} has no {key} column; markers: "
            f"{', '.join(k for k in table.markers if k.endswith('_pos')) or 'none'}"
        )
    pos = np.asarray(table.markers[key], bool)
    inside = tile >= 0
    total = np.bincount(tile[inside], minlength=n_tiles)
    hits = np.bincount(tile[inside & pos], minlength=n_tiles)
    return f.shares(hits[:, None], total)[:, 0]


def feature_values(
    table: CellTable, xy_l0: np.ndarray, tissue: np.ndarray, tile_l0: float, mpp: float,
    column: str,
) -> np.ndarray:  # fmt: skip
    """float64[N tiles] of one feature column (module doc)."""
    if column.startswith("share_") and column.endswith("_pos"):
        tile = f.cells_in_tiles(table.x, table.y, xy_l0, tile_l0)
        return marker_share(table, column[len("share_") : -len("_pos")], tile, len(xy_l0))
    feats = tile_cell_features(table, xy_l0, tissue, tile_l0, mpp, CellFeatureSpec())
    if column in feats.columns:
        return feats.columns[column]
    kind, _, node = column.partition("_")
    if kind in KINDS and node:  # a type of the hierarchy with no cell on this slide
        cell_types().check(node)  # a misspelt type is an error, not a column of zeros
        has_cells = feats.columns["count_all"] > 0
        return np.where(has_cells | (kind != "share"), 0.0, np.nan)
    raise CellLabelError(
        f"feature {column!r} is no cell feature; e.g. {', '.join(list(feats.columns)[:6])}, "
        "share_<marker>_pos"
    )


def cell_label_table(
    table: CellTable,
    xy_l0: np.ndarray,
    tissue: np.ndarray,
    *,
    tile_l0: float,
    slide_mpp: float,
    tile_px: int,
    mpp: float,
    spec: CellLabelSpec,
    slide_id: str,
    provenance: dict[str, Any] | None = None,
) -> LabelTable:
    """The tile-label table of one slide's cells on its tissue tiles (module doc)."""
    values = feature_values(table, xy_l0, tissue, tile_l0, slide_mpp, spec.column)
    if spec.threshold is not None:
        values = np.where(np.isnan(values), np.nan, (values >= spec.threshold).astype(float))
    return LabelTable(
        slide_id=slide_id,
        xy_l0=np.asarray(xy_l0, np.int64).reshape(-1, 2),
        targets=(spec.target,),
        values=values.astype(np.float32)[:, None],
        tile_px=tile_px,
        mpp=mpp,
        source="cells",
        provenance={
            "feature": spec.column,
            "threshold": spec.threshold,
            "units": _units(spec.column),
            "cell_source": table.source,
            "cell_source_version": table.source_version,
            "class_map": dict(table.class_map),
            "n_cells": len(table),
            **(provenance or {}),
        },
    )


def _units(column: str) -> str:
    if column.startswith("density_"):
        return "cells / mm² of tissue"
    if column.startswith("share_"):
        return "fraction of the tile's typed cells"
    if column.endswith("_um"):
        return "µm"
    if column.startswith("count_"):
        return "cells per tile"
    return "index"

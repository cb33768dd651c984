"""A slide's cell table → one row of cell features per tile of its grid.

Columns (``<node>`` a node of the cell-type hierarchy with cells on the slide, ``all``
every typed cell): ``count_<node>``, ``density_<node>`` (cells / mm² of tissue),
``share_<node>`` (of ``count_all``), ``nn_<a>_to_<b>_um`` (mean distance from the tile's
``a`` cells to the nearest ``b`` cell, µm) and ``mixing_<immune>_<tumour>`` (Keren et al.
2018); see :mod:`cscvision.cells.features` for the definitions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cscvision.cells import features as f
from cscvision.cells.table import CellTable
from cscvision.cells.types import CellTypes, cell_types


@dataclass(frozen=True)
class CellFeatureSpec:
    """Which features: hierarchy ``nodes`` (None: every node with cells), distance pairs,
    the mixing pair and its radius."""

    nodes: tuple[str, ...] | None = None
    pairs: tuple[tuple[str, str], ...] = f.DEFAULT_PAIRS
    mixing: tuple[str, str] | None = f.DEFAULT_MIXING
    radius_um: float = f.DEFAULT_RADIUS_UM

    def __post_init__(self) -> None:
        if not self.radius_um > 0:
            raise ValueError(f"mixing radius must be positive (µm), got {self.radius_um}")


@dataclass(frozen=True)
class TileCellFeatures:
    """Feature columns (name → float64[N tiles]) in table order, and the nodes counted."""

    columns: dict[str, np.ndarray]
    nodes: tuple[str, ...]
    cells_in_tiles: int
    cells_outside: int


def present_nodes(table: CellTable, hierarchy: CellTypes) -> tuple[str, ...]:
    """Nodes (hierarchy order) holding at least one cell of the table."""
    held = {a for t, n in table.counts().items() if n for a in hierarchy.ancestors(t)}
    return tuple(n for n in hierarchy.names if n in held)


def tile_cell_features(
    table: CellTable,
    xy_l0: np.ndarray,
    tissue: np.ndarray,
    tile_l0: float,
    mpp: float,
    spec: CellFeatureSpec | None = None,
    hierarchy: CellTypes | None = None,
) -> TileCellFeatures:
    """Every feature of ``spec`` for the non-overlapping tiles at ``xy_l0`` (level-0 top-left
    corners, ``tile_l0`` wide, ``tissue`` fraction each) of a slide at ``mpp`` µm/px."""
    spec = spec or CellFeatureSpec()
    hierarchy = hierarchy or cell_types()
    nodes = spec.nodes if spec.nodes is not None else present_nodes(table, hierarchy)
    n_tiles = len(xy_l0)
    tile = f.cells_in_tiles(table.x, table.y, xy_l0, tile_l0)
    raw = f.type_counts(tile, table.codes, n_tiles, len(table.types))
    total = raw.sum(axis=1)
    member = hierarchy.membership(table.types, nodes)
    counts = f.roll_up(raw, member)
    area = f.tissue_mm2(tissue, tile_l0, mpp)
    dens, share = f.densities(counts, area), f.shares(counts, total)
    columns: dict[str, np.ndarray] = {
        "count_all": total.astype(np.float64),
        "density_all": f.densities(total[:, None], area)[:, 0],
    }
    for j, node in enumerate(nodes):
        columns[f"count_{node}"] = counts[:, j].astype(np.float64)
        columns[f"density_{node}"] = dens[:, j]
        columns[f"share_{node}"] = share[:, j]
    xy = np.column_stack([table.x, table.y])
    in_node = _node_masks(table, hierarchy)
    for a, b in spec.pairs:
        src, dst = in_node(a), in_node(b)
        if src.any() and dst.any():
            dist = f.nearest_um(xy[src], xy[dst], mpp)
            columns[f"nn_{a}_to_{b}_um"] = f.tile_mean(dist, tile[src], n_tiles)
    if spec.mixing is not None:
        immune, tumour = in_node(spec.mixing[0]), in_node(spec.mixing[1])
        if immune.any():
            columns[f"mixing_{spec.mixing[0]}_{spec.mixing[1]}"] = f.mixing_index(
                xy, tile, immune, tumour, n_tiles, radius_um=spec.radius_um, mpp=mpp
            )
    inside = int((tile >= 0).sum())
    return TileCellFeatures(columns, tuple(nodes), inside, len(table) - inside)


def _node_masks(table: CellTable, hierarchy: CellTypes):
    """``mask(node)``: bool[N] of the cells that count in ``node``."""

    def mask(node: str) -> np.ndarray:
        member = hierarchy.membership(table.types, [node])[:, 0]
        return member[table.codes] if len(table.types) else np.zeros(len(table), bool)

    return mask


def node_totals(table: CellTable, nodes: Sequence[str], hierarchy: CellTypes) -> dict[str, int]:
    """Cells of each node on the whole slide."""
    raw = np.bincount(table.codes, minlength=len(table.types))
    rolled = raw @ hierarchy.membership(table.types, nodes).astype(np.int64)
    return {n: int(c) for n, c in zip(nodes, rolled, strict=True)}

"""Per-tile cell features on a slide's tile grid: pure functions of arrays.

Units: coordinates are level-0 pixels; ``mpp`` is the slide's level-0 µm/px; distances
come out in µm and densities in cells per mm² of *tissue* (a tile's area times its tissue
fraction), so a tile half on glass is not half as dense.

* **counts / densities / shares** per node of the cell-type hierarchy (a node counts its
  own cells and all below it); a share is the node's cells over all typed cells of the tile.
* **nearest-neighbour distance** from each cell of type A to the nearest cell of type B
  anywhere on the slide (so a tile edge does not lengthen it), averaged over the A cells
  of each tile (µm; NaN where the tile has no A cell, or the slide no B cell).
* **mixing index** (Keren et al. 2018, *Cell* 174:1373, "mixing score"): in each tile,
  the number of immune–tumour neighbour pairs over the number of immune–immune pairs, a
  pair being two cells within ``radius_um`` of each other. Pairs are counted from the
  immune cells of the tile (an immune–immune pair across a tile edge counts half to each
  side). Near 0: immune cells keep to themselves (compartmentalised, "excluded"); high:
  immune cells mixed into tumour ("inflamed"). NaN where the tile has no immune–immune pair.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial import cKDTree

ALL = "all"
DEFAULT_PAIRS = (("lymphocyte", "tumour"), ("macrophage", "tumour"), ("inflammatory", "tumour"))
DEFAULT_MIXING = ("inflammatory", "tumour")
DEFAULT_RADIUS_UM = 20.0


def cells_in_tiles(x: np.ndarray, y: np.ndarray, xy_l0: np.ndarray, tile_l0: float) -> np.ndarray:
    """Index of the tile (row of ``xy_l0``, top-left corners of non-overlapping tiles
    ``tile_l0`` wide) holding each cell, int64[N]; -1 outside every tile. A tile holds
    ``[x0, x0 + ceil(tile_l0)) × [y0, y0 + ceil(tile_l0))`` (corners are whole pixels)."""
    xy_l0 = np.asarray(xy_l0).reshape(-1, 2)
    out = np.full(len(x), -1, np.int64)
    if not len(xy_l0) or not len(x):
        return out
    xs, col_of = np.unique(xy_l0[:, 0], return_inverse=True)
    ys, row_of = np.unique(xy_l0[:, 1], return_inverse=True)
    lookup = np.full((len(ys), len(xs)), -1, np.int64)
    lookup[row_of, col_of] = np.arange(len(xy_l0))
    col = np.searchsorted(xs, x, side="right") - 1
    row = np.searchsorted(ys, y, side="right") - 1
    ok = (col >= 0) & (row >= 0)
    # corners are rounded to whole pixels: a tile reaches to its (rounded-up) side, so no
    # cell falls in the gap of up to 1 px between rounded neighbours
    side = math.ceil(tile_l0 - 1e-9)
    ok[ok] &= (x[ok] < xs[col[ok]] + side) & (y[ok] < ys[row[ok]] + side)
    out[ok] = lookup[row[ok], col[ok]]
    return out


def type_counts(tile: np.ndarray, codes: np.ndarray, n_tiles: int, n_codes: int) -> np.ndarray:
    """Cells of each stored type per tile, int64[n_tiles, n_codes] (cells with tile -1 skipped)."""
    inside = tile >= 0
    flat = tile[inside] * n_codes + codes[inside].astype(np.int64)
    return np.bincount(flat, minlength=n_tiles * n_codes).reshape(n_tiles, n_codes)


def roll_up(counts: np.ndarray, membership: np.ndarray) -> np.ndarray:
    """Counts per hierarchy node: ``counts`` [T, codes] through ``membership`` [codes, nodes]."""
    return counts @ membership.astype(np.int64)


def tissue_mm2(tissue: np.ndarray, tile_l0: float, mpp: float) -> np.ndarray:
    """Tissue area of each tile in mm²: fraction × (tile side in µm / 1000)²."""
    side_mm = tile_l0 * mpp / 1000.0
    return np.asarray(tissue, np.float64) * side_mm * side_mm


def densities(counts: np.ndarray, area_mm2: np.ndarray) -> np.ndarray:
    """Cells per mm² of tissue, float64 like ``counts``; NaN where a tile has no tissue."""
    with np.errstate(invalid="ignore", divide="ignore"):
        out = counts / np.asarray(area_mm2, np.float64)[:, None]
    out[np.asarray(area_mm2) <= 0] = np.nan
    return out


def shares(counts: np.ndarray, total: np.ndarray) -> np.ndarray:
    """Each column of ``counts`` over ``total`` cells per tile; NaN where a tile has none."""
    with np.errstate(invalid="ignore", divide="ignore"):
        out = counts / np.asarray(total, np.float64)[:, None]
    out[np.asarray(total) == 0] = np.nan
    return out


def nearest_um(src: np.ndarray, dst: np.ndarray, mpp: float) -> np.ndarray:
    """Distance in µm from each point of ``src`` [n, 2] (level-0 px) to the nearest point
    of ``dst`` [m, 2]; inf when ``dst`` is empty."""
    if not len(dst):
        return np.full(len(src), np.inf)
    if not len(src):
        return np.zeros(0)
    dist, _ = cKDTree(dst).query(src, k=1, workers=1)
    return dist * mpp


def tile_mean(values: np.ndarray, tile: np.ndarray, n_tiles: int) -> np.ndarray:
    """Mean of finite ``values`` per tile (``tile`` index, -1 skipped); NaN where none."""
    ok = (tile >= 0) & np.isfinite(values)
    total = np.bincount(tile[ok], weights=values[ok], minlength=n_tiles)
    count = np.bincount(tile[ok], minlength=n_tiles)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = total / count
    out[count == 0] = np.nan
    return out


def mixing_index(
    xy: np.ndarray,
    tile: np.ndarray,
    immune: np.ndarray,
    tumour: np.ndarray,
    n_tiles: int,
    *,
    radius_um: float,
    mpp: float,
) -> np.ndarray:
    """Keren et al.'s mixing score per tile (module doc): immune–tumour pairs over
    immune–immune pairs within ``radius_um``. ``immune``, ``tumour``: bool[N] masks."""
    radius_px = radius_um / mpp
    own = immune & (tile >= 0)
    out = np.full(n_tiles, np.nan)
    if not own.any():
        return out
    points = xy[own]
    with_tumour = (
        cKDTree(xy[tumour]).query_ball_point(points, radius_px, return_length=True, workers=1)
        if tumour.any()
        else np.zeros(len(points))
    )
    with_immune = (
        cKDTree(xy[immune]).query_ball_point(points, radius_px, return_length=True, workers=1) - 1
    )  # not itself
    tiles = tile[own]
    it = np.bincount(tiles, weights=with_tumour, minlength=n_tiles)
    ii = np.bincount(tiles, weights=with_immune, minlength=n_tiles) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        out = it / ii
    out[ii == 0] = np.nan
    return out

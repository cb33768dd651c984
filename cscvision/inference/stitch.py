"""Stitched probability maps: tile predictions blended into per-target maps.

A map pixel is ``px_l0`` level-0 pixels wide; map pixel ``(col, row)`` covers level-0
``[x0 + col * px_l0, x0 + (col + 1) * px_l0)`` (and likewise in y). The map pixel is the
tile stride divided by a small whole number ``sub``, so every tile starts exactly on a map
pixel and covers ``foot_px`` ≈ ``tile_l0 / px_l0`` of them. Each tile adds its probabilities
weighted by a raised-cosine (Hann) window that is largest at the tile's centre and small,
never zero, at its edges; dividing by the summed weights gives maps without seams at tile
borders when tiles overlap. Map pixels no tile covers are NaN.

All functions are pure and work at map resolution: no level-0 array is ever made.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cscvision.core.geometry import MapTransform

# Finest subdivision of the stride tried when tiles overlap; finer maps cost memory
# (sub² map pixels per tile) and show nothing the tiles do not.
MAX_SUB = 6
MIN_FOOT_PX = 4  # with overlap, a tile spans at least this many map pixels


@dataclass(frozen=True)
class MapLayout:
    """Where tiles land on the map: ``sub`` map pixels per stride, ``foot_px`` per tile."""

    transform: MapTransform
    shape: tuple[int, int]  # (rows, cols) of the map
    sub: int
    foot_px: int


def choose_sub(overlap: float) -> int:
    """Map pixels per tile stride: 1 without overlap, else the smallest whole number that
    makes a tile span a near-whole number (≥ ``MIN_FOOT_PX``) of map pixels."""
    if overlap <= 0:
        return 1
    best, best_err = 1, float("inf")
    for sub in range(1, MAX_SUB + 1):
        foot = sub / (1 - overlap)
        if foot < MIN_FOOT_PX - 1e-9:
            continue
        err = abs(foot - round(foot)) / foot
        if err <= 0.02:
            return sub
        if err < best_err:
            best, best_err = sub, err
    return best


def map_layout(
    origin_l0: tuple[float, float],
    grid_shape: tuple[int, int],
    *,
    tile_l0: float,
    stride_l0: float,
    sub: int,
) -> MapLayout:
    """The map over a tile grid of ``grid_shape`` (rows, cols) whose cell (0, 0) is at
    ``origin_l0``."""
    foot = max(1, round(tile_l0 / stride_l0 * sub))
    rows, cols = grid_shape
    shape = ((rows - 1) * sub + foot, (cols - 1) * sub + foot)
    transform = MapTransform(float(origin_l0[0]), float(origin_l0[1]), stride_l0 / sub)
    return MapLayout(transform=transform, shape=shape, sub=sub, foot_px=foot)


def blend_window(foot_px: int) -> np.ndarray:
    """A 2-D Hann window sampled at pixel centres: positive everywhere, float64[f, f]."""
    u = (np.arange(foot_px) + 0.5) / foot_px
    w1 = np.sin(np.pi * u) ** 2
    return np.outer(w1, w1)


def stitch(cells: np.ndarray, probs: np.ndarray, layout: MapLayout) -> np.ndarray:
    """Blend tile probabilities ``probs`` float[N, T] at grid ``cells`` (col, row) int[N, 2]
    into maps float32[T, rows, cols]; NaN where no tile reaches."""
    n_targets = probs.shape[1]
    acc = np.zeros((n_targets, *layout.shape), np.float64)
    weight = np.zeros(layout.shape, np.float64)
    window = blend_window(layout.foot_px)
    rows = cells[:, 1] * layout.sub
    cols = cells[:, 0] * layout.sub
    values = probs.T.astype(np.float64)
    # Tiles sit on distinct cells, so within one window offset no two tiles share a pixel
    # and plain fancy-index addition is exact.
    for dy in range(layout.foot_px):
        for dx in range(layout.foot_px):
            w = window[dy, dx]
            acc[:, rows + dy, cols + dx] += w * values
            weight[rows + dy, cols + dx] += w
    with np.errstate(invalid="ignore", divide="ignore"):
        maps = acc / weight
    maps[:, weight == 0] = np.nan
    return maps.astype(np.float32)

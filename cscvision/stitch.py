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
from scipy import ndimage

# Finest subdivision of the stride tried when tiles overlap; finer maps cost memory
# (sub² map pixels per tile) and show nothing the tiles do not.
MAX_SUB = 6
MIN_FOOT_PX = 4  # with overlap, a tile spans at least this many map pixels


@dataclass(frozen=True)
class MapTransform:
    """Map pixel ``(col, row)`` → level-0 ``(x0 + col * px_l0, y0 + row * px_l0)``."""

    x0_l0: float
    y0_l0: float
    px_l0: float  # level-0 pixels per map pixel

    def to_l0(self, col: np.ndarray | float, row: np.ndarray | float) -> tuple:
        """Level-0 (x, y) of map pixel corners (fractional map coordinates allowed)."""
        return self.x0_l0 + np.asarray(col) * self.px_l0, self.y0_l0 + np.asarray(row) * self.px_l0

    def to_map(self, x_l0: np.ndarray | float, y_l0: np.ndarray | float) -> tuple:
        """Fractional map (col, row) of level-0 points; pixel centres sit at ``k + 0.5``."""
        col = (np.asarray(x_l0, dtype=np.float64) - self.x0_l0) / self.px_l0
        row = (np.asarray(y_l0, dtype=np.float64) - self.y0_l0) / self.px_l0
        return col, row

    def as_array(self) -> np.ndarray:
        return np.array([self.x0_l0, self.y0_l0, self.px_l0], dtype=np.float64)


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


def _edges(start: float, count: int, step: float) -> np.ndarray:
    return np.round(start + np.arange(count + 1) * step).astype(np.int64)


def _centres(start: float, count: int, step: float, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Mask index of each map pixel's centre, and whether that centre lies on the mask."""
    centre = np.floor(start + (np.arange(count) + 0.5) * step).astype(np.int64)
    return np.clip(centre, 0, limit - 1), (centre >= 0) & (centre < limit)


def area_fraction(
    mask: np.ndarray, mask_scale: float, transform: MapTransform, shape: tuple[int, int]
) -> np.ndarray:
    """Fraction of each map pixel that is True in ``mask`` (mask_px = l0_px * mask_scale),
    float32[rows, cols]. Map pixels smaller than a mask pixel take the one at their centre."""
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), np.int64)
    integral[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    step = transform.px_l0 * mask_scale
    x_start, y_start = transform.x0_l0 * mask_scale, transform.y0_l0 * mask_scale
    xe = _edges(x_start, shape[1], step)
    ye = _edges(y_start, shape[0], step)
    # Counts come from the edges clipped to the mask; areas from the unclipped ones, so
    # the part of a map pixel beyond the mask counts as glass.
    xc, yc = np.clip(xe, 0, w), np.clip(ye, 0, h)
    x0, x1 = xc[None, :-1], xc[None, 1:]
    y0, y1 = yc[:-1, None], yc[1:, None]
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = np.diff(ye)[:, None] * np.diff(xe)[None, :]
    fraction = inside / np.maximum(area, 1)
    small = area == 0  # after rounding, no whole mask pixel: sample the centre instead
    if small.any():
        cx, x_ok = _centres(x_start, shape[1], step, w)
        cy, y_ok = _centres(y_start, shape[0], step, h)
        sampled = mask[cy[:, None], cx[None, :]] & y_ok[:, None] & x_ok[None, :]
        fraction = np.where(small, sampled, fraction)
    return fraction.astype(np.float32)


def sample_map(
    maps: np.ndarray, transform: MapTransform, x_l0: np.ndarray, y_l0: np.ndarray
) -> np.ndarray:
    """Bilinear samples of ``maps`` [T, rows, cols] at level-0 points on a regular lattice
    (``x_l0`` [W], ``y_l0`` [H]) → float32[T, H, W]; NaN where no tile reaches.

    NaN-aware (normalised interpolation): pixels next to uncovered ones keep their value
    rather than fading towards zero.
    """
    col, row = transform.to_map(x_l0, y_l0)
    cc, rr = np.meshgrid(col - 0.5, row - 0.5)
    coords = np.stack([rr, cc])
    valid = np.isfinite(maps[0]).astype(np.float64)
    support = ndimage.map_coordinates(valid, coords, order=1, mode="constant", cval=0.0)
    out = np.full((maps.shape[0], len(y_l0), len(x_l0)), np.nan, np.float32)
    covered = support > 0.5
    for t in range(maps.shape[0]):
        filled = np.where(np.isfinite(maps[t]), maps[t], 0.0).astype(np.float64)
        value = ndimage.map_coordinates(filled, coords, order=1, mode="constant", cval=0.0)
        out[t][covered] = (value[covered] / support[covered]).astype(np.float32)
    return out

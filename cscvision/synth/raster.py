"""Polygons (level-0 pixels) to masks by an even-odd scanline fill, exact and window-invariant.

Pixel convention: output pixel (i, j) of a window at ``(x0, y0)`` with ``scale`` output
pixels per level-0 pixel covers level-0 ``[x0 + j / scale, x0 + (j + 1) / scale)``; it is
inside a polygon when its centre is (even-odd rule over all rings, so holes and islands
need no bookkeeping). Crossings are computed from absolute coordinates, so a pixel gets
the same value in every window that contains it, and adjacent windows join exactly.

Several polygon sets rasterise in one pass as bit planes: each set toggles its own bit at
its crossings and one XOR prefix along every row fills them all.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry


def _edges(geom: BaseGeometry) -> np.ndarray:
    """Non-horizontal ring edges as float64 [n, 4]: x1, y1, x2, y2."""
    out = []
    for poly in shapely.get_parts(geom):
        if poly.geom_type != "Polygon" or poly.is_empty:
            continue
        for ring in (poly.exterior, *poly.interiors):
            xy = np.asarray(ring.coords, np.float64)
            seg = np.concatenate([xy[:-1], xy[1:]], axis=1)
            out.append(seg[seg[:, 1] != seg[:, 3]])
    return np.concatenate(out) if out else np.zeros((0, 4))


class Rasteriser:
    """Bit planes from polygon sets: ``fill`` returns uint8, the OR of each set's bit."""

    def __init__(self, layers: Sequence[tuple[int, BaseGeometry]]) -> None:
        parts = [(bit, _edges(geom)) for bit, geom in layers if not geom.is_empty]
        edges = np.concatenate([e for _, e in parts] + [np.zeros((0, 4))])
        self.bit = np.concatenate(
            [np.full(len(e), bit, np.uint8) for bit, e in parts] + [np.zeros(0, np.uint8)]
        )
        self.x1, self.y1 = edges[:, 0], edges[:, 1]
        self.ymin = np.minimum(edges[:, 1], edges[:, 3])
        self.ymax = np.maximum(edges[:, 1], edges[:, 3])
        with np.errstate(divide="ignore", invalid="ignore"):
            self.slope = (edges[:, 2] - edges[:, 0]) / (edges[:, 3] - edges[:, 1])
        xs = np.concatenate([edges[:, 0], edges[:, 2]])
        self.bounds = (xs.min(), self.ymin.min(), xs.max(), self.ymax.max()) if len(edges) else None

    def __bool__(self) -> bool:
        return self.bounds is not None

    def fill(self, x0: float, y0: float, width: int, height: int, scale: float = 1.0) -> np.ndarray:
        """uint8 [height, width]: the OR of the bits of the sets each pixel centre is inside."""
        out = np.zeros((height, width + 1), np.uint8)
        px = 1.0 / scale
        sel = np.flatnonzero((self.ymax > y0) & (self.ymin < y0 + height * px))
        if len(sel):
            lo = np.clip(np.ceil((self.ymin[sel] - y0) / px - 0.5), 0, height).astype(np.int64)
            hi = np.clip(np.ceil((self.ymax[sel] - y0) / px - 0.5), 0, height).astype(np.int64)
            n = hi - lo
            edge = np.repeat(sel, n)
            row = np.repeat(lo - np.cumsum(n) + n, n) + np.arange(n.sum())
            yc = y0 + (row + 0.5) * px
            xc = self.x1[edge] + (yc - self.y1[edge]) * self.slope[edge]
            col = np.clip(np.ceil((xc - x0) / px - 0.5), 0, width).astype(np.int64)
            np.bitwise_xor.at(out.reshape(-1), row * (width + 1) + col, self.bit[edge])
            np.bitwise_xor.accumulate(out, axis=1, out=out)
        return out[:, :width]


class PreparedFill(Rasteriser):
    """One polygon set: ``fill`` returns a 0/1 uint8 mask."""

    def __init__(self, geom: BaseGeometry) -> None:
        super().__init__([(1, geom)])


def fill_exact(geom: BaseGeometry, shape: tuple[int, int], px_size: float) -> np.ndarray:
    """Boolean mask of ``shape`` (rows, cols) over the whole slide, ``px_size`` level-0 px each."""
    return PreparedFill(geom).fill(0, 0, shape[1], shape[0], 1.0 / px_size).astype(bool)

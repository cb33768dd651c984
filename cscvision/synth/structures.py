"""Lumens: blood vessels in stroma and gland lumens in bulk tumour.

Each kind lives on a coarse grid with at most one structure per cell, fully inside its
cell, so "is this nucleus inside a lumen?" needs only the nucleus's own cell.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cscvision.synth.morphology import IMMUNO, NICHE, STROMA, TUMOUR
from cscvision.synth.noise import hash_cells, uniforms

ClassAt = Callable[[np.ndarray, np.ndarray], np.ndarray]  # level-0 (x, y) -> render class


@dataclass(frozen=True)
class StructureKind:
    name: str
    stream: int
    cell_um: float
    keep: dict[int, float]  # render class at the centre -> probability
    radius_um: tuple[float, float]  # lumen semi-major axis
    aspect: tuple[float, float]
    wall_um: tuple[float, float]  # vessel wall / gland epithelium kept free of other nuclei


VESSEL = StructureKind(
    "vessel", 21, 150.0, {STROMA: 0.55, IMMUNO: 0.4, NICHE: 0.15, TUMOUR: 0.05},
    (5.0, 26.0), (1.0, 2.2), (2.5, 7.0),
)  # fmt: skip
GLAND = StructureKind("gland", 22, 95.0, {TUMOUR: 1.0}, (6.0, 19.0), (1.0, 1.8), (2.0, 3.0))


@dataclass(frozen=True)
class Structures:
    """Structures of one kind near a window: centres and ellipse parameters, level-0 px."""

    x: np.ndarray
    y: np.ndarray
    a: np.ndarray  # semi-major, px
    b: np.ndarray  # semi-minor, px
    theta: np.ndarray
    wall: np.ndarray  # px
    extra: np.ndarray  # a uniform for per-structure choices (RBC count, secretion)
    seed: np.ndarray  # a hash for drawing details


def _params(kind: StructureKind, seed: int, cx: np.ndarray, cy: np.ndarray, mpp: float):
    h = hash_cells(seed, kind.stream, cx, cy)
    u = uniforms(h, 8)
    cell = kind.cell_um / mpp
    x = (cx + 0.5 + 0.4 * (u[..., 0] - 0.5)) * cell
    y = (cy + 0.5 + 0.4 * (u[..., 1] - 0.5)) * cell
    a = (kind.radius_um[0] + (kind.radius_um[1] - kind.radius_um[0]) * u[..., 3] ** 1.5) / mpp
    b = a / (kind.aspect[0] + (kind.aspect[1] - kind.aspect[0]) * u[..., 4])
    theta = np.pi * u[..., 5]
    wall = (kind.wall_um[0] + (kind.wall_um[1] - kind.wall_um[0]) * u[..., 6]) / mpp
    return x, y, a, b, theta, wall, u[..., 2], u[..., 7], h


def _present(kind: StructureKind, keep_u: np.ndarray, cls: np.ndarray, scale: float) -> np.ndarray:
    prob = np.zeros(8, np.float64)
    for c, p in kind.keep.items():
        prob[c] = p
    return keep_u < prob[cls] * scale


def structures_near(
    kind: StructureKind,
    seed: int,
    window: tuple[int, int, int, int],
    class_at: ClassAt,
    mpp: float,
    keep_scale: float = 1.0,
) -> Structures:
    """Structures whose cells touch ``window`` (x0, y0, w, h); ``class_at(x, y)`` -> class."""
    x0, y0, w, h = window
    cell = kind.cell_um / mpp
    cxs = np.arange(int(np.floor(x0 / cell)) - 1, int(np.ceil((x0 + w) / cell)) + 1)
    cys = np.arange(int(np.floor(y0 / cell)) - 1, int(np.ceil((y0 + h) / cell)) + 1)
    cx, cy = (g.ravel() for g in np.meshgrid(cxs, cys))
    x, y, a, b, theta, wall, keep_u, extra, hs = _params(kind, seed, cx, cy, mpp)
    ok = _present(kind, keep_u, class_at(x, y), keep_scale)
    return Structures(x[ok], y[ok], a[ok], b[ok], theta[ok], wall[ok], extra[ok], hs[ok])


def inside_lumens(
    kind: StructureKind,
    seed: int,
    x: np.ndarray,
    y: np.ndarray,
    class_at: ClassAt,
    mpp: float,
    keep_scale: float = 1.0,
) -> np.ndarray:
    """Whether points (x, y) fall in a lumen or its wall (nuclei there are dropped)."""
    cell = kind.cell_um / mpp
    cx, cy = np.floor(x / cell).astype(np.int64), np.floor(y / cell).astype(np.int64)
    sx, sy, a, b, theta, wall, keep_u, _, _ = _params(kind, seed, cx, cy, mpp)
    ok = _present(kind, keep_u, class_at(sx, sy), keep_scale)
    r = _ellipse_r(x - sx, y - sy, a + wall, b + wall, theta)
    return ok & (r < 1.0)


def _ellipse_r(dx, dy, a, b, theta):
    cos, sin = np.cos(theta), np.sin(theta)
    u = dx * cos + dy * sin
    v = -dx * sin + dy * cos
    return np.sqrt((u / a) ** 2 + (v / b) ** 2)


def draw(
    kind: StructureKind,
    found: Structures,
    origin: tuple[int, int],
    od_h: np.ndarray,
    od_e: np.ndarray,
    nuclei: np.ndarray,
    mpp: float,
) -> None:
    """Draw lumens (and vessel walls, endothelium, red cells) into the canvases in place."""
    ox, oy = origin
    hgt, wid = od_h.shape
    for i in range(len(found.x)):
        a, b, wall = found.a[i], found.b[i], found.wall[i]
        reach = a + wall + 3
        x0, x1 = int(found.x[i] - reach) - ox, int(found.x[i] + reach) + 1 - ox
        y0, y1 = int(found.y[i] - reach) - oy, int(found.y[i] + reach) + 1 - oy
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, wid), min(y1, hgt)
        if cx0 >= cx1 or cy0 >= cy1:
            continue
        yy, xx = np.mgrid[cy0:cy1, cx0:cx1].astype(np.float32)
        dx, dy = xx + ox - found.x[i], yy + oy - found.y[i]
        r = _ellipse_r(dx, dy, a, b, found.theta[i])
        lumen = np.clip((1.0 - r) * b + 0.5, 0.0, 1.0)
        win = (slice(cy0, cy1), slice(cx0, cx1))
        rng = np.random.default_rng(int(found.seed[i] >> np.uint64(1)))
        if kind is VESSEL:
            _vessel(rng, dx, dy, r, lumen, found, i, od_h[win], od_e[win], nuclei[win], mpp)
        else:
            ring = np.clip(1.0 - np.abs(r - 1.0 - 0.5 * wall / b) * b / wall, 0, 1)
            od_e[win] += 0.12 * ring
            secretion = 0.03 + 0.15 * found.extra[i]
            od_e[win] += lumen * (secretion - od_e[win])
            od_h[win] *= 1.0 - lumen


def _vessel(rng, dx, dy, r, lumen, found, i, od_h, od_e, nuclei, mpp) -> None:
    a, b, wall, theta = found.a[i], found.b[i], found.wall[i], found.theta[i]
    wall_band = np.clip(1.0 - np.abs(r - 1.0 - 0.5 * wall / b) * 2 * b / wall, 0, 1)
    od_e += 0.35 * wall_band
    od_e += lumen * (0.04 - od_e)
    od_h *= 1.0 - lumen
    n_rbc = int(found.extra[i] * 0.5 * a * b / (3.5 / mpp) ** 2)
    rr = rng.uniform(0, 0.8, n_rbc) ** 0.5
    ang = rng.uniform(0, 2 * np.pi, n_rbc)
    cos, sin = np.cos(theta), np.sin(theta)
    for k in range(n_rbc):
        u, v = rr[k] * a * np.cos(ang[k]), rr[k] * b * np.sin(ang[k])
        d = np.sqrt((dx - (u * cos - v * sin)) ** 2 + (dy - (u * sin + v * cos)) ** 2)
        disc = np.clip(3.6 / mpp - d + 0.5, 0, 1) * (0.75 + 0.25 * np.clip(d * mpp / 2.5, 0, 1))
        np.maximum(od_e, 1.05 * disc, out=od_e)
    n_endo = max(3, int(2 * np.pi * np.sqrt((a * a + b * b) / 2) * mpp / 16))
    phase = rng.uniform(0, 2 * np.pi)
    for k in range(n_endo):
        t = phase + 2 * np.pi * k / n_endo + rng.uniform(-0.2, 0.2)
        u, v = 1.08 * a * np.cos(t), 1.08 * b * np.sin(t)
        px, py = u * cos - v * sin, u * sin + v * cos
        tx = -a * np.sin(t) * cos - b * np.cos(t) * sin
        ty = -a * np.sin(t) * sin + b * np.cos(t) * cos
        tang = np.arctan2(ty, tx)
        rn = _ellipse_r(dx - px, dy - py, 5.0 / mpp, 1.3 / mpp, tang)
        np.maximum(nuclei, 0.8 * np.clip((1.0 - rn) * 1.3 / mpp + 0.5, 0, 1), out=nuclei)

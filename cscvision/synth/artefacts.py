"""Artefacts for quality control: pen marks, tissue folds, air bubbles, out-of-focus patches.

Geometry is drawn once per slide (level-0 pixels) and recorded in the truth; the
renderer applies the effects: folds double the stain (double thickness), blur patches
re-render their window with a Gaussian blur, pen ink and bubble rims darken RGB.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
from shapely import ops
from shapely.geometry.base import BaseGeometry

PEN_INKS = {  # optical density per unit ink in R, G, B
    "green": (0.95, 0.22, 0.8),
    "blue": (0.9, 0.55, 0.08),
}


@dataclass(frozen=True)
class Artefacts:
    """Where each artefact is (level-0 polygons, possibly empty) and how strong."""

    pen: BaseGeometry
    pen_ink: str
    fold: BaseGeometry
    fold_gain: float  # extra stain in a fold, 1.0 = double thickness
    bubbles: tuple[tuple[float, float, float], ...]  # (x, y, radius) per bubble
    blur: BaseGeometry
    blur_px: float  # Gaussian sigma in the out-of-focus patch

    @property
    def bubble(self) -> BaseGeometry:
        discs = [shapely.Point(x, y).buffer(r, quad_segs=32) for x, y, r in self.bubbles]
        return shapely.union_all(discs) if discs else _empty()

    def named(self) -> dict[str, BaseGeometry]:
        """Non-empty artefacts by annotation class name."""
        out = {
            "Pen mark": self.pen,
            "Fold": self.fold,
            "Bubble": self.bubble,
            "Out of focus": self.blur,
        }
        return {k: v for k, v in out.items() if not v.is_empty}


def _empty() -> BaseGeometry:
    return shapely.MultiPolygon()


def _tissue_point(rng: np.random.Generator, tissue: BaseGeometry) -> tuple[float, float]:
    x0, y0, x1, y1 = tissue.bounds
    for _ in range(200):
        x, y = rng.uniform(x0, x1), rng.uniform(y0, y1)
        if shapely.contains_xy(tissue, x, y):
            return float(x), float(y)
    c = tissue.representative_point()
    return c.x, c.y


def _pen(rng: np.random.Generator, tissue: BaseGeometry, um: float, size_um: float):
    parts = sorted(shapely.get_parts(tissue), key=lambda p: -p.area)
    strokes = []
    for _ in range(int(rng.integers(1, 3))):
        offset = min(rng.uniform(120, 450), 0.05 * size_um) * um
        grown = shapely.get_parts(parts[0].buffer(offset))
        outline = max(grown, key=lambda g: g.area).exterior
        start = rng.uniform(0, 1)
        stop = min(start + rng.uniform(0.08, 0.25), 1.0)
        line = ops.substring(outline, start, stop, normalized=True)
        width = min(rng.uniform(35, 110), 0.02 * size_um) * um
        strokes.append(line.buffer(width / 2))
    return shapely.union_all(strokes)


def _fold(rng: np.random.Generator, tissue: BaseGeometry, um: float, size_um: float):
    cx, cy = _tissue_point(rng, tissue)
    theta = rng.uniform(0, np.pi)
    half = min(rng.uniform(400, 1500), 0.35 * size_um) * um
    t = np.linspace(-1, 1, 7)
    bend = rng.normal(0, 0.06, 7) * half
    xs = cx + t * half * np.cos(theta) - bend * np.sin(theta)
    ys = cy + t * half * np.sin(theta) + bend * np.cos(theta)
    width = min(rng.uniform(25, 90), 0.04 * size_um) * um
    band = shapely.LineString(np.c_[xs, ys]).buffer(width / 2, cap_style="flat")
    return shapely.intersection(band, tissue)


def _bubble(rng: np.random.Generator, tissue: BaseGeometry, um: float, size_um: float):
    cx, cy = _tissue_point(rng, tissue)
    radius = min(rng.uniform(80, 320), 0.12 * size_um) * um
    return (cx, cy, radius)


def _blur(rng: np.random.Generator, tissue: BaseGeometry, um: float, size_um: float):
    cx, cy = _tissue_point(rng, tissue)
    rx = min(rng.uniform(100, 350), 0.12 * size_um) * um
    ry = rx * rng.uniform(0.5, 1.0)
    ell = shapely.affinity.scale(shapely.Point(0, 0).buffer(1.0, quad_segs=16), rx, ry)
    ell = shapely.affinity.rotate(ell, rng.uniform(0, 180))
    return shapely.affinity.translate(ell, cx, cy)


def make_artefacts(
    rng: np.random.Generator,
    tissue: BaseGeometry,
    *,
    width_px: int,
    height_px: int,
    mpp: float,
    rate: float = 1.0,
) -> Artefacts:
    """Draw each artefact kind with its own probability (times ``rate``; 0 turns them off)."""
    um = 1.0 / mpp
    size_um = min(width_px, height_px) * mpp
    frame = shapely.box(0, 0, width_px, height_px)
    draws = rng.uniform(0, 1, 4)
    make = {
        "pen": (_pen, 0.5),
        "fold": (_fold, 0.35),
        "bubble": (_bubble, 0.3),
        "blur": (_blur, 0.4),
    }
    geoms = {}
    for (name, (fn, prob)), u in zip(make.items(), draws, strict=True):
        sub = np.random.default_rng(rng.integers(2**63))
        if u < prob * rate and not tissue.is_empty:
            made = fn(sub, tissue, um, size_um)
            geoms[name] = made if name == "bubble" else shapely.intersection(made, frame)
        else:
            geoms[name] = None if name == "bubble" else _empty()
    return Artefacts(
        pen=geoms["pen"],
        pen_ink=str(rng.choice(list(PEN_INKS))),
        fold=geoms["fold"],
        fold_gain=float(rng.uniform(0.7, 1.0)),
        bubbles=(geoms["bubble"],) if geoms["bubble"] else (),
        blur=geoms["blur"],
        blur_px=float(rng.uniform(2.5, 5.0)),
    )

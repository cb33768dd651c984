"""Paired IHC slides: a serial section of a synthetic H&E slide, restained haematoxylin + DAB.

Each IHC slide is rendered from the same ground truth as its H&E slide (same regions, same
vessels and glands) but with its own cells, its own stain profile and section-level damage
(a tear and a missing piece of tissue), then placed on its glass under a known random
transform: any rotation, a flip half of the time, a translation and a mild elastic warp.
DAB marks the marker's ground truth: membranous (a ring around each nucleus) in
stemness-rich regions for a CSC marker, nuclear in immunosuppressive regions for a
Treg marker, plus off-target specks and a faint diffuse background everywhere.

The true transform maps IHC level-0 pixels to H&E level-0 pixels::

    x_he = M @ (x_ihc, y_ihc, 1) + d(x_ihc, y_ihc)

with ``M`` a 2x3 matrix and ``d`` bilinear in a coarse displacement grid (H&E pixels), both
written to ``<ihc_id>_truth.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from scipy import ndimage, stats

from cscvision.core.io import atomic_path, write_json, write_png
from cscvision.synth.artefacts import _bubble, _fold
from cscvision.synth.layout import SlideLayout
from cscvision.synth.noise import periodic_noise, wrap_crop
from cscvision.synth.pyramid import PyramidSpec, write_pyramid
from cscvision.synth.raster import PreparedFill
from cscvision.synth.render import IMMUNO_BIT, STEM_BIT, SlideRenderer
from cscvision.synth.stain import HAEMATOXYLIN_OD, StainProfile

DAB_OD = (0.268, 0.570, 0.776)  # Ruifrok & Johnston 2001
# marker -> (region bit it marks, compartment)
MARKERS = {"CD44": (STEM_BIT, "membrane"), "FOXP3": (IMMUNO_BIT, "nucleus")}
WARP_GRID_PX = 512  # spacing of the elastic displacement grid, IHC level-0 px
SUB_PX = 512  # IHC windows are rendered in squares of this side


@dataclass(frozen=True)
class IhcOptions:
    """How far the IHC section departs from its H&E section. The defaults are the mild
    pairs of ``cscvision synth --ihc``; :data:`REALISTIC` is ``--ihc realistic``."""

    warp_um: tuple[float, float] = (4.0, 4.0)  # sd of the elastic displacement, drawn per pair
    warp_smooth: float = 1.0  # smoothing of the displacement grid, in grid nodes (256 µm)
    scale: float = 0.0  # the section's scale differs by up to ± this share
    mpp: float | None = None  # IHC level-0 µm/px (None: the H&E's)
    glass_rgb: tuple[int, int, int] | None = None  # glass colour (None: near white)
    background_positive: tuple[float, float] = (0.0, 0.0)  # share of unmarked cells stained
    artefacts: bool = False  # a fold and an air bubble on the IHC section
    missing_pieces: int = 1  # pieces of tissue lost at the edge (besides the tear)


REALISTIC = IhcOptions(
    warp_um=(20.0, 40.0),
    warp_smooth=5.0,
    scale=0.03,
    mpp=0.2527,
    glass_rgb=(240, 238, 244),
    background_positive=(0.10, 0.20),
    artefacts=True,
    missing_pieces=2,
)


@dataclass(frozen=True)
class PairTransform:
    """IHC level-0 px -> H&E level-0 px: an affine part and a bilinear displacement grid."""

    matrix: np.ndarray  # float64[2, 3]
    grid_px: float  # spacing of the displacement grid (IHC px)
    displacement: np.ndarray  # float32[2, rows, cols]: (dx, dy) in H&E px at grid nodes
    angle_deg: float
    flip: bool

    def __call__(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        m = self.matrix
        gx, gy = x / self.grid_px, y / self.grid_px
        dx = ndimage.map_coordinates(self.displacement[0], [gy, gx], order=1, mode="nearest")
        dy = ndimage.map_coordinates(self.displacement[1], [gy, gx], order=1, mode="nearest")
        return m[0, 0] * x + m[0, 1] * y + m[0, 2] + dx, m[1, 0] * x + m[1, 1] * y + m[1, 2] + dy

    def as_dict(self, mpp: float) -> dict:
        return {
            "direction": "ihc level-0 px -> he level-0 px: x_he = M @ [x, y, 1] + d(x, y)",
            "matrix": self.matrix.tolist(),
            "angle_deg": self.angle_deg,
            "flip": self.flip,
            "grid_px": self.grid_px,
            "displacement_px": np.round(self.displacement, 3).tolist(),
            "mpp": mpp,
        }


def random_transform(
    rng: np.random.Generator,
    he_size: tuple[int, int],
    mpp: float,
    warp_um: float = 4.0,
    *,
    ihc_mpp: float | None = None,
    scale: float = 0.0,
    warp_smooth: float = 1.0,
) -> tuple[PairTransform, tuple[int, int]]:
    """A random placement of the section and the IHC canvas (w, h) that holds all of it.

    ``ihc_mpp`` other than ``mpp`` makes the IHC another scanner's (its px -> H&E px carries
    the ratio); ``scale`` > 0 draws a section scale in 1 ± scale."""
    w, h = he_size
    angle = float(rng.uniform(0, 360))
    flip = bool(rng.uniform() < 0.5)
    a = np.deg2rad(angle)
    side = abs(np.cos(a)) + abs(np.sin(a))
    ratio = (ihc_mpp or mpp) / mpp  # H&E px per IHC px
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    if flip:
        rot = rot @ np.diag([-1.0, 1.0])
    shift = rng.uniform(-0.05, 0.05, 2) * np.array([w, h])
    grid_px = WARP_GRID_PX * mpp / (ihc_mpp or mpp)  # 256 µm at 0.5 µm/px, any scanner
    s = 1.0
    if ratio != 1.0 or scale:
        s = ratio * (1.0 + (rng.uniform(-scale, scale) if scale else 0.0))
        rot, shift = rot * s, shift / s
    n = int(np.ceil(side * max(w, h) / s))
    ihc_w = ihc_h = n
    # IHC centre (plus shift) goes to the H&E centre
    centre_ihc = np.array([ihc_w, ihc_h]) / 2 + shift
    offset = np.array([w, h]) / 2 - rot @ centre_ihc
    matrix = np.hstack([rot, offset[:, None]])
    rows, cols = int(ihc_h // grid_px) + 2, int(ihc_w // grid_px) + 2
    disp = rng.normal(0, 1, (2, rows, cols))
    disp = ndimage.gaussian_filter(disp, (0, warp_smooth, warp_smooth), mode="nearest")
    disp *= warp_um / mpp / (disp.std() + 1e-9)
    return PairTransform(matrix, float(grid_px), disp.astype(np.float32), angle, flip), (
        ihc_w,
        ihc_h,
    )


def damaged_layout(
    rng: np.random.Generator, layout: SlideLayout, options: IhcOptions | None = None
) -> tuple[SlideLayout, float]:
    """The serial section: a tear across the tissue and missing pieces at its edge; with
    ``options.artefacts`` a fold and an air bubble of its own, else no artefacts.

    Returns the new layout and the area lost (H&E level-0 px²)."""
    options = options or IhcOptions()
    tissue = layout.tissue
    x0, y0, x1, y1 = tissue.bounds
    um = 1.0 / layout.mpp
    t = np.linspace(0, 1, 6)
    ys = y0 + (y1 - y0) * (0.3 + 0.4 * rng.uniform()) + rng.normal(0, 0.05, 6) * (y1 - y0)
    line = shapely.LineString(np.stack([x0 + (x1 - x0) * (0.2 + 0.5 * t), ys], axis=1))
    lost = line.buffer(rng.uniform(6, 15) * um)
    edge = shapely.get_coordinates(tissue.exterior if hasattr(tissue, "exterior") else tissue)
    for _ in range(options.missing_pieces):
        cx, cy = edge[rng.integers(len(edge))] if len(edge) else (x0, y0)
        radius = 0.08 * min(x1 - x0, y1 - y0)
        lost = shapely.union(lost, shapely.Point(cx, cy).buffer(radius))
    kept = shapely.difference(tissue, lost)
    empty = shapely.MultiPolygon()
    fold, bubbles = empty, ()
    if options.artefacts:
        size_um = min(layout.width_px, layout.height_px) * layout.mpp
        fold = _fold(np.random.default_rng(rng.integers(2**63)), kept, um, size_um)
        bubbles = (_bubble(np.random.default_rng(rng.integers(2**63)), kept, um, size_um),)
    artefacts = dataclasses.replace(
        layout.artefacts, pen=empty, fold=fold, bubbles=bubbles, blur=empty, fold_gain=0.8
    )
    return dataclasses.replace(layout, tissue=kept, artefacts=artefacts), tissue.area - kept.area


def ihc_stain(
    rng: np.random.Generator, base: StainProfile, glass_rgb: tuple[int, int, int] | None = None
) -> StainProfile:
    """The IHC section's own profile: haematoxylin counterstain; ``eosin`` holds DAB."""

    def jitter(v, sigma):
        out = np.clip(np.asarray(v) + rng.normal(0, sigma, 3), 0.02, None)
        return tuple(float(x) for x in out / np.linalg.norm(out))

    stain = dataclasses.replace(
        base,
        haematoxylin=jitter(HAEMATOXYLIN_OD, 0.06),
        eosin=jitter(DAB_OD, 0.05),
        h_strength=float(np.exp(rng.normal(-0.2, 0.15))),
        e_strength=float(np.exp(rng.normal(0.0, 0.15))),
        glass_od=tuple(float(g) for g in rng.uniform(0.01, 0.02) + rng.uniform(0, 0.004, 3)),
    )
    if glass_rgb is None:
        return stain
    # glass_od such that empty glass renders as glass_rgb through the profile's gain and gamma
    rgb = np.asarray(glass_rgb, np.float64) / 255.0
    od = -np.log(np.clip(rgb ** (1.0 / stain.gamma) / np.asarray(stain.gain), 1e-3, 1.0))
    return dataclasses.replace(stain, glass_od=tuple(float(g) for g in np.clip(od, 0, None)))


class IhcRenderer:
    """Pixels of the IHC slide in its own frame: H&E-frame ODs resampled through the transform."""

    def __init__(
        self,
        renderer: SlideRenderer,
        transform: PairTransform,
        marker: str,
        stain: StainProfile,
        seed: int,
        background_positive: float = 0.0,
    ):
        if marker not in MARKERS:
            raise ValueError(f"synthetic marker {marker!r} is not one of {sorted(MARKERS)}")
        self.renderer, self.transform, self.stain = renderer, transform, stain
        self.bit, self.compartment = MARKERS[marker]
        rng = np.random.default_rng([seed, 11])
        self.patchy = periodic_noise(rng, 512, sigma_px=6 / renderer.mpp)
        self.specks = periodic_noise(rng, 512, sigma_px=1.5 / renderer.mpp)
        # stained cells outside the marked regions: blobs of about one cell covering
        # ``background_positive`` of the tissue (a standard normal field above its quantile)
        self.cells = periodic_noise(rng, 512, sigma_px=3 / renderer.mpp)
        cut = stats.norm.ppf(1 - background_positive) if background_positive else None
        self.cells_cut = None if cut is None else float(cut)
        art = renderer.layout.artefacts
        self.fold = PreparedFill(art.fold) if not art.fold.is_empty else None
        self.bubbles = art.bubbles
        self.h_vec = np.asarray(stain.haematoxylin) * stain.h_strength
        self.d_vec = np.asarray(stain.eosin) * stain.e_strength
        self.e_vec = np.array([0.072, 0.990, 0.105]) * 0.12  # a faint eosin-like tint

    def render(self, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        out = np.empty((height, width, 3), np.uint8)
        for sy in range(0, height, SUB_PX):
            for sx in range(0, width, SUB_PX):
                w, h = min(SUB_PX, width - sx), min(SUB_PX, height - sy)
                out[sy : sy + h, sx : sx + w] = self._render_sub(x0 + sx, y0 + sy, w, h)
        return out

    def _render_sub(self, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        yy, xx = np.mgrid[y0 : y0 + height, x0 : x0 + width].astype(np.float64)
        hx, hy = self.transform(xx + 0.5, yy + 0.5)
        hx -= 0.5
        hy -= 0.5
        left, top = int(np.floor(hx.min())) - 2, int(np.floor(hy.min())) - 2
        right, bottom = int(np.ceil(hx.max())) + 3, int(np.ceil(hy.max())) + 3
        r = self.renderer
        if right <= 0 or bottom <= 0 or left >= r.layout.width_px or top >= r.layout.height_px:
            return self._to_rgb(*(np.zeros((height, width), np.float32),) * 3)
        od_h, od_e, nuclei = r.render_od(left, top, right - left, bottom - top)
        dab = self._dab(r.bits(left, top, right - left, bottom - top), nuclei, left, top)
        od_h *= 1.0 - np.clip(dab * 1.5, 0, 0.7)
        self._artefacts(left, top, od_h, od_e, dab)
        coords = [hy - top, hx - left]
        sample = [
            ndimage.map_coordinates(a, coords, order=1, mode="constant").astype(np.float32)
            for a in (od_h, od_e, dab)
        ]
        return self._to_rgb(*sample)

    def _dab(self, bits: np.ndarray, nuclei: np.ndarray, left: int, top: int) -> np.ndarray:
        h, w = bits.shape
        tissue = (bits & 1) > 0
        marked = (bits & self.bit) > 0
        nucleus = nuclei > 0.15
        if self.compartment == "membrane":
            reach = max(3, round(2.0 / self.renderer.mpp))
            ring = ndimage.maximum_filter(nucleus, size=reach) & ~nucleus
            site = ndimage.gaussian_filter(ring.astype(np.float32), 0.6) * 1.4
        else:
            site = np.clip(nuclei * 1.6, 0, 1)
        patchy = wrap_crop(self.patchy, left, top, w, h)
        if self.cells_cut is not None and self.compartment == "membrane":
            marked = marked | (tissue & (wrap_crop(self.cells, left, top, w, h) > self.cells_cut))
        strength = np.where(marked, 0.7 + 0.25 * np.tanh(patchy), 0.0)
        specks = np.clip(wrap_crop(self.specks, left, top, w, h) - 2.2, 0, None) * 0.6
        return (site * strength + (specks + 0.02) * tissue).astype(np.float32)

    def _artefacts(self, left: int, top: int, *ods: np.ndarray) -> None:
        """A fold doubles the section (all stains); an air bubble pales what is under it and
        darkens its rim. In place, in the H&E frame."""
        h, w = ods[0].shape
        gain = np.ones((h, w), np.float32)
        if self.fold is not None:
            gain += 0.8 * self.fold.fill(left, top, w, h).astype(np.float32)
        rim = 3.0 / self.renderer.mpp
        for bx, by, radius in self.bubbles:
            yy, xx = np.ogrid[top : top + h, left : left + w]
            d = np.sqrt((xx - bx) ** 2 + (yy - by) ** 2).astype(np.float32)
            gain *= np.where(d < radius, 0.55, 1.0) + 1.5 * np.exp(-(((d - radius) / rim) ** 2))
        for od in ods:
            od *= gain

    def _to_rgb(self, od_h: np.ndarray, od_e: np.ndarray, dab: np.ndarray) -> np.ndarray:
        s = self.stain
        od = (
            od_h[..., None] * self.h_vec
            + (od_e[..., None] * self.e_vec)
            + dab[..., None] * self.d_vec
            + np.asarray(s.glass_od)
        )
        transmission = np.clip(np.exp(-od) * np.asarray(s.gain), 0, 1)
        return np.clip(np.rint(255.0 * transmission**s.gamma), 0, 255).astype(np.uint8)


def write_ihc_slide(
    path: Path,
    *,
    he_id: str,
    layout: SlideLayout,
    he_renderer: SlideRenderer,
    marker: str,
    seed: int,
    lab: StainProfile,
    tile_px: int = 256,
    quality: int = 85,
    options: IhcOptions | None = None,
) -> dict:
    """Write one IHC slide of ``marker`` beside its H&E slide, its truth record
    ``<id>_truth.json`` and its point map ``<id>_pointmap.npz`` (see
    :mod:`cscvision.synth.ihc_truth`); return the record."""
    from cscvision.synth.ihc_truth import write_point_map

    o = options or IhcOptions()
    rng = np.random.default_rng([seed, 40])
    transform, (ihc_w, ihc_h) = random_transform(
        rng, (layout.width_px, layout.height_px), layout.mpp, warp_um=float(rng.uniform(*o.warp_um))
        if o.warp_um[0] != o.warp_um[1] else o.warp_um[0], ihc_mpp=o.mpp, scale=o.scale,
        warp_smooth=o.warp_smooth,
    )  # fmt: skip
    section, lost_px2 = damaged_layout(rng, layout, o)
    stain = ihc_stain(rng, lab, o.glass_rgb)
    background = float(rng.uniform(*o.background_positive)) if o.background_positive[1] else 0.0
    cells = SlideRenderer(section, stain, seed=seed, structure_seed=he_renderer.seed)
    cells.gland_rate = he_renderer.gland_rate
    ihc = IhcRenderer(cells, transform, marker, stain, seed, background_positive=background)
    ihc_mpp = o.mpp or layout.mpp
    spec = PyramidSpec(ihc_w, ihc_h, ihc_mpp, tile_px=tile_px, quality=quality)
    description = f"cscvision synthetic IHC {marker} of {he_id}; seed {seed}"
    with atomic_path(path) as tmp:
        levels = write_pyramid(tmp, spec, ihc.render, description=description)
    slide_id = path.stem
    write_png(path.with_name(f"{slide_id}_thumb.png"), levels[min(1, len(levels) - 1)])
    record = {
        "slide_id": slide_id,
        "he_slide_id": he_id,
        "marker": marker,
        "marks": {STEM_BIT: "Stemness-rich", IMMUNO_BIT: "Immunosuppressive"}[MARKERS[marker][0]],
        "compartment": MARKERS[marker][1],
        "seed": seed,
        "width_px": ihc_w,
        "height_px": ihc_h,
        "mpp": ihc_mpp,
        "he_mpp": layout.mpp,
        "tissue_lost_um2": round(lost_px2 * layout.mpp**2, 1),
        "background_positive": round(background, 4),
        "options": dataclasses.asdict(o),
        "transform": transform.as_dict(layout.mpp),
        "stain": {**stain.as_dict(), "dab_od": stain.as_dict()["eosin_od"]},
    }
    write_json(path.with_name(f"{slide_id}_truth.json"), record)
    write_point_map(path.with_name(f"{slide_id}_pointmap.npz"), layout, section, transform,
                    ihc_mpp, (ihc_w, ihc_h))  # fmt: skip
    return record


def read_pair_transform(record: dict) -> PairTransform:
    """The true transform from an IHC truth record (see :func:`write_ihc_slide`)."""
    t = record["transform"]
    return PairTransform(
        np.asarray(t["matrix"], np.float64),
        float(t["grid_px"]),
        np.asarray(t["displacement_px"], np.float32),
        float(t["angle_deg"]),
        bool(t["flip"]),
    )

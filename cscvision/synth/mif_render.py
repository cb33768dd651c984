"""Pixels of a synthetic multiplex immunofluorescence (mIF) image of the H&E section.

Every pixel of the mIF frame is mapped through the true transform onto the H&E frame and
given to its nearest true cell (a Voronoi partition, cut off at the cell's radius): DAPI
fills the nucleus disc, a membrane marker a band inside the cell's edge (its radius, or
half-way to its neighbour), a nuclear marker the nucleus, a cytoplasmic one the body less
the nucleus. Then what a real scan adds, in order: tissue autofluorescence (strongest at
short wavelengths), the optical blur, spillover into the neighbouring channels of the
spectrum, uneven illumination (each field of view darker at its edges), photon and read
noise, and the camera's offset; written as uint16 counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from cscvision.synth.noise import periodic_noise, wrap_crop

WINDOW_PX = 1024
PAD_PX = 6
GAIN = 4000.0  # counts per unit of signal
OFFSET = 200.0  # camera offset, counts
PHOTONS = 500.0  # photons per unit of signal (Poisson noise)
READ_NOISE = 0.006  # sd of the read noise, units of signal
FOV_UM = 500.0  # side of one field of view of the stitched scan
VIGNETTE = 0.35  # signal lost at a field's corners


@dataclass(frozen=True)
class MifCells:
    """The true cells in the H&E frame (level-0 px) with what each shows per channel."""

    x: np.ndarray  # float64[N]
    y: np.ndarray
    nucleus_px: np.ndarray  # float64[N] nuclear radius
    body_px: np.ndarray  # float64[N] cell radius
    signal: np.ndarray  # float32[N, C]: brightness of each channel in the cell (0: none)


@dataclass(frozen=True)
class Optics:
    """Channel-wise properties of the scan (index = channel)."""

    compartments: tuple[str, ...]  # "nucleus", "membrane" or "cytoplasm" per channel
    autofluorescence: np.ndarray  # float32[C]: tissue autofluorescence per channel
    spillover: float  # share of a channel seen in each spectral neighbour
    blur_px: float


class MifRenderer:
    """Render windows of the mIF image (its own frame) as float signal or uint16 counts."""

    def __init__(self, cells: MifCells, optics: Optics, to_he, class_at, *, mpp: float,
                 seed: int) -> None:  # fmt: skip
        self.cells, self.optics, self.to_he, self.class_at = cells, optics, to_he, class_at
        self.mpp, self.seed = mpp, seed
        self.tree = cKDTree(np.column_stack([cells.x, cells.y])) if len(cells.x) else None
        self.reach = float(cells.body_px.max()) + 2 if len(cells.x) else 0.0
        rng = np.random.default_rng([seed, 61])
        self.af = periodic_noise(rng, 512, sigma_px=12 / mpp)
        self.texture = periodic_noise(rng, 256, sigma_px=0.5 / mpp)
        self.fov_px = FOV_UM / mpp

    def render(self, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        """uint16 [C, height, width] counts of the window at (x0, y0), mIF level-0 px."""
        signal = self.signal(x0, y0, width, height)
        rng = np.random.default_rng([self.seed, 62, x0, y0])
        counts = rng.poisson(np.clip(signal, 0, None) * PHOTONS) / PHOTONS
        counts += rng.normal(0, READ_NOISE, counts.shape)
        return np.clip(np.rint(counts * GAIN + OFFSET), 0, 65535).astype(np.uint16)

    def signal(self, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        """float32 [C, height, width] noise-free signal (blur, spillover, illumination)."""
        p = PAD_PX
        raw = self._sites(x0 - p, y0 - p, width + 2 * p, height + 2 * p)
        o = self.optics
        raw = ndimage.gaussian_filter(raw, (0, o.blur_px, o.blur_px))[:, p:-p, p:-p]
        mixed = raw.copy()
        mixed[1:] += o.spillover * raw[:-1]
        mixed[:-1] += o.spillover * raw[1:]
        return mixed * self._illumination(x0, y0, width, height)[None]

    def _illumination(self, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        u = ((np.arange(x0, x0 + width) + 0.5) % self.fov_px) / self.fov_px - 0.5
        v = ((np.arange(y0, y0 + height) + 0.5) % self.fov_px) / self.fov_px - 0.5
        return (1.0 - VIGNETTE * 2 * (v[:, None] ** 2 + u[None, :] ** 2)).astype(np.float32)

    def _sites(self, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        c = self.cells
        n_ch = c.signal.shape[1]
        yy, xx = np.mgrid[y0 : y0 + height, x0 : x0 + width].astype(np.float64)
        hx, hy = self.to_he(xx.ravel() + 0.5, yy.ravel() + 0.5)
        tissue = (self.class_at(hx, hy) > 0).reshape(height, width).astype(np.float32)
        af = tissue * (1.0 + 0.35 * wrap_crop(self.af, x0, y0, width, height))
        out = self.optics.autofluorescence[:, None, None] * np.clip(af, 0, None)[None]
        if self.tree is None:
            return out.astype(np.float32)
        d, idx = self.tree.query(np.column_stack([hx, hy]), k=2, distance_upper_bound=self.reach)
        near = np.isfinite(d[:, 0])
        i1 = np.where(near, idx[:, 0], 0)
        d1 = np.where(near, d[:, 0], 1e9)
        d2 = np.where(np.isfinite(d[:, 1]), d[:, 1], 2e9)
        r, body = c.nucleus_px[i1], c.body_px[i1]
        nucleus = np.clip(r - d1 + 0.5, 0, 1) * near
        inside = near & (d1 <= body)
        band = max(1.0, 1.2 / self.mpp)
        membrane = inside & (d1 > r) & ((body - d1 < band) | ((d2 - d1) / 2 < band))
        cyto = inside & (d1 > r)
        tex = 1.0 + 0.25 * wrap_crop(self.texture, x0, y0, width, height).ravel()
        sites = {"nucleus": nucleus * tex, "membrane": membrane * 1.0, "cytoplasm": cyto * 1.0}
        for k in range(n_ch):
            site = sites[self.optics.compartments[k]]
            out[k] += (site * c.signal[i1, k]).reshape(height, width)
        return out.astype(np.float32)

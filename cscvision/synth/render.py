"""Render any window of a synthetic slide at level 0, the same pixels whatever the window.

Pipeline per window: truth bits from the polygons -> render class per pixel ->
haematoxylin/eosin optical densities of the background (periodic fibre and granular
textures read at absolute coordinates) -> lumens -> cells stamped from sprite banks ->
folds -> Beer–Lambert through the slide's stain lookup table -> blur patches, pen ink and
bubble rims. Every random choice is keyed to absolute coordinates, so adjacent windows
join without seams and the slide never exists whole in memory.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from cscvision.synth.artefacts import PEN_INKS
from cscvision.synth.layout import IMMUNO, NECROSIS, STEMNESS, TUMOR, SlideLayout
from cscvision.synth.morphology import (
    GLASS,
    N_RENDER_CLASSES,
    NICHE,
    POPULATIONS,
    STEM,
    STROMA,
    TUMOUR,
    Population,
    sprite_banks,
)
from cscvision.synth.morphology import IMMUNO as R_IMMUNO
from cscvision.synth.morphology import NECROSIS as R_NECROSIS
from cscvision.synth.noise import hash_cells, periodic_noise, uniforms, wrap_crop
from cscvision.synth.raster import PreparedFill, Rasteriser
from cscvision.synth.stain import StainProfile, od_lut, od_to_rgb
from cscvision.synth.structures import GLAND, VESSEL, draw, inside_lumens, structures_near

# Truth bits (also the label mask encoding, see cscvision.synth).
TISSUE_BIT, TUMOR_BIT, NECROSIS_BIT, STEM_BIT, IMMUNO_BIT = (1, 2, 4, 8, 16)
REGION_BITS = {TUMOR: TUMOR_BIT, NECROSIS: NECROSIS_BIT, STEMNESS: STEM_BIT, IMMUNO: IMMUNO_BIT}
BANK_PX = 1024  # period of the background textures, level-0 px
COARSE_PX = 8  # level-0 pixels per cell of the class raster used to place cells

# Background optical densities per render class:
# glass, stroma, tumour, stem, immuno, niche, necrosis.
_E_BASE = np.array([0.0, 0.52, 0.38, 0.32, 0.42, 0.36, 0.70], np.float32)
_E_FIBRE = np.array([0.0, 0.4, 0.0, 0.0, 0.35, 0.15, 0.0], np.float32)
_E_GRAIN = np.array([0.0, 0.05, 0.16, 0.14, 0.08, 0.1, 0.18], np.float32)
_E_CLOUD = np.array([0.0, 0.08, 0.08, 0.05, 0.06, 0.05, 0.16], np.float32)
_H_BASE = np.array([0.0, 0.04, 0.12, 0.12, 0.06, 0.10, 0.10], np.float32)
_H_GRAIN = np.array([0.0, 0.01, 0.04, 0.05, 0.02, 0.04, 0.05], np.float32)
_H_CLOUD = np.array([0.0, 0.0, 0.01, 0.01, 0.0, 0.01, 0.03], np.float32)


def _bits_to_class() -> np.ndarray:
    """Render class for every combination of the five region bits."""
    lut = np.full(32, GLASS, np.uint8)
    for bits in range(32):
        if not bits & TISSUE_BIT:
            continue
        stem, immuno = bits & STEM_BIT, bits & IMMUNO_BIT
        if bits & NECROSIS_BIT:
            lut[bits] = R_NECROSIS
        elif stem and immuno:
            lut[bits] = NICHE
        elif stem:
            lut[bits] = STEM
        elif immuno:
            lut[bits] = R_IMMUNO
        elif bits & TUMOR_BIT:
            lut[bits] = TUMOUR
        else:
            lut[bits] = STROMA
    return lut


BITS_TO_CLASS = _bits_to_class()


def fibre_bank(rng: np.random.Generator, size_px: int, mpp: float, blur_px: float) -> np.ndarray:
    """Periodic collagen texture: wavy fibres, one main direction per bundle, pale clefts."""
    angles = rng.uniform(0, np.pi) + np.arange(3) * np.pi / 3
    streaks = np.stack(
        [periodic_noise(rng, size_px, sigma_px=(20 / mpp, 0.8 / mpp), angle_rad=a) for a in angles]
    )
    weights = np.exp(
        6.0 * np.stack([periodic_noise(rng, size_px, sigma_px=40 / mpp) for _ in angles])
    )
    fib = (weights * streaks).sum(axis=0) / weights.sum(axis=0)
    fib = _warp(rng, fib, amp_px=4 / mpp, scale_px=18 / mpp)
    fib /= fib.std() + 1e-6
    bundles = periodic_noise(rng, size_px, sigma_px=6 / mpp)
    shaped = np.tanh(fib) - 1.5 * np.clip(-fib - 1.3, 0, None) + 0.4 * bundles
    return ndimage.gaussian_filter(shaped, blur_px, mode="wrap").astype(np.float32)


def _warp(
    rng: np.random.Generator, tex: np.ndarray, *, amp_px: float, scale_px: float
) -> np.ndarray:
    """Bend a periodic texture by a smooth periodic displacement."""
    n = tex.shape[0]
    shift = [periodic_noise(rng, n, sigma_px=scale_px) * amp_px for _ in range(2)]
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    return ndimage.map_coordinates(tex, [yy + shift[0], xx + shift[1]], order=1, mode="grid-wrap")


def background_banks(
    rng: np.random.Generator, mpp: float, stain: StainProfile
) -> tuple[np.ndarray, np.ndarray]:
    """Eosin and haematoxylin background OD per render class, periodic: float32 [7, n*n]."""
    n = BANK_PX
    fib = fibre_bank(rng, n, mpp, stain.blur_px)
    grain = periodic_noise(rng, n, sigma_px=max(stain.blur_px, 0.8 / mpp))
    cloud = periodic_noise(rng, n, sigma_px=8 / mpp)
    noise = [periodic_noise(rng, n, sigma_px=0.6) * np.float32(stain.noise_od) for _ in range(2)]
    bank_e = np.empty((N_RENDER_CLASSES, n, n), np.float32)
    bank_h = np.empty((N_RENDER_CLASSES, n, n), np.float32)
    for c in range(N_RENDER_CLASSES):
        e = _E_BASE[c] * (1 + _E_FIBRE[c] * fib + _E_GRAIN[c] * grain + _E_CLOUD[c] * cloud)
        bank_e[c] = np.clip(e, 0, None) + noise[0]
        bank_h[c] = _H_BASE[c] + _H_GRAIN[c] * grain + _H_CLOUD[c] * cloud + noise[1]
    return bank_e.reshape(-1), bank_h.reshape(-1)


class SlideRenderer:
    """Everything needed to draw a slide's pixels: layout, stain, textures, sprite banks."""

    def __init__(
        self,
        layout: SlideLayout,
        stain: StainProfile,
        *,
        seed: int,
        structure_seed: int | None = None,
        extra_populations: tuple[Population, ...] = (),
    ) -> None:
        self.layout, self.stain, self.seed, self.mpp = layout, stain, seed, layout.mpp
        # Extra populations (lymphocyte infiltration, cscvision.synth.cells) use the sprite
        # bank of the population they are named after; without them a slide renders as before.
        self.populations = POPULATIONS + tuple(extra_populations)
        # Vessels and glands run through serial sections: a paired IHC section draws its own
        # cells (``seed``) around the same structures (``structure_seed``).
        self.structure_seed = seed if structure_seed is None else structure_seed
        rng = np.random.default_rng([seed, 7])
        self.lut = od_lut(stain)
        self.banks = sprite_banks(rng, mpp=self.mpp, blur_px=stain.blur_px)
        self.bank_e, self.bank_h = background_banks(rng, self.mpp, stain)
        self.ink = periodic_noise(rng, 512, sigma_px=8 / self.mpp)
        self.gland_rate = float(rng.uniform(0.2, 0.8))
        self.truth = Rasteriser(
            [(TISSUE_BIT, layout.tissue)]
            + [(bit, layout.regions[name]) for name, bit in REGION_BITS.items()]
        )
        art = layout.artefacts
        self.pen, self.fold = PreparedFill(art.pen), PreparedFill(art.fold)
        self.blur = PreparedFill(art.blur)
        self.bubbles = art.bubbles
        ch, cw = -(-layout.height_px // COARSE_PX), -(-layout.width_px // COARSE_PX)
        bits = self.bits(0, 0, cw, ch, scale=1 / COARSE_PX)
        self.coarse = BITS_TO_CLASS[bits]

    # -- classes -------------------------------------------------------------------------
    def bits(self, x0: int, y0: int, width: int, height: int, scale: float = 1.0) -> np.ndarray:
        """Truth bits (tissue, tumour, necrosis, stemness, immuno) per pixel of a window."""
        return self.truth.fill(x0, y0, width, height, scale)

    def class_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Render class at level-0 points, from the coarse class raster (glass outside)."""
        ix = np.floor(np.asarray(x) / COARSE_PX).astype(np.int64)
        iy = np.floor(np.asarray(y) / COARSE_PX).astype(np.int64)
        h, w = self.coarse.shape
        ok = (ix >= 0) & (iy >= 0) & (ix < w) & (iy < h)
        out = np.zeros(ix.shape, np.uint8)
        out[ok] = self.coarse[iy[ok], ix[ok]]
        return out

    # -- rendering -----------------------------------------------------------------------
    def render(self, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 [height, width, 3] of the level-0 window at (x0, y0)."""
        rgb = self._render_sharp(x0, y0, width, height)
        if self.blur:
            self._apply_blur(rgb, x0, y0)
        self._apply_pen(rgb, x0, y0)
        self._apply_bubbles(rgb, x0, y0)
        return rgb

    def render_od(
        self, x0: int, y0: int, width: int, height: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Haematoxylin and eosin ODs of a window before eosin is pushed out of the nuclei,
        and the nuclear OD alone (float32 [height, width] each)."""
        cls = BITS_TO_CLASS[self.bits(x0, y0, width, height)]
        od_h, od_e = self._background(cls, x0, y0)
        nuclei = np.zeros_like(od_h)
        window = (x0, y0, width, height)
        seed = self.structure_seed
        for kind, rate in ((VESSEL, 1.0), (GLAND, self.gland_rate)):
            found = structures_near(kind, seed, window, self.class_at, self.mpp, rate)
            draw(kind, found, (x0, y0), od_h, od_e, nuclei, self.mpp)
        self._cells(window, od_h, od_e, nuclei)
        np.maximum(od_h, nuclei, out=od_h)
        return od_h, od_e, nuclei

    def _render_sharp(self, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        od_h, od_e, nuclei = self.render_od(x0, y0, width, height)
        nuclei *= -2.0  # nuclei push most eosin out: E *= 1 - min(2 N, 0.55)
        np.maximum(nuclei, -0.55, out=nuclei)
        nuclei += 1.0
        od_e *= nuclei
        if self.fold:
            fold = self.fold.fill(x0, y0, width, height)
            if fold.any():
                gain = 1.0 + np.float32(self.layout.artefacts.fold_gain) * fold
                od_h *= gain
                od_e *= gain
        return od_to_rgb(self.lut, od_h, od_e)

    def _background(self, cls: np.ndarray, x0: int, y0: int) -> tuple[np.ndarray, np.ndarray]:
        """Background ODs: one gather per stain from the per-class periodic banks."""
        h, w = cls.shape
        n = BANK_PX
        rows = ((np.arange(y0, y0 + h) % n) * n).astype(np.int32)
        cols = (np.arange(x0, x0 + w) % n).astype(np.int32)
        idx = cls.astype(np.int32)
        idx *= n * n
        idx += rows[:, None]
        idx += cols[None, :]
        return self.bank_h.take(idx), self.bank_e.take(idx)

    def _cells(self, window, od_h, od_e, nuclei) -> None:
        x0, y0, width, height = window
        for pop in self.populations:
            bank = self.banks[pop.name]
            keep_table = np.asarray(pop.keep, np.float64)
            size = bank.size_px
            cell = pop.cell_um / self.mpp
            cxs = np.arange(int((x0 - size) // cell) - 1, int((x0 + width + size) // cell) + 2)
            cys = np.arange(int((y0 - size) // cell) - 1, int((y0 + height + size) // cell) + 2)
            cx, cy = (g.ravel() for g in np.meshgrid(cxs, cys))
            prob = keep_table[self.class_at((cx + 0.5) * cell, (cy + 0.5) * cell)]
            cx, cy, prob = cx[prob > 0], cy[prob > 0], prob[prob > 0]
            if not len(cx):
                continue
            u = uniforms(hash_cells(self.seed, pop.stream, cx, cy), 4)
            px = (cx + 0.5 + pop.jitter * (u[:, 0] - 0.5)) * cell
            py = (cy + 0.5 + pop.jitter * (u[:, 1] - 0.5)) * cell
            ok = u[:, 2] < prob
            seed = self.structure_seed
            ok &= ~inside_lumens(VESSEL, seed, px, py, self.class_at, self.mpp)
            ok &= ~inside_lumens(GLAND, seed, px, py, self.class_at, self.mpp, self.gland_rate)
            variant = (u[ok, 3] * bank.nucleus_h.shape[0]).astype(np.int64)
            left = np.rint(px[ok]).astype(np.int64) - size // 2 - x0
            top = np.rint(py[ok]).astype(np.int64) - size // 2 - y0
            _stamp(bank, variant, left, top, od_h, od_e, nuclei)

    # -- artefacts -----------------------------------------------------------------------
    def _apply_blur(self, rgb: np.ndarray, x0: int, y0: int) -> None:
        """Out-of-focus patch: re-render a padded window, blur it, blend with a soft mask."""
        height, width = rgb.shape[:2]
        sigma = self.layout.artefacts.blur_px
        pad = int(np.ceil(4 * sigma)) + 2  # scipy's Gaussian reaches 4 sigma
        bx0, by0, bx1, by1 = self.blur.bounds
        ix0, iy0 = max(x0, int(bx0) - pad), max(y0, int(by0) - pad)
        ix1, iy1 = min(x0 + width, int(bx1) + pad + 1), min(y0 + height, int(by1) + pad + 1)
        if ix0 >= ix1 or iy0 >= iy1:
            return
        ex0, ey0, ew, eh = ix0 - pad, iy0 - pad, ix1 - ix0 + 2 * pad, iy1 - iy0 + 2 * pad
        big = self._render_sharp(ex0, ey0, ew, eh).astype(np.float32)
        blurred = ndimage.gaussian_filter(big, (sigma, sigma, 0))[pad:-pad, pad:-pad]
        soft = ndimage.gaussian_filter(self.blur.fill(ex0, ey0, ew, eh).astype(np.float32), sigma)
        soft = soft[pad:-pad, pad:-pad, None]
        win = rgb[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
        win[...] = np.rint(win * (1 - soft) + blurred * soft).astype(np.uint8)

    def _apply_pen(self, rgb: np.ndarray, x0: int, y0: int) -> None:
        """Pen ink on the glass: RGB darkened by the ink's optical density."""
        if not self.pen:
            return
        height, width = rgb.shape[:2]
        mask = self.pen.fill(x0, y0, width, height)
        if not mask.any():
            return
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        cloud = wrap_crop(self.ink, x0 + c0, y0 + r0, c1 - c0, r1 - r0)
        density = mask[r0:r1, c0:c1] * (0.75 + 0.12 * cloud)
        ink = np.asarray(PEN_INKS[self.layout.artefacts.pen_ink], np.float32)
        win = rgb[r0:r1, c0:c1]
        win[...] = np.rint(win * np.exp(-density[..., None] * ink)).astype(np.uint8)

    def _apply_bubbles(self, rgb: np.ndarray, x0: int, y0: int) -> None:
        """Air bubbles under the coverslip: a dark refractive rim and a bright inner halo."""
        height, width = rgb.shape[:2]
        rim = 2.5 / self.mpp
        for bx, by, radius in self.bubbles:
            reach = radius + 4 * rim
            c0, c1 = max(int(bx - reach) - x0, 0), min(int(bx + reach) + 1 - x0, width)
            r0, r1 = max(int(by - reach) - y0, 0), min(int(by + reach) + 1 - y0, height)
            if c0 >= c1 or r0 >= r1:
                continue
            yy, xx = np.ogrid[r0:r1, c0:c1]
            d = np.sqrt((xx + x0 - bx) ** 2 + (yy + y0 - by) ** 2).astype(np.float32)
            dark = np.exp(-(((d - radius) / rim) ** 2))
            halo = 0.25 * np.exp(-(((d - radius + 3 * rim) / (2 * rim)) ** 2))
            win = rgb[r0:r1, c0:c1].astype(np.float32)
            win = win * (1 - 0.55 * dark[..., None]) + (255 - win) * halo[..., None]
            rgb[r0:r1, c0:c1] = np.clip(np.rint(win), 0, 255).astype(np.uint8)


def _stamp(bank, variant, left, top, od_h, od_e, nuclei) -> None:
    """Stamp sprites with top-left corners (left, top) into the canvases, clipped."""
    height, width = nuclei.shape
    size = bank.size_px
    inside = (left < width) & (top < height) & (left + size > 0) & (top + size > 0)
    variant, left, top = variant[inside], left[inside], top[inside]
    sx0, sy0 = np.maximum(-left, 0), np.maximum(-top, 0)
    sx1, sy1 = np.minimum(width - left, size), np.minimum(height - top, size)
    rows = zip(
        variant.tolist(), (left + sx0).tolist(), (top + sy0).tolist(),
        sx0.tolist(), sy0.tolist(), sx1.tolist(), sy1.tolist(), strict=True,
    )  # fmt: skip
    cyto = bank.cyto_alpha is not None
    for v, cx0, cy0, a0, b0, a1, b1 in rows:
        win = (slice(cy0, cy0 + b1 - b0), slice(cx0, cx0 + a1 - a0))
        spr = (v, slice(b0, b1), slice(a0, a1))
        if cyto:
            alpha = bank.cyto_alpha[spr]
            od_e[win] += alpha * (bank.cyto_e[spr] - od_e[win])
            od_h[win] *= 1.0 - alpha
        np.maximum(nuclei[win], bank.nucleus_h[spr], out=nuclei[win])

"""Non-rigid refinement and the held-out error of a registration, at its finest level.

**Held-out sites.** Patches on a lattice (every ``HOLDOUT_EVERY`` patch sides) of the fixed
tissue are kept out of every fit: the finest affine drops the patch matches that overlap
them, and the flow gives them no weight, so the flow there is interpolated from around.
After the full transform (affine + flow), phase correlation of each site's fixed patch
against the registered moving image measures what is left: the error estimate, overall
and per region of the slide.

**Flow.** TV-L1 optical flow (``skimage.registration.optical_flow_tvl1``) between the fixed
image and the moving image under the affine, then an outlier-resistant smoothing: a
normalised Gaussian convolution weighted by a trust mask (both tissues present, not a
held-out site, the local correlation after the flow at least ``MIN_TRUST_NCC``), twice
re-weighted by a Cauchy function of each pixel's departure from the smooth field, so that
folds, bubbles and missing tissue do not drag it. Where little is trusted nearby, the flow
falls back to a four times wider smoothing, then to the affine.

The grid (``Registration.flow_um``): ``flow_um[k, r, c]`` is component ``k`` (0 = x, 1 = y)
of a displacement in moving (IHC) level-0 µm, added to the affine's output, at the fixed
(H&E) level-0 point (c * step_um, r * step_um) µm; bilinear between nodes, nearest-node
beyond the last row or column.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

HOLDOUT_EVERY = 3  # held-out sites every 3 patch sides
MIN_TRUST_NCC = 0.3
MIN_SITES = 8


@dataclass(frozen=True)
class Sites:
    ys: np.ndarray  # int[N] centres (finest-level fixed pixels)
    xs: np.ndarray
    half: int  # half the patch side (px)
    shape: tuple[int, int]

    def covers(self, xy_um: np.ndarray, mpp: float) -> np.ndarray:
        """Points (fixed µm [N, 2]) whose patch (of side 2 * half) overlaps a held-out one."""
        grown = ndimage.binary_dilation(self.mask(), iterations=self.half)
        px = np.clip((np.asarray(xy_um) / mpp).astype(int), 0, np.array(self.shape[::-1]) - 1)
        return grown[px[:, 1], px[:, 0]]

    def mask(self) -> np.ndarray:
        out = np.zeros(self.shape, bool)
        for y, x in zip(self.ys.tolist(), self.xs.tolist(), strict=True):
            out[y - self.half : y + self.half, x - self.half : x + self.half] = True
        return out


def held_out_sites(mask: np.ndarray, patch_px: int = 48) -> Sites:
    """Held-out patch centres on a lattice over the fixed tissue."""
    half = patch_px // 2
    step = patch_px * HOLDOUT_EVERY
    ys, xs = np.mgrid[half + step // 2 : mask.shape[0] - half : step,
                      half + step // 2 : mask.shape[1] - half : step]  # fmt: skip
    ys, xs = ys.ravel(), xs.ravel()
    inside = ndimage.binary_erosion(mask, iterations=half // 2)[ys, xs] if len(ys) else ys
    return Sites(ys[inside], xs[inside], half, mask.shape)


def site_residuals(fixed, warped: np.ndarray, cover: np.ndarray, sites: Sites) -> np.ndarray:
    """Per site, the (dx, dy) shift (fixed µm) left between the fixed patch and the
    registered moving patch; NaN where the patches do not correlate."""
    from skimage.registration import phase_cross_correlation

    out = np.full((len(sites.ys), 2), np.nan)
    h = sites.half
    for i, (y, x) in enumerate(zip(sites.ys.tolist(), sites.xs.tolist(), strict=True)):
        a = fixed.image[y - h : y + h, x - h : x + h]
        b = warped[y - h : y + h, x - h : x + h]
        if a.std() < 1e-3 or b.std() < 1e-3 or cover[y, x] < 0.5:
            continue
        shift, _, _ = phase_cross_correlation(a, b, upsample_factor=8, normalization=None)
        if np.abs(shift).max() > h / 2:
            continue
        moved = ndimage.shift(b, shift, order=1, mode="nearest")
        if np.corrcoef(a.ravel(), moved.ravel())[0, 1] < 0.5:
            continue
        out[i] = (-shift[1] * fixed.mpp, -shift[0] * fixed.mpp)
    return out


def error_summary(residuals: np.ndarray, sites: Sites, mpp: float, regions: int = 4) -> dict:
    """Median and p90 of the residual lengths (µm), and per region of a regions x regions
    split of the finest image (fixed µm bounds) its count and median."""
    ok = np.isfinite(residuals).all(axis=1)
    length = np.linalg.norm(residuals[ok], axis=1)
    out = {
        "median": round(float(np.median(length)), 2) if len(length) else None,
        "p90": round(float(np.percentile(length, 90)), 2) if len(length) else None,
        "sites": len(residuals),
        "measured": int(ok.sum()),
        "method": "held-out patch residuals after the full transform",
    }
    h, w = sites.shape
    per = []
    for r in range(regions):
        for c in range(regions):
            inside = ok & (sites.ys * regions // h == r) & (sites.xs * regions // w == c)
            if inside.sum() >= 3:
                per.append({
                    "x_um": [round(c * w / regions * mpp, 1), round((c + 1) * w / regions * mpp, 1)],
                    "y_um": [round(r * h / regions * mpp, 1), round((r + 1) * h / regions * mpp, 1)],
                    "sites": int(inside.sum()),
                    "median": round(float(np.median(np.linalg.norm(residuals[inside], axis=1))), 2),
                })  # fmt: skip
    out["regions"] = per
    return out


def _local_ncc(a: np.ndarray, b: np.ndarray, sigma: float) -> np.ndarray:
    g = lambda z: ndimage.gaussian_filter(z, sigma)  # noqa: E731
    ma, mb = g(a), g(b)
    va, vb = g(a * a) - ma**2, g(b * b) - mb**2
    return (g(a * b) - ma * mb) / np.sqrt(np.clip(va * vb, 1e-12, None))


def _smooth(field: np.ndarray, weight: np.ndarray, sigma: float) -> np.ndarray:
    """Normalised convolution with a fallback to 4x the scale, then to 0, where the local
    weight is small."""
    near = ndimage.gaussian_filter(weight, sigma)
    far = ndimage.gaussian_filter(weight, 4 * sigma)
    fine = ndimage.gaussian_filter(field * weight, sigma) / np.maximum(near, 1e-6)
    wide = ndimage.gaussian_filter(field * weight, 4 * sigma) / np.maximum(far, 1e-6)
    alpha = np.clip(near / 0.3, 0, 1)
    beta = np.clip(far / 0.05, 0, 1)
    return alpha * fine + (1 - alpha) * beta * wide


def robust_flow(fixed, warped: np.ndarray, cover: np.ndarray, sites: Sites, smooth_um: float):
    """The smoothed flow (fixed px, (u, v) = (x, y)) that takes the affine-registered moving
    image onto the fixed image, from trusted pixels only (see the module docstring)."""
    from skimage.registration import optical_flow_tvl1

    v, u = optical_flow_tvl1(fixed.image, warped, attachment=10, num_warp=5)
    f = fixed.mpp
    sigma = smooth_um / f
    rows, cols = np.mgrid[0 : warped.shape[0], 0 : warped.shape[1]]
    after = ndimage.map_coordinates(warped, [rows + v, cols + u], order=1, mode="constant")
    ncc = _local_ncc(fixed.image, after, max(2.0, 15.0 / f))
    trust = fixed.mask & (cover > 0.5) & ~sites.mask() & (ncc >= MIN_TRUST_NCC)
    weight = trust.astype(np.float64)
    su, sv = _smooth(u, weight, sigma), _smooth(v, weight, sigma)
    scale = max(1.0, 4.0 / f)  # Cauchy scale: 4 µm
    for _ in range(2):
        r2 = ((u - su) ** 2 + (v - sv) ** 2) / scale**2
        w = weight / (1.0 + r2)
        su, sv = _smooth(u, w, sigma), _smooth(v, w, sigma)
    return su, sv, float(trust.mean() / max(fixed.mask.mean(), 1e-9))


def flow_grid(su: np.ndarray, sv: np.ndarray, m: np.ndarray, f: float, step_um: float):
    """The dense fixed-px flow as the documented grid: moving-µm displacements at fixed µm
    nodes (c * step_um, r * step_um)."""
    h, w = su.shape
    rows, cols = int(np.ceil(h * f / step_um)) + 1, int(np.ceil(w * f / step_um)) + 1
    rr, cc = np.mgrid[0:rows, 0:cols]
    g = [rr * step_um / f - 0.5, cc * step_um / f - 0.5]
    du = ndimage.map_coordinates(su, g, order=1, mode="nearest") * f
    dv = ndimage.map_coordinates(sv, g, order=1, mode="nearest") * f
    return np.einsum("ij,jrc->irc", m[:2, :2], np.stack([du, dv])).astype(np.float32)

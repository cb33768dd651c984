"""Deterministic randomness that does not depend on the order of rendering.

Counter-based hashing (splitmix64) gives every grid cell its own random numbers from
``(seed, stream, cell_x, cell_y)``, so a nucleus looks the same whichever tile draws it.
Periodic textures come from filtering white noise in the Fourier domain: they tile
seamlessly and are read with modular indexing.
"""

from __future__ import annotations

import numpy as np
from scipy import fft as sp_fft

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_MASK32 = np.uint64(0xFFFFFFFF)


def _splitmix(h: np.ndarray) -> np.ndarray:
    h = h + _GOLDEN
    h = (h ^ (h >> np.uint64(30))) * _MIX1
    h = (h ^ (h >> np.uint64(27))) * _MIX2
    return h ^ (h >> np.uint64(31))


def hash_cells(seed: int, stream: int, cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
    """A uint64 hash per cell; arrays broadcast. Same inputs, same hash, in any order."""
    cx64 = np.asarray(cx, dtype=np.int64).astype(np.uint64)
    cy64 = np.asarray(cy, dtype=np.int64).astype(np.uint64)
    h = _splitmix(np.full(np.broadcast(cx64, cy64).shape, seed & 0xFFFFFFFFFFFFFFFF, np.uint64))
    h = _splitmix(h ^ np.uint64(stream & 0xFFFFFFFF))
    h = _splitmix(h ^ (cx64 & _MASK32))
    return _splitmix(h ^ (cy64 & _MASK32))


def uniforms(h: np.ndarray, n: int) -> np.ndarray:
    """``n`` independent uniforms in [0, 1) per hash: shape ``h.shape + (n,)``."""
    out = np.empty((*h.shape, n), np.float64)
    state = h.copy()
    for i in range(n):
        state = _splitmix(state)
        out[..., i] = (state >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)
    return out


def periodic_noise(
    rng: np.random.Generator,
    size_px: int,
    *,
    sigma_px: float | tuple[float, float],
    angle_rad: float = 0.0,
) -> np.ndarray:
    """Gaussian-filtered white noise on a torus, standardised to mean 0, std 1 (float32).

    ``sigma_px`` as a pair (along, across) gives an anisotropic texture rotated by
    ``angle_rad``: elongated streaks, the look of collagen fibres.
    """
    white = rng.standard_normal((size_px, size_px), dtype=np.float32)
    fy = np.fft.fftfreq(size_px).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(size_px).astype(np.float32)[None, :]
    s_along, s_across = (sigma_px, sigma_px) if np.isscalar(sigma_px) else sigma_px
    cos, sin = np.float32(np.cos(angle_rad)), np.float32(np.sin(angle_rad))
    f_along = (fx * cos + fy * sin) * np.float32(s_along)
    f_across = (fy * cos - fx * sin) * np.float32(s_across)
    gain = np.exp(np.float32(-2 * np.pi**2) * (f_along**2 + f_across**2))
    field = sp_fft.irfft2(sp_fft.rfft2(white, workers=1) * gain, s=(size_px, size_px), workers=1)
    field -= field.mean()
    field /= field.std() + 1e-12
    return field.astype(np.float32, copy=False)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Non-periodic smooth random field (float32, mean 0, std 1) for layouts."""
    from scipy import ndimage

    pad = int(3 * sigma_px) + 1
    white = rng.standard_normal((shape[0] + 2 * pad, shape[1] + 2 * pad)).astype(np.float32)
    field = ndimage.gaussian_filter(white, sigma_px, mode="wrap")[pad:-pad, pad:-pad]
    field -= field.mean()
    return field / (field.std() + 1e-12)


def wrap_crop(bank: np.ndarray, x0: int, y0: int, width: int, height: int) -> np.ndarray:
    """The window ``[y0, y0+height) x [x0, x0+width)`` of a periodic 2-D ``bank``."""
    bh, bw = bank.shape[:2]
    rows = bank.take(np.arange(y0, y0 + height) % bh, axis=0)
    reps = (width + (x0 % bw)) // bw + 1
    wide = np.tile(rows, (1, reps)) if reps > 1 else rows
    start = x0 % bw
    return wide[:, start : start + width]

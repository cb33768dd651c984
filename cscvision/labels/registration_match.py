"""Dense patch matches for the non-rigid field: normalised cross-correlation of a fixed
patch searched in a larger window of the moving image under the current transform.

Why not phase correlation of two equal patches (``registration.patch_matches``)? Both
patches share the same window and the same frame, and the peak is pulled towards no shift:
measured against the generator's truth on ``synth --ihc realistic`` pairs, a known 10 µm
offset came back as 3 µm (gain ~0.3), so each round of a field moved only a third of the
way and five rounds stopped ~5 µm short. A template searched over a window
(:func:`skimage.feature.match_template`, zero-mean normalised) has no shared frame: the
same offsets come back at gain 0.9-1.0 with the same ~4 µm sd per axis.

The peak is refined to a fraction of a pixel by a parabola through it and its neighbours
on each axis; a peak on the border of the search window (the shift is larger than the
window), or under ``min_ncc``, gives no match. The score maps of all patches are computed
at once (:func:`ncc_maps`: batched FFTs and integral images, the same numbers as
``match_template``, in one batch instead of one call per patch).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

STEP_PX = 16  # one patch every 16 px of the finest level (registration_flow's weights)
CHUNK = 256  # patches per batch of FFTs (memory: CHUNK x window² complex numbers)


def patch_centres(
    fixed: Any, moving: Any, guess: Any, margin: int, step: int, max_patches: int,
    tested: list[int] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """``moving``'s image warped onto ``fixed``'s grid by ``guess`` (fixed µm → moving µm),
    and the patch centres (rows, columns) every ``step`` px, ``margin`` px inside the edges,
    on tissue in both; at most ``max_patches`` of them (a fixed random subset).
    ``tested[0]``, when given, grows by their number."""
    shape = fixed.image.shape
    warped, cover = warp_all_to_fixed(
        [moving.image, moving.mask.astype(np.float32)], moving.mpp, shape, fixed.mpp, guess
    )
    ys, xs = np.mgrid[margin : shape[0] - margin : step, margin : shape[1] - margin : step]
    ys, xs = ys.ravel(), xs.ravel()
    keep = fixed.mask[ys, xs] & (cover[ys, xs] > 0.5)
    ys, xs = ys[keep], xs[keep]
    if len(ys) > max_patches:
        pick = np.random.default_rng(0).choice(len(ys), max_patches, replace=False)
        ys, xs = ys[pick], xs[pick]
    if tested is not None:
        tested[0] += len(ys)
    return warped, ys, xs


def warp_to_fixed(
    moving: np.ndarray, moving_mpp: float, shape: tuple[int, int], fixed_mpp: float, fn
) -> np.ndarray:
    """Sample ``moving`` (a 2-D array) at every fixed pixel through ``fn`` (µm -> µm)."""
    return warp_all_to_fixed([moving], moving_mpp, shape, fixed_mpp, fn)[0]


def warp_all_to_fixed(
    images: list[np.ndarray], moving_mpp: float, shape: tuple[int, int], fixed_mpp: float, fn
) -> list[np.ndarray]:
    """:func:`warp_to_fixed` of several 2-D arrays of one moving level, ``fn`` evaluated
    once (through a non-rigid field it costs as much as the sampling)."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    xy = (np.stack([cols.ravel(), rows.ravel()], axis=1) + 0.5) * fixed_mpp
    m = fn(xy) / moving_mpp - 0.5
    at = [m[:, 1], m[:, 0]]
    return [ndimage.map_coordinates(a, at, order=1, mode="constant").reshape(shape)
            for a in images]  # fmt: skip


def _parabola(m1: float, c0: float, p1: float) -> float:
    den = m1 - 2.0 * c0 + p1
    return 0.0 if den >= 0 else float(np.clip(0.5 * (m1 - p1) / den, -0.5, 0.5))


def peak_shift(score: np.ndarray, radius: int) -> tuple[float, float, float] | None:
    """(dx, dy, peak) of a (2r+1)^2 score map, sub-pixel; None on the border."""
    iy, ix = np.unravel_index(int(np.argmax(score)), score.shape)
    if iy in (0, score.shape[0] - 1) or ix in (0, score.shape[1] - 1):
        return None
    c0 = float(score[iy, ix])
    dy = iy - radius + _parabola(score[iy - 1, ix], c0, score[iy + 1, ix])
    dx = ix - radius + _parabola(score[iy, ix - 1], c0, score[iy, ix + 1])
    return dx, dy, c0


def _window_sums(a: np.ndarray, p: int) -> np.ndarray:
    """Sums of every p x p window of each image of ``a`` [N, S, S]: [N, S - p + 1, ...]."""
    c = np.pad(a, ((0, 0), (1, 0), (1, 0))).cumsum(1).cumsum(2)
    return c[:, p:, p:] - c[:, :-p, p:] - c[:, p:, :-p] + c[:, :-p, :-p]


def ncc_maps(windows: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """Zero-mean normalised cross-correlation of each template [N, p, p] at every position
    inside its window [N, S, S]: [N, S - p + 1, S - p + 1], as
    ``skimage.feature.match_template(window, template)`` (0 where either is flat)."""
    side = windows.shape[1]
    p = templates.shape[1]
    w = windows.astype(np.float64)
    t = templates.astype(np.float64)
    t = t - t.mean(axis=(1, 2), keepdims=True)
    # correlation = convolution with the flipped template; no wrap-around for valid offsets
    spec = np.fft.rfft2(w) * np.fft.rfft2(t[:, ::-1, ::-1], s=(side, side))
    num = np.fft.irfft2(spec, s=(side, side))[:, p - 1 :, p - 1 :]
    s1, s2 = _window_sums(w, p), _window_sums(w * w, p)
    var_w = np.maximum(s2 - s1 * s1 / (p * p), 0.0)
    den = np.sqrt(var_w * (t * t).sum(axis=(1, 2))[:, None, None])
    tiny = den <= np.finfo(np.float32).eps * np.maximum(1.0, den.max(initial=0.0))
    return np.where(tiny, 0.0, num / np.where(tiny, 1.0, den))


def template_matches(
    fixed,
    moving,
    guess,
    patch_px: int = 48,
    search_um: float = 24.0,
    max_patches: int = 4000,
    min_ncc: float = 0.6,
    tested: list[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Point pairs (fixed µm [N, 2], moving µm [N, 2]) at the patches (``patch_px`` square,
    every :data:`STEP_PX`) of the fixed level whose template finds a peak of normalised
    cross-correlation ≥ ``min_ncc`` within ``search_um`` in the moving level warped by
    ``guess`` (fixed µm [N, 2] -> moving µm [N, 2]). ``tested[0]`` is increased by the
    number of patches tried."""
    half, r = patch_px // 2, max(2, round(search_um / fixed.mpp))
    lo = half + r
    warped, ys, xs = patch_centres(fixed, moving, guess, lo, STEP_PX, max_patches, tested)
    src, dst = [], []
    view_a = np.lib.stride_tricks.sliding_window_view(fixed.image, (2 * half, 2 * half))
    view_b = np.lib.stride_tricks.sliding_window_view(warped, (2 * lo, 2 * lo))
    for start in range(0, len(ys), CHUNK):
        y, x = ys[start : start + CHUNK], xs[start : start + CHUNK]
        a, b = view_a[y - half, x - half], view_b[y - lo, x - lo]
        busy = (a.std(axis=(1, 2)) >= 1e-3) & (b.std(axis=(1, 2)) >= 1e-3)
        if not busy.any():
            continue
        y, x = y[busy], x[busy]
        for yy, xx, score in zip(y.tolist(), x.tolist(), ncc_maps(b[busy], a[busy]), strict=True):
            found = peak_shift(score, r)
            if found is None or found[2] < min_ncc:
                continue
            src.append((xx + 0.5, yy + 0.5))
            dst.append((xx + 0.5 + found[0], yy + 0.5 + found[1]))  # the patch, warped
    if not src:
        return np.zeros((0, 2)), np.zeros((0, 2))
    return np.asarray(src) * fixed.mpp, guess(np.asarray(dst) * fixed.mpp)

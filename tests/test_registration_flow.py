"""The non-rigid field's smoothing: chosen by held-out matches, and computed fast when wide."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cscvision.labels import registration_flow as flow


def _exact_smooth(field: np.ndarray, weight: np.ndarray, sigma: float) -> np.ndarray:
    near, far = (ndimage.gaussian_filter(weight, s) for s in (sigma, 4 * sigma))
    alpha, beta = np.clip(near / 0.3, 0, 1), np.clip(far / 0.05, 0, 1)
    fine = [ndimage.gaussian_filter(c * weight, sigma) / np.maximum(near, 1e-6) for c in field]
    wide = [ndimage.gaussian_filter(c * weight, 4 * sigma) / np.maximum(far, 1e-6) for c in field]
    return alpha * np.stack(fine) + (1 - alpha) * beta * np.stack(wide)


def test_a_wide_smoothing_on_block_means_equals_the_full_normalised_convolution():
    g = np.random.default_rng(0)
    shape = (300, 260)
    field = np.stack([ndimage.gaussian_filter(g.normal(size=shape), 6) * 40 + 5 for _ in (0, 1)])
    weight = np.zeros(shape)
    weight[g.uniform(size=shape) < 0.1] = 10.0  # sparse matches, denser on the left half
    weight[:, :130][g.uniform(size=(300, 130)) < 0.2] = 10.0
    weight[100:160, 100:160] = 0.0  # a hole: the wide fallback fills it
    for sigma in (3.0, 20.0, 40.0):
        exact = _exact_smooth(field, weight, sigma)
        fast = flow._smooth(field, weight, sigma)
        assert fast.shape == field.shape
        inner = (slice(None), slice(10, -10), slice(10, -10))  # block edges pad by the edge
        err = np.abs(fast - exact)[inner]
        spread = exact[inner].std()  # what the smoothing leaves of the field's variation
        assert np.median(err) < 0.05 * spread, sigma
        assert err.max() < 0.2 * spread, sigma


def _matches(noise_um: float, length_um: float, seed: int = 0):
    """A quarter of the patches of a 1 mm square at 2 µm/px (every 32 µm) give a match whose
    displacement beyond the identity affine is a smooth warp (12 µm, wavelength 2π
    ``length_um``) plus ``noise_um`` per axis."""
    g = np.random.default_rng(seed)
    f, side = 2.0, 500
    rows, cols = np.mgrid[0:side, 0:side] * f
    warp = 12.0 * np.stack([np.sin(cols / length_um) * np.cos(rows / length_um),
                            np.cos(cols / length_um + 1)])  # fmt: skip
    ys, xs = np.mgrid[8:side:16, 8:side:16]
    src = (np.stack([xs.ravel(), ys.ravel()], 1) + 0.5) * f
    src = src[g.uniform(size=len(src)) < 0.25]
    dst = src + flow._sample(warp, src, f) + g.normal(0, noise_um, src.shape)
    return src, dst, warp, (side, side), f


def _field_error(src, dst, warp, shape, f, smooth: float) -> float:
    resid = dst - src
    good = flow.consistent(src, resid, 2 * smooth)
    field = flow._field_from(src[good], resid[good], shape, f, smooth)
    return float(np.median(np.linalg.norm(field - warp, axis=0)))


@pytest.mark.parametrize("noise_um,length_um", [(4.0, 400.0), (0.5, 60.0)])
def test_the_held_out_choice_of_smoothing_follows_the_true_warp(noise_um, length_um):
    """Known answer: the smoothing chosen on held-out matches gives a field within 1.25x of
    the best candidate's error against the true warp; a warp that bends within ~100 µm and
    clean matches keep the narrowest smoothing (a wide one would flatten the warp)."""
    src, dst, warp, shape, f = _matches(noise_um, length_um)
    chosen, scores = flow.choose_smoothing(src, dst, np.eye(3), shape, f, 40.0)
    assert set(scores) == {"40", "80", "160", "320"}
    errors = {s: _field_error(src, dst, warp, shape, f, s) for s in (40.0, 80.0, 160.0, 320.0)}
    assert errors[chosen] <= 1.25 * min(errors.values()), (chosen, errors)
    if length_um < 100:
        assert chosen == 40.0 and errors[320.0] > 2 * errors[40.0]


@pytest.mark.parametrize("iterations", [2])
def test_match_field_reports_the_smoothing_it_used(iterations):
    src, dst, _, shape, f = _matches(4.0, 400.0, seed=2)

    def matcher(fixed, moving, through, max_patches, search_um, tested):
        return src, dst

    fixed = type("L", (), {"mpp": f, "image": np.zeros(shape)})()
    out = flow.match_field(fixed, None, np.eye(3), 40.0, matcher, iterations, choose=True)
    field, *_, smooth, scores, _tried = out
    assert field.shape == (2, *shape) and smooth in (40.0, 80.0, 160.0, 320.0)
    assert scores[f"{smooth:g}"] == min(scores.values())
    fixed_only = flow.match_field(fixed, None, np.eye(3), 40.0, matcher, iterations)
    assert fixed_only[4] == 40.0 and fixed_only[5] == {}

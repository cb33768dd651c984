"""The non-rigid field's matcher: known shifts and a known warp come back unshrunk."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cscvision.labels import registration_flow as flow
from cscvision.labels.registration import Level
from cscvision.labels.registration_match import ncc_maps, peak_shift, template_matches

MPP = 2.0  # µm/px of the test levels, as the finest registration level


def _texture(side: int = 360, seed: int = 0) -> np.ndarray:
    """Tissue-like structure at ~10 µm, on a side x side level of 2 µm/px."""
    g = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(g.normal(size=(side, side)), 2.5)
    return ((image - image.min()) / np.ptp(image)).astype(np.float32)


def _level(image: np.ndarray) -> Level:
    mask = np.ones(image.shape, bool)
    return Level(image, mask, np.zeros((*image.shape, 3), np.uint8), MPP)


def _warp_field(shape, amplitude_um: float, length_um: float) -> np.ndarray:
    """A smooth displacement (moving µm at each fixed px): amplitude x sin/cos waves."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]] * MPP
    return amplitude_um * np.stack([np.sin(cols / length_um) * np.cos(rows / length_um),
                                    np.cos(cols / length_um + 1) * 0.8])  # fmt: skip


def _moving(fixed: np.ndarray, field_um: np.ndarray) -> np.ndarray:
    """The moving image such that fixed µm p sits at moving µm p + field(p) (to the first
    order: the field is smooth, so its inverse is -field at the same point)."""
    rows, cols = np.mgrid[0 : fixed.shape[0], 0 : fixed.shape[1]].astype(np.float64)
    return ndimage.map_coordinates(
        fixed, [rows - field_um[1] / MPP, cols - field_um[0] / MPP], order=3, mode="reflect"
    ).astype(np.float32)


def test_peak_shift_refines_a_parabolic_peak_to_a_fraction_of_a_pixel():
    yy, xx = np.mgrid[-5:6, -5:6].astype(float)
    score = 1 - 0.02 * ((xx - 1.3) ** 2 + (yy + 2.6) ** 2)
    dx, dy, peak = peak_shift(score, 5)
    assert (dx, dy) == pytest.approx((1.3, -2.6), abs=1e-6) and peak > 0.99
    assert peak_shift(1 - 0.02 * ((xx - 5) ** 2 + yy**2), 5) is None  # on the border


def test_batched_score_maps_equal_match_template_patch_by_patch():
    """Known answer: skimage's match_template, one call per patch, on textured, partly flat
    and wholly flat windows; the peak sits where the template was cut out."""
    from skimage.feature import match_template

    g = np.random.default_rng(3)
    windows = ndimage.gaussian_filter(g.normal(size=(40, 70, 70)), (0, 2, 2)).astype(np.float32)
    windows[1, :40] = 0.5  # partly flat
    windows[2] = 0.25  # flat: no correlation anywhere
    templates = windows[:, 9:57, 13:61] + 0.2 * g.normal(size=(40, 48, 48)).astype(np.float32)
    fast = ncc_maps(windows, templates)
    slow = np.stack([match_template(w, t) for w, t in zip(windows, templates, strict=True)])
    assert fast.shape == slow.shape == (40, 23, 23)
    assert np.abs(fast - slow).max() < 1e-4
    assert not fast[2].any()
    peaks = [np.unravel_index(int(np.argmax(m)), m.shape) for m in fast[3:]]
    assert all(p == (9, 13) for p in peaks)


@pytest.mark.parametrize("shift_um", [(7.3, -4.6), (-15.0, 11.0)])
def test_a_known_shift_comes_back_whole(shift_um):
    """Known answer: a moving image shifted by 7-19 µm is matched at that shift to within
    0.3 µm (sign, sub-pixel peak and µm conversion)."""
    fixed = _texture()
    field = np.broadcast_to(np.asarray(shift_um, float)[:, None, None], (2, *fixed.shape))
    moving = _moving(fixed, field)
    src, dst = template_matches(_level(fixed), _level(moving), lambda xy: xy, search_um=24.0)
    assert len(src) > 100
    assert np.median(dst - src, axis=0) == pytest.approx(shift_um, abs=0.3)


def test_a_known_warp_is_followed_by_the_field():
    """Known answer: a smooth 12 µm warp (wavelength ~1.2 mm) on a 720 µm square is
    recovered by three rounds of matches + smoothing to a median error under 1.5 µm, where
    the identity leaves ~9 µm."""
    fixed = _texture(side=360, seed=1)
    truth = _warp_field(fixed.shape, 12.0, 200.0)
    moving = _moving(fixed, truth)
    from cscvision.labels.registration_match import template_matches as matcher

    field, src, _dst, good, smooth, _, tried = flow.match_field(
        _level(fixed), _level(moving), np.eye(3), 80.0, matcher, iterations=3
    )
    inner = (slice(40, -40), slice(40, -40))  # the field extrapolates at the edge
    error = np.linalg.norm(field - truth, axis=0)[inner]
    start = np.linalg.norm(truth, axis=0)[inner]
    assert np.median(start) > 6 and np.median(error) < 1.5, (np.median(start), np.median(error))
    assert smooth == 80.0 and good.mean() > 0.9 and tried >= len(src)


def test_the_matches_scatter_is_taken_out_in_quadrature():
    summary = {"median": 5.0, "p90": 13.0, "regions": [{"median": 2.0}], "method": "held-out"}
    out = flow.less_scatter(summary, {"median": 3.0, "p90": 5.0})
    assert (out["median"], out["p90"]) == (4.0, 12.0)
    assert out["regions"][0]["median"] == 0.0  # scatter larger than the region's figure
    assert (out["held_out_median"], out["held_out_p90"]) == (5.0, 13.0)


def test_a_shift_between_sections_with_their_own_content_is_not_shrunk():
    """Known answer: two 'sections' share a structure but each has its own content at half
    its amplitude (other cells); a 10 µm offset comes back within 0.4 µm. The phase
    correlation of two windowed patches returned 8.5 µm here (pulled towards no shift)."""
    shared = _texture(seed=0)
    g = np.random.default_rng(5)
    own = [ndimage.gaussian_filter(g.normal(size=shared.shape), 2.5) for _ in range(2)]
    own = [0.5 * o / np.ptp(o) for o in own]
    offset = np.broadcast_to(np.array([10.0, 0.0])[:, None, None], (2, *shared.shape))
    fixed = (shared + own[0]).astype(np.float32)
    moving = (_moving(shared, offset) + own[1]).astype(np.float32)
    src, dst = template_matches(_level(fixed), _level(moving), lambda xy: xy)
    assert len(src) > 100
    assert np.median(dst - src, axis=0) == pytest.approx((10.0, 0.0), abs=0.4)

"""Stain vectors and normalisation: known answers on images made from known stains."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cscvision.slides.stain import (
    StainError,
    StainReference,
    angle_deg,
    fit_stain,
    normalise_batch,
    optical_density,
    rgb_to_lab,
    rgb_to_lab_np,
)

# Ruifrok & Johnston's H&E vectors (unit OD rows) and another pair for the reference
H = np.array([0.650, 0.704, 0.286])
E = np.array([0.072, 0.990, 0.105])
H2 = np.array([0.55, 0.76, 0.35])
E2 = np.array([0.20, 0.85, 0.49])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _he_image(h: np.ndarray, e: np.ndarray, seed: int, side: int = 96) -> tuple:
    """RGB uint8 [side, side, 3] made from stains h, e and known concentrations [N, 2]:
    nuclei (mostly H), stroma (mostly E), mixtures, and glass."""
    rng = np.random.default_rng(seed)
    n = side * side
    kind = rng.choice(4, n, p=[0.25, 0.35, 0.3, 0.1])
    conc = np.zeros((n, 2))
    conc[kind == 0] = np.c_[
        rng.gamma(6, 0.15, (kind == 0).sum()), rng.gamma(1, 0.03, (kind == 0).sum())
    ]
    conc[kind == 1] = np.c_[
        rng.gamma(1, 0.03, (kind == 1).sum()), rng.gamma(6, 0.1, (kind == 1).sum())
    ]
    conc[kind == 2] = rng.gamma(4, 0.12, ((kind == 2).sum(), 2))
    stains = np.stack([_unit(h), _unit(e)])
    od = conc @ stains
    rgb = np.clip(np.round(255 * np.exp(-od)), 0, 255).astype(np.uint8)
    return rgb.reshape(side, side, 3), conc, stains


@pytest.mark.parametrize("method", ["macenko", "vahadane"])
def test_stain_vectors_are_recovered_within_two_degrees(method):
    rgb, _, stains = _he_image(H, E, seed=0)
    ref = fit_stain(rgb, method)
    fitted = np.asarray(ref.stain_matrix)
    assert angle_deg(fitted[0], stains[0]) < 2.0  # haematoxylin first
    assert angle_deg(fitted[1], stains[1]) < 2.0
    # the other stains: recovered too, so the fit is not a constant
    rgb2, _, stains2 = _he_image(H2, E2, seed=1)
    fitted2 = np.asarray(fit_stain(rgb2, method).stain_matrix)
    assert max(angle_deg(a, b) for a, b in zip(fitted2, stains2, strict=True)) < 2.0


def test_glass_is_refused_with_a_message():
    with pytest.raises(StainError, match="fit on a tissue region"):
        fit_stain(np.full((64, 64, 3), 245, np.uint8), "macenko")


def test_macenko_normalisation_recomposes_with_the_reference_stains():
    """Known answer: an image of stains S with concentrations C, normalised to a reference
    (S_ref, m_ref) with the image's own fitted stains as source, has OD = (C · m_ref / p99(C))
    · S_ref on its tissue (p99 over the tissue pixels), up to 8-bit rounding."""
    rgb, conc, _ = _he_image(H, E, seed=2, side=64)
    reference = StainReference(
        method="macenko",
        stain_matrix=tuple(map(tuple, np.stack([_unit(H2), _unit(E2)]).tolist())),
        max_concentration=(1.5, 0.8),
    )
    source = fit_stain(rgb, "macenko")
    batch = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    out = normalise_batch(batch, reference, source=source)[0].permute(1, 2, 0).numpy()
    tissue = np.linalg.norm(optical_density(rgb.reshape(-1, 3)), axis=1) > 0.15
    # the fitted source stains are within 2 degrees, so the concentrations are close to C
    c_src = np.linalg.lstsq(
        np.asarray(source.stain_matrix).T, optical_density(rgb.reshape(-1, 3)).T, rcond=None
    )[0].T
    scale = np.array([1.5, 0.8]) / np.percentile(c_src[tissue], 99, axis=0)
    expected_od = (c_src * scale) @ np.asarray(reference.stain_matrix)
    expected = np.clip(255 * np.exp(-expected_od), 0, 255).reshape(out.shape)
    np.testing.assert_allclose(out, expected, atol=1.0)
    # and against the generator's concentrations: the normalised tissue OD is the truth's
    truth_od = (conc * scale) @ np.asarray(reference.stain_matrix)
    got_od = optical_density(out.reshape(-1, 3))
    err = np.abs(got_od - truth_od)[tissue & (truth_od.max(1) < 2.5)]
    assert np.median(err) < 0.05


def test_reinhard_matches_the_reference_lab_statistics():
    rgb, _, _ = _he_image(H, E, seed=3, side=64)
    target = fit_stain(_he_image(H2, E2, seed=4, side=64)[0], "reinhard")
    target = StainReference("reinhard", lab_mean=(70.0, 15.0, -8.0), lab_std=(12.0, 6.0, 4.0))
    batch = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    out = normalise_batch(batch, target)
    lab = rgb_to_lab(out.round())[0].reshape(3, -1).numpy()
    np.testing.assert_allclose(lab.mean(1), target.lab_mean, atol=0.6)
    np.testing.assert_allclose(lab.std(1), target.lab_std, rtol=0.05)


def test_torch_lab_equals_scikit_image():
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (2, 3, 9, 7)).astype(np.uint8)
    ours = rgb_to_lab(torch.from_numpy(rgb)).numpy()
    theirs = rgb_to_lab_np(rgb.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(ours, theirs, atol=2e-3)


def test_a_reference_round_trips_through_json():
    ref = fit_stain(_he_image(H, E, seed=6)[0], "macenko", source="tile A")
    again = StainReference.from_dict(json.loads(json.dumps(ref.to_dict())))
    np.testing.assert_allclose(again.stain_matrix, ref.stain_matrix, atol=1e-6)
    np.testing.assert_allclose(again.max_concentration, ref.max_concentration, atol=1e-6)
    assert again.method == "macenko" and again.source == "tile A"
    with pytest.raises(StainError, match="lacks stain_matrix"):
        StainReference.from_dict({"method": "vahadane"})

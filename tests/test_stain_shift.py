"""The site-shift family of cscvision.synth.stain_shift: known answers on two-stain images."""

from __future__ import annotations

import numpy as np
import pytest

from cscvision.slides.stain import angle_deg, fit_stain
from cscvision.synth.stain_shift import SiteShift, apply_site_shift, rotate_stains

H = np.array([0.650, 0.704, 0.286])
E = np.array([0.072, 0.990, 0.105])
STAINS = np.stack([H / np.linalg.norm(H), E / np.linalg.norm(E)])


def _he_image(seed: int = 0, side: int = 128) -> np.ndarray:
    """RGB uint8 made from STAINS and known concentrations: nuclei, stroma, mixtures, glass."""
    rng = np.random.default_rng(seed)
    n = side * side
    kind = rng.choice(4, n, p=[0.25, 0.35, 0.3, 0.1])
    conc = np.zeros((n, 2))
    k = [(kind == i).sum() for i in range(3)]
    conc[kind == 0] = np.c_[rng.gamma(6, 0.15, k[0]), rng.gamma(1, 0.03, k[0])]
    conc[kind == 1] = np.c_[rng.gamma(1, 0.03, k[1]), rng.gamma(6, 0.1, k[1])]
    conc[kind == 2] = rng.gamma(4, 0.12, (k[2], 2))
    rgb = np.clip(np.round(255 * np.exp(-conc @ STAINS)), 0, 255).astype(np.uint8)
    return rgb.reshape(side, side, 3)


def test_strength_zero_is_the_identity():
    rgb = _he_image()
    assert SiteShift.at(0) == SiteShift()
    assert np.array_equal(apply_site_shift(rgb, SiteShift.at(0)), rgb)


def test_the_unmix_and_remix_path_alone_gives_the_image_back():
    rgb = _he_image()
    neutral = SiteShift(jpeg_quality=50)  # not the identity, so every step runs
    out = apply_site_shift(rgb, neutral)
    assert np.abs(out.astype(int) - np.maximum(rgb, 1)).max() <= 1


def test_strength_scales_every_part():
    s2 = SiteShift.at(2)
    assert s2.rotation_deg == pytest.approx(20)
    assert s2.h_scale == pytest.approx(1.69)
    assert s2.e_scale == pytest.approx(0.5625)
    assert s2.gamma == pytest.approx(0.81)
    assert s2.blur_px == pytest.approx(1.5)
    assert s2.jpeg_quality == 70
    with pytest.raises(ValueError, match="strength"):
        SiteShift.at(-1)


def test_rotation_turns_each_stain_towards_blue_absorption_by_the_angle():
    turned = rotate_stains(STAINS, 15)
    blue = np.array([0.0, 0.0, 1.0])
    for before, after in zip(STAINS, turned, strict=True):
        assert angle_deg(after, before) == pytest.approx(15, abs=1e-6)
        assert angle_deg(after, blue) == pytest.approx(angle_deg(before, blue) - 15, abs=1e-6)
        assert np.linalg.norm(after) == pytest.approx(1)
    assert (turned > 0).all()  # still absorbing in every channel: a physical stain


@pytest.mark.parametrize("degrees", [10.0, 20.0])
def test_a_pure_rotation_moves_the_macenko_vectors_by_the_set_angle(degrees):
    rgb = _he_image()
    before = np.asarray(fit_stain(rgb, "macenko").stain_matrix)
    out = apply_site_shift(rgb, SiteShift(rotation_deg=degrees))
    after = np.asarray(fit_stain(out, "macenko").stain_matrix)
    expected = rotate_stains(STAINS, degrees)
    for i in range(2):  # haematoxylin, eosin
        assert angle_deg(after[i], before[i]) == pytest.approx(degrees, abs=2.0)
        assert angle_deg(after[i], expected[i]) < 2.0


def test_concentration_factors_scale_the_fitted_stain_amounts():
    rgb = _he_image()
    before = fit_stain(rgb, "macenko").max_concentration
    after = fit_stain(apply_site_shift(rgb, SiteShift(h_scale=1.5, e_scale=0.6)), "macenko")
    ratio = np.asarray(after.max_concentration) / np.asarray(before)
    np.testing.assert_allclose(ratio, [1.5, 0.6], rtol=0.05)


def test_parts_split_the_family_at_the_same_strength():
    full, stain, optics = (SiteShift.at(3, parts) for parts in ("all", "stain", "optics"))
    assert (stain.rotation_deg, stain.h_scale, stain.e_scale) == (
        full.rotation_deg,
        full.h_scale,
        full.e_scale,
    )
    assert (stain.gamma, stain.blur_px, stain.jpeg_quality) == (1.0, 0.0, 85)
    assert (optics.gamma, optics.blur_px, optics.jpeg_quality) == (
        full.gamma,
        full.blur_px,
        full.jpeg_quality,
    )
    assert (optics.rotation_deg, optics.h_scale, optics.e_scale) == (0.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="parts 'hue'"):
        SiteShift.at(1, "hue")


def _edge_width(rgb: np.ndarray) -> float:
    """Mean over channels and rows of the pixels strictly between 10 % and 90 % of the step
    across the vertical edge in the middle of ``rgb`` (0: a sharp step)."""
    profile = rgb[:, 8:-8].astype(float)  # away from the image's own borders
    lo, hi = profile[:, :1], profile[:, -1:]
    span = np.where(hi == lo, np.nan, hi - lo)
    frac = (profile - lo) / span
    return float(np.nanmean(((frac > 0.1) & (frac < 0.9)).sum(axis=1)))


def test_the_stain_part_leaves_a_grey_blur_free_step_as_sharp():
    grey = np.full((32, 64, 3), 200, np.uint8)
    grey[:, 32:] = 90  # a sharp step from light to dark grey
    assert _edge_width(grey) == 0
    stained = apply_site_shift(grey, SiteShift.at(3, "stain"), stains=STAINS)
    assert not np.array_equal(stained, grey)  # the colours moved
    assert _edge_width(stained) == 0  # ... the step did not
    assert len(np.unique(stained.reshape(-1, 3), axis=0)) == 2
    blurred = apply_site_shift(grey, SiteShift.at(3, "all"), stains=STAINS)
    assert _edge_width(blurred) >= 4  # σ 2.25 px: about 2.56 σ between 10 and 90 %


@pytest.mark.parametrize("strength", [1.0, 2.0, 3.0])
def test_the_optics_part_leaves_the_macenko_vectors_where_they_were(strength):
    """Tone curve and blur (JPEG is the writer's; eval_trust measures it on the slides)."""
    blocks = np.kron(_he_image(side=16), np.ones((16, 16, 1), np.uint8))  # tissue-like patches
    before = np.asarray(fit_stain(blocks, "macenko").stain_matrix)
    for parts, moved in (("optics", False), ("all", True)):
        out = apply_site_shift(blocks, SiteShift.at(strength, parts))
        after = np.asarray(fit_stain(out, "macenko").stain_matrix)
        angles = [angle_deg(a, b) for a, b in zip(after, before, strict=True)]
        assert (min(angles) > 8 * strength) if moved else (max(angles) < 2.0), (parts, angles)


def test_trust_shift_eval_writes_the_slides_of_each_listed_part(tmp_path, monkeypatch):
    """``--part-list stain`` (without ``all``) writes the stain-only slides: build_parts once
    skipped the first listed part, taking it for ``all``, and the scoring then found no
    ``s=1-stain`` group. A part that does not exist is refused by name."""
    import importlib
    from pathlib import Path

    from cscvision.testing import write_pyramid

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    tse = importlib.import_module("trust_shift_eval")
    monkeypatch.setattr(tse, "PARTS", tse.chosen_parts("stain"))
    source = tmp_path / "id" / "P1.tiff"
    source.parent.mkdir()
    write_pyramid(source, np.kron(_he_image(side=16), np.ones((16, 16, 1), np.uint8)), levels=1)
    groups = {"id": [("P1", source, tmp_path / "P1_labels.png")]}
    tse.build_parts(tmp_path, groups, [1.0])
    assert list(groups) == ["id", "s=1-stain"]
    assert groups["s=1-stain"][0][1].is_file()
    assert tse.chosen_parts("optics,all") == ("all", "optics")
    with pytest.raises(SystemExit, match="no part stian"):
        tse.chosen_parts("stian")

"""Stain vectors and normalisation: known answers on images made from known stains."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cscvision.slides.stain import (
    OD_FIT_MAX,
    StainError,
    StainReference,
    angle_deg,
    concentrations,
    fit_stain,
    normalise_batch,
    optical_density,
    rgb_to_lab,
    rgb_to_lab_np,
    tissue_od,
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
    got_od = optical_density(out.reshape(-1, 3))
    # the tile's 99th percentile is estimated on every 4th pixel: within a few % of the exact
    keep = tissue & (expected_od.max(1) < 2.5)  # below 8-bit saturation
    rel = np.abs(got_od - expected_od)[keep] / np.maximum(expected_od[keep], 0.05)
    assert np.median(rel) < 0.02 and np.percentile(rel, 95) < 0.06
    # and against the generator's concentrations: the normalised tissue OD is the truth's
    truth_od = (conc * scale) @ np.asarray(reference.stain_matrix)
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


def test_the_human_model_card_names_the_template_it_carries():
    from cscvision.models.card import ModelCard
    from cscvision.models.readme import model_readme

    ref = fit_stain(_he_image(H, E, seed=6)[0], "macenko", source="tile A")
    h = ", ".join(f"{c:.3f}" for c in ref.stain_matrix[0])
    card = ModelCard(name="m", backbone="small_cnn", tile_px=64, stain=ref.to_dict())
    line = next(x for x in model_readme(card).splitlines() if "stain normalisation" in x)
    assert "macenko, fitted on tile A" in line and f"H OD ({h})" in line
    assert "fit version 2 (" in line
    old = {**ref.to_dict(), "details": {}}  # a card trained before versions were kept
    text = model_readme(dataclasses.replace(card, stain=old))
    assert "fit version 1 (covariance plane" in text
    assert "stain normalisation: none" in model_readme(dataclasses.replace(card, stain={}))


# --- cscvision stain on the real H&E slide ---------------------------------------------------

SVS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cmu_small_region.svs"


@pytest.mark.skipif(not SVS.exists(), reason="../shared/data/cmu_small_region.svs not present")
def test_stain_fit_on_a_real_slide_agrees_between_methods(tmp_path, capsys):
    """Macenko and Vahadane, independent methods, find nearly the same stains on real H&E;
    haematoxylin lies nearer Ruifrok's haematoxylin than his eosin (and eosin the reverse)."""
    from cscvision.cli import main
    from cscvision.slides.stain import RUIFROK_HE

    refs = {}
    for method in ("macenko", "vahadane"):
        out = tmp_path / f"{method}.json"
        assert main(["stain", "fit", str(SVS), "--out", str(out), "--method", method]) == 0
        refs[method] = StainReference.from_dict(json.loads(out.read_text()))
    (h1, e1), (h2, e2) = (np.asarray(r.stain_matrix) for r in refs.values())
    assert angle_deg(h1, h2) < 3.0 and angle_deg(e1, e2) < 8.0
    for h, e in ((h1, e1), (h2, e2)):
        assert angle_deg(h, RUIFROK_HE[0]) < angle_deg(h, RUIFROK_HE[1])
        assert angle_deg(e, RUIFROK_HE[1]) < angle_deg(e, RUIFROK_HE[0])
    assert refs["macenko"].details["fit"] == refs["vahadane"].details["fit"] == 2
    assert main(["stain", "show", str(tmp_path / "macenko.json")]) == 0
    shown = capsys.readouterr().out
    assert "from Ruifrok's" in shown and "fit: version 2 (" in shown
    old = json.loads((tmp_path / "macenko.json").read_text())
    del old["details"]["fit"]  # a reference fitted before the version was kept
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert main(["stain", "show", str(tmp_path / "old.json")]) == 0
    assert "fit: version 1 (covariance plane" in capsys.readouterr().out


def test_stain_cli_refuses_bad_input_with_a_message(tmp_path, capsys):
    from cscvision.cli import main

    ref = tmp_path / "ref.json"
    ref.write_text("{}")
    assert main(["stain", "show", str(ref)]) == 2
    assert "not a readable stain reference" in capsys.readouterr().err
    assert main(["stain", "fit", str(SVS), "--out", str(ref)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    args = ["stain", "fit", str(SVS), "--out", str(tmp_path / "r.json"), "--region", "1,2,3"]
    assert main(args) == 2
    assert "--region '1,2,3': give X,Y,W,H" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


# --- a faint second stain: another site's stain, shifted as scripts/eval_trust.py shifts it ----


def _site_image(
    stains: np.ndarray, h_scale: float, e_scale: float, seed: int, noise: float = 0.01
) -> np.ndarray:
    """RGB uint8 [128, 128, 3] by Beer-Lambert from ``stains`` (rows H, E) with the nuisances of
    the shifted synthetic slides: dark nuclei (haematoxylin up to ~4 OD units before scaling,
    so × 2.2 clips channels at 8 bits), stroma, mixtures, 10 % glass, OD noise σ ``noise``."""
    rng = np.random.default_rng(seed)
    n = 128 * 128
    kind = rng.choice(4, n, p=[0.25, 0.35, 0.3, 0.1])
    k = [(kind == i).sum() for i in range(3)]
    conc = np.zeros((n, 2))
    conc[kind == 0] = np.c_[rng.gamma(6, 0.3, k[0]), rng.gamma(1, 0.03, k[0])]
    conc[kind == 1] = np.c_[rng.gamma(1, 0.03, k[1]), rng.gamma(6, 0.1, k[1])]
    conc[kind == 2] = rng.gamma(4, 0.12, (k[2], 2))
    od = (conc * [h_scale, e_scale]) @ stains + rng.normal(0, noise, (n, 3))
    return np.clip(np.round(255 * np.exp(-od)), 0, 255).astype(np.uint8).reshape(128, 128, 3)


@pytest.mark.parametrize("method", ["macenko", "vahadane"])
@pytest.mark.parametrize("shifted", [False, True], ids=["unshifted", "faint-eosin"])
def test_a_faint_eosin_beside_a_heavy_haematoxylin_is_recovered_within_two_degrees(method, shifted):
    """The generator's H and E turned 30° towards blue, eosin × 0.4, haematoxylin × 2.2 (the
    stain part of the site shift at s = 3): a fit of the tissue ODs as they come let the
    clipped dark nuclei set the plane and missed eosin by 26-39° on the shifted slides.
    This image pins the two changes together (the OD cap and the plane through the origin):
    either one alone also passes it (review, 2026-12-07); what each does alone is measured
    on the shifted slides by scripts/stain_fit_ablation.py."""
    from cscvision.synth.stain import EOSIN_OD, HAEMATOXYLIN_OD
    from cscvision.synth.stain_shift import rotate_stains

    truth = np.stack([_unit(np.array(HAEMATOXYLIN_OD)), _unit(np.array(EOSIN_OD))])
    h_scale, e_scale = (2.2, 0.4) if shifted else (1.0, 1.0)
    if shifted:
        truth = rotate_stains(truth, 30.0)
    # at OD noise σ 0.01 Macenko's 1st/99th-percentile angles are pushed out by the noise of the
    # faintest eosin pixels: 2.0-2.3° on seeds 0-5 (1.3° unshifted; Vahadane under 1°), so its
    # bar there is 2.5°; before the fix both noise levels gave 32°
    for seed, noise in ((0, 0.005), (1, 0.005), (0, 0.01)):
        image = _site_image(truth, h_scale, e_scale, seed, noise)
        fitted = np.asarray(fit_stain(image, method).stain_matrix)
        angles = [angle_deg(f, t) for f, t in zip(fitted, truth, strict=True)]
        bar = 2.5 if (method, noise) == ("macenko", 0.01) else 2.0
        assert max(angles) < bar, (seed, noise, angles)
    # the amounts stay those of every stained pixel, clipped nuclei too, as normalise_batch
    # scales a tile (the vectors alone are fitted below the OD cap)
    od = tissue_od(image)
    assert (od.max(axis=1) > OD_FIT_MAX).mean() > 0.01
    ref = fit_stain(image, method)
    expected = np.percentile(concentrations(od, np.asarray(ref.stain_matrix)), 99, axis=0)
    np.testing.assert_allclose(ref.max_concentration, expected, rtol=1e-5)

"""Calibration: known answers for temperature scaling, isotonic maps and ECE, and the path
from a trained model's card to calibrated probabilities at inference."""

from __future__ import annotations

import numpy as np
import pytest

from cscvision.models.calibration import (
    calibrate,
    calibration_report,
    clear_truth,
    fit_calibration,
    fit_temperature,
    reliability,
    sigmoid,
)


def overconfident(n: int, temperature: float, seed: int = 0):
    """Logits z whose true probability is sigmoid(z / temperature)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 4, n)
    y = rng.random(n) < sigmoid(z / temperature)
    return z, y


def test_temperature_recovers_the_true_temperature():
    z, y = overconfident(40_000, 2.5)
    assert fit_temperature(z, y) == pytest.approx(2.5, rel=0.05)
    z, y = overconfident(40_000, 0.5, seed=1)  # under-confident logits: T < 1
    assert fit_temperature(z, y) == pytest.approx(0.5, rel=0.05)


def test_ece_known_answer():
    # bins [0, .1) ... [.9, 1]: two tiles at 0.05 (one positive), two at 0.95 (both positive)
    probs = np.array([0.05, 0.05, 0.95, 0.95])
    labels = np.array([0, 1, 1, 1])
    rep = reliability(probs, labels)
    # |0.05 - 0.5| * 2/4 + |0.95 - 1| * 2/4
    assert rep["ece"] == pytest.approx(0.45 * 0.5 + 0.05 * 0.5)
    assert [b["count"] for b in rep["bins"]] == [2, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    assert reliability(np.array([1.0]), np.array([1]))["bins"][-1]["count"] == 1  # p = 1


def test_clear_truth_excludes_mixed_tiles():
    mask, labels = clear_truth(np.array([0.0, 0.05, 0.06, 0.49, 0.5, 1.0]))
    assert mask.tolist() == [True, True, False, False, True, True]
    assert labels[mask].tolist() == [False, False, True, True]


def test_calibration_lowers_ece_and_keeps_the_ranking():
    z, y = overconfident(8_000, 3.0, seed=2)
    soft = y.astype(np.float32)[:, None]
    logits = z[:, None]
    for method in ("temperature", "isotonic"):
        cal = fit_calibration(logits[:4000], soft[:4000], ["t"], method)
        report = calibration_report(logits[4000:], soft[4000:], ["t"], cal)["t"]
        assert report["ece_before"] > 0.1 and report["ece_after"] < 0.03, method
        after = calibrate(logits[4000:], ["t"], cal)[:, 0]
        order = np.argsort(z[4000:])
        assert np.all(np.diff(after[order]) >= -1e-7), "calibration is monotone"
    assert fit_calibration(logits, soft, ["t"], "none") == {}
    with pytest.raises(ValueError, match="calibration method"):
        fit_calibration(logits, soft, ["t"], "platt")


def test_one_class_targets_stay_uncalibrated():
    logits = np.zeros((100, 2))
    soft = np.zeros((100, 2))
    soft[:50, 0] = 1.0
    cal = fit_calibration(logits, soft, ["a", "b"], "temperature")
    assert list(cal["targets"]) == ["a"]  # "b" has no positive tile
    np.testing.assert_allclose(calibrate(logits, ["a", "b"], cal)[:, 1], 0.5)


def test_scorer_applies_the_cards_temperature(tmp_path):
    import dataclasses

    import torch

    from cscvision.inference.predict import TileScorer
    from cscvision.models.card import ModelCard
    from cscvision.models.export import LoadedModel

    class Constant(torch.nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 2), 2.0)

    card = ModelCard(name="c", backbone="small_cnn", tile_px=8)
    image = torch.zeros((3, 3, 8, 8), dtype=torch.uint8)
    plain = TileScorer(LoadedModel(Constant(), card, tmp_path))(image)
    np.testing.assert_allclose(plain, sigmoid(np.full((3, 2), 2.0)), rtol=1e-6)
    cal = {"method": "temperature", "targets": {"stemness": {"temperature": 4.0}}}
    scaled = TileScorer(
        LoadedModel(Constant(), dataclasses.replace(card, calibration=cal), tmp_path)
    )
    got = scaled(image)
    np.testing.assert_allclose(got[:, 0], sigmoid(np.array(0.5)), rtol=1e-6)  # 2 / 4
    np.testing.assert_allclose(got[:, 1], sigmoid(np.array(2.0)), rtol=1e-6)  # not calibrated

"""Confidence thresholds chosen on validation tiles: the rule finds a known step in error,
refuses when uncertainty does not separate, and inference's summary leaves the tiles above
them out of a second set of statistics."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from cscvision.models.card import ModelCard, read_card
from cscvision.models.thresholds import confidence_thresholds
from cscvision.training.confidence import RULE, choose_threshold, tile_errors


def _step(n: int = 2000, at: float = 0.8, seed: int = 0):
    rng = np.random.default_rng(seed)
    std = rng.uniform(0, 1, n)
    wrong = rng.uniform(0, 1, n) < np.where(std > at, 0.5, 0.05)
    return std, wrong.astype(float)


def test_the_threshold_is_where_errors_step_up():
    std, wrong = _step(at=0.8)
    chosen = choose_threshold(std, wrong)
    assert chosen["quantile"] == 0.8 and chosen["std"] == pytest.approx(0.8, abs=0.03)
    assert chosen["error_above"] > 2 * chosen["error_below"]
    assert chosen["share_above"] == pytest.approx(0.2, abs=0.001)
    assert choose_threshold(*_step(at=0.9))["quantile"] == 0.9


def test_no_threshold_when_uncertainty_does_not_separate():
    rng = np.random.default_rng(1)
    chosen = choose_threshold(rng.uniform(size=2000), (rng.uniform(size=2000) < 0.1) * 1.0)
    assert chosen["std"] is None and "separates" in chosen["reason"]
    assert choose_threshold(np.zeros(0), np.zeros(0))["std"] is None


def test_regression_uses_absolute_error():
    rng = np.random.default_rng(2)
    std = rng.uniform(0, 1, 2000)
    error = np.abs(rng.normal(0, np.where(std > 0.85, 3.0, 0.5)))
    chosen = choose_threshold(std, error, regression=True)
    assert chosen["quantile"] == 0.85


def test_tile_errors_call_at_the_cards_threshold_and_skip_unlabelled():
    card = ModelCard(name="m", backbone="small_cnn", targets=("a", "b"),
                     thresholds={"a": 0.3, "b": 0.7})  # fmt: skip
    mean = np.array([[0.4, 0.6], [0.2, 0.8]])
    target = np.array([[1.0, 0.0], [1.0, np.nan]])
    errors = tile_errors(mean, target, card)
    np.testing.assert_array_equal(errors[:, 0], [0, 1])
    assert errors[0, 1] == 0 and np.isnan(errors[1, 1])


def test_infer_leaves_tiles_above_the_threshold_out_of_a_second_set_of_statistics(
    demo_batch, tmp_path
):
    """The demo model copied with a hand-set threshold: the summary's share of tiles above
    it is the share of ``tiles.csv`` rows whose std is above it, and the statistics
    without them cover less tissue."""
    from cscvision.cli import main
    from cscvision.models.export import resolve_model_dir

    model = tmp_path / "model"
    shutil.copytree(resolve_model_dir("demo"), model)
    card = json.loads((model / "model.json").read_text())
    card["confidence"] = {"rule": RULE, "tta": {"stemness": {"std": 0.02}}}
    (model / "model.json").write_text(json.dumps(card))
    slide = demo_batch["slides"][0]
    out = tmp_path / "out"
    code = main(["infer", slide, "--model", str(model), "--out", str(out), "--workers", "0",
                 "--threads", "1", "--uncertainty", "tta"])  # fmt: skip
    assert code == 0
    folder = next(p for p in out.iterdir() if p.is_dir())
    block = json.loads((folder / "summary.json").read_text())["uncertainty"]
    rows = list(csv.DictReader((folder / "tiles.csv").open()))
    above = np.mean([float(r["std_stemness"]) > 0.02 for r in rows])
    assert 0 < above < 1
    assert block["thresholds"] == {"stemness": 0.02}
    assert block["share_of_tiles_above"]["stemness"] == pytest.approx(above, abs=1e-4)
    assert 0 < block["share_of_tissue_left_out"] < 1
    summary = json.loads((folder / "summary.json").read_text())
    without = block["without_uncertain"]
    assert without["analysed_tissue_mm2"] < summary["analysed_tissue_mm2"]
    loaded = read_card(model)
    assert confidence_thresholds(loaded, "tta") == {"stemness": 0.02}
    assert confidence_thresholds(loaded, "mc:5") == {}

"""Regression pieces: losses, correlations, the patient bootstrap, config and card fields."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from cscvision.models.card import ModelCard
from cscvision.training.config import ConfigError, load_config
from cscvision.training.regression import (
    bootstrap_ci,
    pearson,
    pearson_loss,
    regression_metrics,
    spearman,
    standardise_stats,
    target_range,
)
from cscvision.training.tables import check_target_range
from cscvision.training.tilecache import DataError


def test_pearson_loss_is_one_minus_r_per_column():
    torch.manual_seed(0)
    pred, target = torch.randn(50, 2), torch.randn(50, 2)
    target[:, 0] = 3 * pred[:, 0] + 1  # r = 1: loss 0 for that column
    r1 = stats.pearsonr(pred[:, 1].numpy(), target[:, 1].numpy())[0]
    assert float(pearson_loss(pred, target)) == pytest.approx((0 + (1 - r1)) / 2, abs=1e-5)


def test_spearman_matches_scipy_with_ties():
    x = np.array([1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.0])
    y = np.array([2.0, 1.0, 4.0, 3.0, 7.0, 6.0, 6.0, 0.5])
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert np.isnan(pearson(np.ones(5), np.arange(5.0)))


def test_bootstrap_resamples_whole_patients():
    rng = np.random.default_rng(0)
    target = rng.normal(size=200)
    pred = target + rng.normal(scale=0.5, size=200)
    groups = np.repeat(np.arange(10), 20)
    low, high = bootstrap_ci(pred, target, groups, pearson, n_boot=200)
    r = pearson(pred, target)
    assert low < r < high and high - low < 0.3
    assert np.isnan(bootstrap_ci(pred, target, np.zeros(200), pearson)[0])  # one patient
    # identical patients: every resample gives the same r
    same = np.tile(np.arange(5.0), 4)
    low, high = bootstrap_ci(same, same**2, np.repeat(np.arange(4), 5), pearson, n_boot=50)
    assert low == pytest.approx(high)


def test_regression_metrics_names_and_means():
    pred = np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0], [3.0, 1.0]])
    target = np.array([[0.0, 2.0], [1.0, 0.0], [2.0, 4.0], [3.0, 2.0]])
    m = regression_metrics(pred, target, np.array([0, 0, 1, 1]), ("a", "b"), n_boot=20)
    assert m["pearson_a"] == pytest.approx(1.0) and m["pearson_b"] == pytest.approx(1.0)
    assert m["mse_b"] == pytest.approx((1 + 0 + 4 + 1) / 4)
    assert m["pearson_mean"] == pytest.approx(1.0) and m["n_groups"] == 2
    assert {"pearson_a_ci_low", "spearman_b_ci_high"} <= set(m)


def test_standardise_stats():
    mean, std = standardise_stats(np.array([[1.0, 5.0], [3.0, 5.0]]))
    assert mean == [2.0, 5.0] and std[0] == pytest.approx(1.0) and std[1] == pytest.approx(1e-6)


def test_config_task_and_targets():
    cfg = load_config(None, ["task=regression", "targets=[stemness]", "regression.loss=pearson"])
    assert cfg.target_type == "regression" and cfg.targets == ["stemness"]  # 0.1.0's task=
    with pytest.raises(ConfigError, match="target_type 'regresion': input should be"):
        load_config(None, ["task=regresion"])
    assert load_config(None, ["target_type=regression"]).target_type == "regression"
    with pytest.raises(ConfigError, match=r"regression\.loss"):
        load_config(None, ["regression.loss=l1"])


def test_classification_refuses_scores_outside_unit_interval():
    from types import SimpleNamespace

    tiles = SimpleNamespace(slide_id="s", targets=np.array([[0.2, 1.7]], np.float32))
    with pytest.raises(DataError, match="'b' has values outside"):
        check_target_range({"train": [tiles]}, ("a", "b"), "classification")
    check_target_range({"train": [tiles]}, ("a", "b"), "regression")


def test_card_units_and_value_range():
    card = ModelCard(name="m", backbone="small_cnn", targets=("a", "b"))
    assert card.unit("a") == "probability" and card.value_range("a") == (0.0, 1.0)
    reg = ModelCard(
        name="m",
        backbone="small_cnn",
        targets=("a", "b"),
        target_type="regression",
        units={"b": "z"},
        output_scale={"mean": [1.0, 0.0], "std": [2.0, 1.0]},
    )
    assert reg.unit("a") == "score" and reg.unit("b") == "z"
    assert reg.value_range("a") == (-4.0, 6.0)
    assert ModelCard.from_json(reg.to_json()) == reg
    from cscvision.models.readme import model_readme

    text = model_readme(reg)
    assert "continuous score" in text and "test Pearson" in text and "sigmoid" not in text


def test_target_range_and_floor_clip_a_count_density_at_zero():
    # a density never below 0 in training; a z-score that was
    low, high = target_range(np.array([[0.0, -1.5], [250.0, 0.5], [np.nan, 2.0]]))
    assert low == [0.0, -1.5] and high == [250.0, 2.0]
    scale = {"mean": [100.0, 0.0], "std": [80.0, 1.0], "min": low, "max": high}
    card = ModelCard(name="m", backbone="small_cnn", targets=("density", "z"),
                     target_type="regression", output_scale=scale)  # fmt: skip
    assert card.floors() == (0.0, None)
    assert card.value_range("density") == (0.0, 300.0) and card.value_range("z") == (-2.5, 2.5)
    from cscvision.models.kinds import get_kind

    logits = torch.tensor([[-2.0, -2.0], [0.5, 0.5]])  # standardised: 100 - 160 < 0
    out = get_kind("tile").tile_outputs(card, logits)
    np.testing.assert_allclose(out, [[0.0, -2.0], [140.0, 0.5]])
    nan = get_kind("tile").tile_outputs(card, torch.tensor([[float("nan"), 0.0]]))
    assert np.isnan(nan[0, 0])  # an overflowed output stays NaN, not a plausible 0
    from cscvision.models.ensemble import _ensemble_card

    pair = _ensemble_card([card, card])
    assert pair.value_range("density") == card.value_range("density")  # not (0, 1)
    old = ModelCard.from_json(
        {**card.to_json(), "output_scale": {"mean": [100.0, 0.0], "std": [80.0, 1.0]}}
    )
    assert old.floors() == (None, None)  # a card from before the range: unchanged
    np.testing.assert_allclose(get_kind("tile").tile_outputs(old, logits)[0], [-60.0, -2.0])


def test_packaged_panel_config_is_the_default():
    from cscvision.labels.programmes import ProgrammeConfig, load_programme_config

    assert load_programme_config("st_panels") == ProgrammeConfig()

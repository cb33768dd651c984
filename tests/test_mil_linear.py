"""instance_linear MIL: a linear per-tile head whose mean is the slide prediction, fitted in
closed form; the default for regression-only (fraction) labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cscvision.labels.slide_table import LabelSpec, read_slide_labels
from cscvision.models.mil import aggregate, mil_net_from_record, tile_parts
from cscvision.models.mil_net import InstanceLinearMIL
from cscvision.training.config_sections import MILNetConfig
from cscvision.training.mil import (
    Bag,
    BagTargets,
    MILConfig,
    MILError,
    fit_mil,
    predict_bags,
    resolve_architecture,
)
from cscvision.training.mil_cv import cross_validate
from cscvision.training.mil_linear import fit_instance_linear, solve

ROOT = Path(__file__).resolve().parents[1]
DEMO_WEIGHTS = ROOT / "models" / "demo-synthetic" / "model.safetensors"
TRUE_W = np.array([0.8, -0.5, 0.0, 0.3, 0.0, 0.0])
TRUE_B = 0.25


def linear_bags(n_slides: int = 40, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Bags whose label is exactly the mean of ``TRUE_W · x + TRUE_B`` over their tiles; each
    slide has its own feature mean, so the slide means span every direction."""
    rng = np.random.default_rng(seed)
    bags = []
    for _ in range(n_slides):
        n = int(rng.integers(20, 60))
        bags.append(rng.normal(rng.normal(0, 1, len(TRUE_W)), 0.7, (n, len(TRUE_W))))
    labels = np.array([(b @ TRUE_W + TRUE_B).mean() for b in bags])
    return bags, labels


def test_closed_form_fit_recovers_the_true_tile_weights():
    bags, y = linear_bags()
    patients = [f"P{i // 2}" for i in range(len(bags))]
    net = fit_instance_linear(bags, y[:, None], patients)
    w = net.regression.weight.detach().numpy()[0]
    np.testing.assert_allclose(w, TRUE_W, atol=0.01)  # γ shrinks by under 1 %
    assert net.regression.bias.item() == pytest.approx(TRUE_B, abs=0.01)
    exact = fit_instance_linear(bags, y[:, None], patients, gamma=0.0)
    np.testing.assert_allclose(exact.regression.weight.detach().numpy()[0], TRUE_W, atol=1e-3)
    # a noisy label: the weights still land near the truth, the within-slide penalty does
    # not pull them to zero
    noisy = y + np.random.default_rng(1).normal(0, 0.05, len(y))
    w_noisy = fit_instance_linear(bags, noisy[:, None], patients).regression.weight[0]
    np.testing.assert_allclose(w_noisy.detach().numpy(), TRUE_W, atol=0.08)


def test_within_penalty_one_is_the_slide_label_copied_to_every_tile():
    """γ = 1: the solution of least squares over tiles with the slide label on each tile,
    each slide weighted 1/n (the identity the module's docstring rests on)."""
    bags, y = linear_bags(12, seed=3)
    y = y + np.random.default_rng(0).normal(0, 0.3, len(y))
    means = np.stack([b.mean(0) for b in bags])
    within = sum((b - b.mean(0)).T @ (b - b.mean(0)) / len(b) for b in bags)
    w, b = solve(means, y, within, 1e-3, 1.0)
    x = np.concatenate([np.c_[bag, np.ones(len(bag))] for bag in bags])
    sw = np.concatenate([np.full(len(bag), 1 / len(bag)) for bag in bags])
    t = np.concatenate([np.full(len(bag), v) for bag, v in zip(bags, y, strict=True)])
    gram = (x * sw[:, None]).T @ x + np.diag([1e-3] * means.shape[1] + [0.0])
    want = np.linalg.solve(gram, (x * sw[:, None]).T @ t)
    np.testing.assert_allclose(np.r_[w, b], want, atol=1e-8)


def test_slide_prediction_is_exactly_the_mean_of_tile_predictions():
    bags, y = linear_bags(20, seed=2)
    targets = BagTargets(y[:, None], np.zeros((len(y), 0), np.int64), ())
    bag_list = [Bag(f"S{i}", b.astype(np.float32), np.zeros((len(b), 2), np.int64))
                for i, b in enumerate(bags)]  # fmt: skip
    net = fit_mil(bag_list, targets, MILConfig(), [f"P{i}" for i in range(len(bags))])
    assert isinstance(net, InstanceLinearMIL)
    w = net.regression.weight.detach().double().numpy()[0]
    b = float(net.regression.bias)
    for bag, pred in zip(bag_list, predict_bags(net, bag_list), strict=True):
        tile_pred = bag.features.astype(np.float64) @ w + b
        assert pred.regression[0] == pytest.approx(tile_pred.mean(), abs=1e-5)
        np.testing.assert_allclose(pred.attention, 1 / len(tile_pred), rtol=1e-6)
        # the contribution is the tile's share, its prediction less the intercept over N
        np.testing.assert_allclose(pred.contributions[:, 0], (tile_pred - b) / len(tile_pred),
                                   rtol=1e-4, atol=1e-6)  # fmt: skip
        # inference's per-tile split gives the same slide value in label units
        record = {"regression": [{"name": "y", "mean": 2.0, "sd": 3.0}]}
        with torch.no_grad():
            rows = tile_parts(net, torch.as_tensor(bag.features)).numpy()
        out = aggregate(rows, net, record)
        assert out.regression["y"] == pytest.approx(tile_pred.mean() * 3.0 + 2.0, abs=1e-4)


def test_cross_validation_never_lets_the_held_out_labels_in(tmp_path):
    """Held-out predictions do not move when the held-out slides' labels change: neither the
    outer fit nor its inner choice of the penalty sees the test fold."""
    bags, y = linear_bags(30, seed=4)
    ids = [f"S{i:02d}" for i in range(len(bags))]
    patients = [f"P{i // 2:02d}" for i in range(len(bags))]
    bag_list = [Bag(s, b.astype(np.float32), np.zeros((len(b), 2), np.int64))
                for s, b in zip(ids, bags, strict=True)]  # fmt: skip

    def run(values):
        path = tmp_path / "labels.csv"
        lines = ["slide_id,patient_id,y"] + [
            f"{s},{p},{v:.6f}" for s, p, v in zip(ids, patients, values, strict=True)
        ]
        path.write_text("\n".join(lines) + "\n")
        labels = read_slide_labels(
            path, [LabelSpec("y", "regression")], list(zip(ids, patients, strict=True))
        )
        return cross_validate(bag_list, labels, MILConfig(seed=5), k=3)

    first = run(y + np.random.default_rng(0).normal(0, 0.1, len(y)))
    assert first.pooled["pearson_y"]["value"] > 0.9
    fold0 = first.folds == 0
    changed = np.where(fold0, 100.0 * np.random.default_rng(9).random(len(y)), y)
    second = run(np.where(fold0, changed, y + np.random.default_rng(0).normal(0, 0.1, len(y))))
    for i in np.flatnonzero(fold0):
        np.testing.assert_allclose(second.predictions[i].regression,
                                   first.predictions[i].regression, rtol=1e-9)  # fmt: skip
    assert not np.allclose(
        [second.predictions[i].regression[0] for i in np.flatnonzero(~fold0)],
        [first.predictions[i].regression[0] for i in np.flatnonzero(~fold0)],
    )  # the changed labels do reach the folds that train on them


def test_default_architecture_follows_the_label_kind():
    assert MILNetConfig().architecture == "auto" and MILConfig().architecture == "auto"
    assert resolve_architecture("auto", has_classes=False) == "instance_linear"
    assert resolve_architecture("auto", has_classes=True) == "gated_attention"
    assert resolve_architecture("mean", has_classes=False) == "mean"
    with pytest.raises(MILError, match=r"instance_linear fits regression targets only"):
        resolve_architecture("instance_linear", has_classes=True)
    # a regression plus a class target: auto trains gated attention
    targets = BagTargets(np.zeros((4, 1)), np.zeros((4, 1), np.int64), (3,))
    bags = [Bag(f"S{i}", np.ones((3, 5), np.float32), np.zeros((3, 2), np.int64))
            for i in range(4)]  # fmt: skip
    net = fit_mil(bags, targets, MILConfig(epochs=1, hidden=4, attention=2))
    assert not isinstance(net, InstanceLinearMIL) and not net.mean_pool


def test_export_and_load_round_trip(tmp_path):
    from cscvision.core.io import file_sha256
    from cscvision.models.card import ModelCard
    from cscvision.models.export import export_model, load_model

    bags, y = linear_bags(16, seed=6)
    rng = np.random.default_rng(0)
    bags = [rng.normal(0, 1, (len(b), 128)) + b.mean() for b in bags]
    net = fit_instance_linear(bags, np.c_[y], [str(i) for i in range(len(bags))])
    record = {"architecture": "instance_linear", "in_dim": 128, "hidden": 1, "attention": 1,
              "regression": [{"name": "y", "mean": 0.5, "sd": 2.0}]}  # fmt: skip
    encoder = {"name": "demo-cnn", "weights_sha256": file_sha256(DEMO_WEIGHTS), "dim": 128}
    card = ModelCard(
        name="lin", backbone="instance_linear", kind="mil", target_type="rank",
        targets=("attention", "contribution_y"), encoder=encoder, mil=record,
    )  # fmt: skip
    out = export_model(net, card, tmp_path / "model")
    loaded = load_model(out, encoder_weights=DEMO_WEIGHTS)
    mil = loaded.net.mil
    assert isinstance(mil, InstanceLinearMIL)
    for name, value in net.state_dict().items():
        assert torch.equal(mil.state_dict()[name], value)
    rebuilt = mil_net_from_record(record)
    assert set(rebuilt.state_dict()) == {"regression.weight", "regression.bias"}
    x = torch.as_tensor(bags[0], dtype=torch.float32)
    with torch.no_grad():
        want = net(x)[0].item() * 2.0 + 0.5
        got = aggregate(tile_parts(mil, x).numpy(), mil, record).regression["y"]
    assert got == pytest.approx(want, abs=1e-5)

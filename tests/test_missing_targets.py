"""A tile without a label for one target (NaN: e.g. a marker whose registration was refused)
still trains the targets it has: the missing target is masked out of the loss and metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cscvision.training.data import pos_weight, sample_weights
from cscvision.training.lit import TileClassifier, evaluate, slide_means
from cscvision.training.regression import (
    TileRegressor,
    pearson_loss,
    regression_metrics,
    standardise_stats,
)

torch.set_num_threads(1)
NAN = math.nan


def _bce(x: float, y: float, pw: float = 1.0) -> float:
    p = 1 / (1 + math.exp(-x))
    return -(pw * y * math.log(p) + (1 - y) * math.log(1 - p))


def test_a_target_missing_from_the_whole_batch_gives_the_loss_of_the_present_one():
    module = TileClassifier(targets=("a", "b"))
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0], [-2.0, 0.0]])
    target = torch.tensor([[1.0, NAN], [0.25, NAN], [0.0, NAN]])
    alone = np.mean([_bce(2.0, 1.0), _bce(0.5, 0.25), _bce(-2.0, 0.0)])
    assert float(module._loss(logits, target)) == pytest.approx(alone, rel=1e-6)
    weight = torch.tensor([3.0, 1.0, 0.0])
    weighted = (3 * _bce(2.0, 1.0) + _bce(0.5, 0.25)) / 4
    assert float(module._loss(logits, target, weight)) == pytest.approx(weighted, rel=1e-6)
    # with pos_weight, the present target's own weight applies, the missing one's not at all
    module = TileClassifier(targets=("a", "b"), pos_weight=[4.0, 9.0])
    alone = np.mean([_bce(2.0, 1.0, 4), _bce(0.5, 0.25, 4), _bce(-2.0, 0.0, 4)])
    assert float(module._loss(logits, target)) == pytest.approx(alone, rel=1e-6)


def test_a_partly_missing_target_counts_each_known_label_once():
    module = TileClassifier(targets=("a", "b"))
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    target = torch.tensor([[1.0, 0.0], [0.25, NAN]])
    known = [_bce(2.0, 1.0), _bce(-1.0, 0.0), _bce(0.5, 0.25)]
    assert float(module._loss(logits, target)) == pytest.approx(np.mean(known), rel=1e-6)
    full = torch.tensor([[1.0, 0.0], [0.25, 1.0]])  # nothing missing: the plain mean
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits, full)
    assert float(module._loss(logits, full)) == pytest.approx(float(plain), rel=1e-6)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("task", ["classification", "mse", "pearson"])
def test_a_step_on_tiles_with_missing_targets_has_finite_gradients(task):
    """NaN must not leak into the gradient (one NaN step ruins the weights), and the
    missing target's output gets no gradient from the tiles that lack it."""
    torch.manual_seed(0)
    if task == "classification":
        module = TileClassifier(targets=("a", "b"), augment="none", backbone="small_cnn")
    else:
        module = TileRegressor(targets=("a", "b"), augment="none", loss=task)
    module.eval()
    image = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    target = torch.tensor([[1.0, NAN], [0.0, NAN], [0.7, NAN], [0.2, NAN]])
    loss = module.training_step({"image": image, "target": target}, 0)
    loss.backward()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert math.isfinite(float(loss.detach())) and grads
    assert all(torch.isfinite(g).all() for g in grads)
    head = [m for m in module.net.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert float(head.weight.grad[1].abs().sum()) == 0.0  # "b" learns nothing here
    assert float(head.weight.grad[0].abs().sum()) > 0.0


def test_regression_losses_leave_missing_values_out():
    g = np.random.default_rng(5)
    pred, target = g.normal(size=(6, 2)), g.normal(size=(6, 2))
    target[[1, 4], 1] = np.nan
    tp, tt = torch.tensor(pred, dtype=torch.float32), torch.tensor(target, dtype=torch.float32)
    module = TileRegressor(targets=("a", "b"), target_mean=[0.0, 0.0], target_std=[1.0, 1.0])
    sq = (pred - target) ** 2
    assert float(module._loss(tp, tt)) == pytest.approx(np.nanmean(sq), rel=1e-5)
    keep = ~np.isnan(target[:, 1])
    r = [np.corrcoef(pred[:, 0], target[:, 0])[0, 1],
         np.corrcoef(pred[keep, 1], target[keep, 1])[0, 1]]  # fmt: skip
    assert float(pearson_loss(tp, tt)) == pytest.approx(1 - np.mean(r), rel=1e-5)
    tt[:, 1] = NAN  # a column with no label at all: the loss of the other column
    assert float(pearson_loss(tp, tt)) == pytest.approx(1 - r[0], rel=1e-5)
    mean, std = standardise_stats(np.array([[1.0, NAN], [3.0, 2.0], [5.0, NAN]]))
    assert mean == pytest.approx([3.0, 2.0]) and std == pytest.approx([math.sqrt(8 / 3), 1e-6])
    metrics = regression_metrics(pred, target, np.arange(6), ("a", "b"), n_boot=0)
    assert metrics["pearson_b"] == pytest.approx(r[1]) and metrics["n_tiles"] == 6


def test_metrics_count_each_target_on_the_tiles_that_have_it():
    probs = torch.tensor([[0.9, 0.9], [0.2, 0.1], [0.8, 0.2], [0.1, 0.95]])
    targets = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, NAN], [0.0, NAN]])
    slide_idx = torch.tensor([0, 0, 1, 1])
    out = evaluate(probs, targets, slide_idx, ("a", "b"), thresholds=[0.5, 0.5])
    # b's unlabelled tiles would make its AUROC 0.5 if they were counted as negative
    assert out["auroc_a"] == pytest.approx(1.0) and out["auroc_b"] == pytest.approx(1.0)
    means = slide_means(targets, slide_idx)
    np.testing.assert_allclose(means.numpy(), [[0.5, 0.5], [0.5, NAN]])


def test_class_balance_counts_only_labelled_tiles():
    targets = np.array([[1.0, NAN], [0.0, 1.0], [0.0, 0.0], [0.0, NAN]])
    np.testing.assert_allclose(pos_weight(targets), [3.0, 1.0])
    np.testing.assert_allclose(sample_weights(targets), [3.0, 1.0, 1.0, 1.0])


def test_a_head_trains_both_targets_when_one_is_missing_on_most_tiles():
    """Known answer through Lightning: target a is x0 > 0, b is x1 > 0; b is missing on
    three quarters of the training tiles and on half the validation tiles. Both are
    learnt (NaN would otherwise poison every weight), and b is scored on its own tiles."""
    import lightning as L

    from cscvision.models.heads import make_head
    from cscvision.training.data import SlideTiles
    from cscvision.training.featuredata import FeatureDataModule

    L.seed_everything(0, workers=False)
    g = np.random.default_rng(0)

    def tiles(name: str, split: str, n: int, missing: float):
        x = g.normal(size=(n, 8)).astype(np.float32)
        y = (x[:, :2] > 0).astype(np.float32)
        y[: int(missing * n), 1] = np.nan
        xy = np.stack([np.arange(n), np.zeros(n)], axis=1).astype(np.int64)
        return SlideTiles(name, name, split, name, None, None, xy, y, np.ones(n)), x

    train, xt = tiles("t", "train", 800, 0.75)
    val, xv = tiles("v", "val", 300, 0.5)
    dm = FeatureDataModule(slides={"train": [train], "val": [val]},
                           features={"t": xt, "v": xv}, batch_size=64, seed=0)  # fmt: skip
    assert len(dm.datasets["train"]) == 800
    module = TileClassifier(net=make_head("linear", 8, 2), targets=("a", "b"), lr=0.05,
                            scheduler="none", inputs="features")  # fmt: skip
    trainer = L.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    metrics = module.last_metrics["val"]
    assert metrics["auroc_a"] > 0.95 and metrics["auroc_b"] > 0.95, metrics
    assert math.isfinite(metrics["loss"]) and metrics["n_tiles"] == 300

"""A tile-label table's ``weight`` column: read, carried with its tiles, and counted in the
training loss (BCE, MSE, Pearson) as each tile's share."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
from conftest import tissue_like
from torchmetrics.functional.classification import binary_auroc

from cscvision.labels.cohort import CohortEntry
from cscvision.labels.table import LabelTable, LabelTableError, read_label_table, write_label_table
from cscvision.models.heads import make_head
from cscvision.slides.grid import GridSpec
from cscvision.slides.slide import open_slide, plan_read
from cscvision.testing import write_pyramid
from cscvision.training.data import (
    SlideTiles,
    TileBatchDataset,
    split_summary,
    subsample,
)
from cscvision.training.featuredata import FeatureDataModule
from cscvision.training.lit import TileClassifier
from cscvision.training.regression import TileRegressor, pearson_loss
from cscvision.training.tilecache import table_tiles

torch.set_num_threads(1)


def _bce(x: float, y: float) -> float:
    p = 1 / (1 + math.exp(-x))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_weighted_bce_is_each_tiles_target_mean_counted_by_its_weight():
    module = TileClassifier(targets=("a", "b"))
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0], [-2.0, 0.0]])
    target = torch.tensor([[1.0, 0.0], [0.25, 1.0], [1.0, 0.5]])
    weight = torch.tensor([3.0, 1.0, 0.0])
    per_tile = [(_bce(2.0, 1.0) + _bce(-1.0, 0.0)) / 2, (_bce(0.5, 0.25) + _bce(3.0, 1.0)) / 2]
    expected = (3 * per_tile[0] + 1 * per_tile[1]) / 4  # the weight-0 tile counts for nothing
    assert float(module._loss(logits, target, weight)) == pytest.approx(expected, rel=1e-6)
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert float(module._loss(logits, target)) == pytest.approx(float(plain), rel=1e-6)
    assert float(module._loss(logits, target, torch.zeros(3))) == 0.0


def test_weighted_mse_and_pearson_equal_the_formula_and_replicated_tiles():
    g = np.random.default_rng(3)
    pred, target = g.normal(size=(7, 2)), g.normal(size=(7, 2))
    weight = np.array([2, 1, 1, 3, 1, 1, 1], float)
    tp, tt, tw = (torch.tensor(a, dtype=torch.float32) for a in (pred, target, weight))
    module = TileRegressor(targets=("a", "b"), target_mean=[0.0, 0.0], target_std=[1.0, 1.0])
    mse = (weight * ((pred - target) ** 2).mean(axis=1)).sum() / weight.sum()
    assert float(module._loss(tp, tt, tw)) == pytest.approx(mse, rel=1e-5)
    r = [np.cov(pred[:, j], target[:, j], aweights=weight) for j in range(2)]
    r = [c[0, 1] / math.sqrt(c[0, 0] * c[1, 1]) for c in r]
    assert float(pearson_loss(tp, tt, tw)) == pytest.approx(1 - np.mean(r), rel=1e-5)
    # integer weights are the same as repeating the tiles
    rows = np.repeat(np.arange(7), weight.astype(int))
    tp_rep, tt_rep = tp[rows], tt[rows]
    assert float(pearson_loss(tp, tt, tw)) == pytest.approx(float(pearson_loss(tp_rep, tt_rep)))
    assert float(module._loss(tp, tt, tw)) == pytest.approx(float(module._loss(tp_rep, tt_rep)))


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_the_training_step_counts_a_batchs_weights(task):
    """A tile of weight 0 changes nothing: the step's loss is that of the other tiles."""
    torch.manual_seed(0)
    kind = TileClassifier if task == "classification" else TileRegressor
    module = kind(targets=("a",), augment="none")
    module.eval()  # no dropout or batch statistics: the two steps see one network
    image = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    target = torch.tensor([[1.0], [0.0], [0.7]])

    def step(**batch) -> float:
        return float(module.training_step(batch, 0).detach())

    both = step(image=image, target=target, weight=torch.tensor([1.0, 0.0, 2.0]))
    assert both == pytest.approx(step(image=image[[0, 2, 2]], target=target[[0, 2, 2]]), rel=1e-5)
    assert both != pytest.approx(step(image=image, target=target))


@pytest.mark.parametrize(
    "case", ["all weights 0", "one weighted tile", "constant column", "one tile"]
)
def test_pearson_loss_gradients_stay_finite_on_degenerate_batches(case):
    """A zero variance must give a zero gradient, not NaN (one NaN step ruins the weights)."""
    g = torch.Generator().manual_seed(0)
    n = 1 if case == "one tile" else 6
    pred = torch.randn(n, 2, generator=g).requires_grad_()
    target, weight = torch.randn(n, 2, generator=g), torch.ones(n)
    if case == "all weights 0":
        weight = torch.zeros(n)
    elif case == "one weighted tile":
        weight = torch.tensor([0.0, 0, 3, 0, 0, 0])
    elif case == "constant column":
        target[:, 1] = 0.5
    loss = pearson_loss(pred, target, weight)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    path = write_pyramid(folder / "s1.tif", tissue_like(512, 512, seed=1), mpp=0.5, levels=1)
    with open_slide(path) as s:
        plan = plan_read(s.info, mpp=1.0, tile_px=32)
    return path, plan


def _write_table(path, weight_cells: list[str]) -> None:
    n = len(weight_cells)
    table = LabelTable(
        slide_id="s1",
        xy_l0=np.array([[64 * i, 64] for i in range(n)], np.int64),
        targets=("stemness",),
        values=np.zeros((n, 1), np.float32),
        tile_px=32,
        mpp=1.0,
        source="st",
        weight=np.ones(n, np.float32),
    )
    write_label_table(path, table)
    lines = path.read_text().splitlines()
    body = [
        ",".join([*line.split(",")[:-1], cell])
        for line, cell in zip(lines[1:], weight_cells, strict=True)
    ]
    path.write_text("\n".join([lines[0], *body]) + "\n")


@pytest.mark.parametrize("cell", ["-1", "nan", "inf"])
def test_a_weight_that_is_negative_or_not_finite_names_the_file_and_line(tmp_path, cell):
    path = tmp_path / "s1.labels.csv"
    _write_table(path, ["1", "0.5", cell])
    # a negative weight is out of range; NaN and inf are refused as non-finite like every column
    line4 = rf"weight '{cell}'" if cell == "-1" else rf"column 'weight' holds '{cell}'"
    with pytest.raises(LabelTableError, match=rf"s1\.labels\.csv: line 4: {line4}"):
        read_label_table(path)
    _write_table(path, ["1", "0", "2.5"])
    assert read_label_table(path).weight.tolist() == [1.0, 0.0, 2.5]


def test_table_tiles_keep_each_tiles_weight_when_rows_are_dropped(slide, tmp_path):
    path, _ = slide
    n = 5
    table = LabelTable(
        slide_id="s1",
        xy_l0=np.array([[64 * i, 0] for i in range(n)], np.int64),
        targets=("stemness",),
        values=np.array([[0.1], [np.nan], [0.3], [0.4], [0.5]], np.float32),
        tile_px=32,
        mpp=1.0,
        source="st",
        weight=np.array([1, 2, 3, 4, 5], np.float32),
        valid=np.array([True, True, False, True, True]),
    )
    labels = write_label_table(tmp_path / "s1.labels.csv", table)
    entry = CohortEntry("s1", "p1", path, label_path=labels)
    tiles = table_tiles(entry, split="train", spec=GridSpec(mpp=1.0, tile_px=32),
                        targets=["stemness"])  # fmt: skip
    assert tiles.xy_l0[:, 0].tolist() == [0, 192, 256] and tiles.n_excluded == 2
    assert tiles.weight.tolist() == [1.0, 4.0, 5.0]
    fewer = subsample(tiles, 2, seed=0)
    np.testing.assert_array_equal(fewer.weight, fewer.xy_l0[:, 0] / 64 + 1)


def _tiles(xy: np.ndarray, weight: np.ndarray | None, plan=None, path="x") -> SlideTiles:
    return SlideTiles("s", "p", "train", str(path), plan, None, xy,
                      np.zeros((len(xy), 1), np.float32), np.ones(len(xy), np.float32),
                      weight=weight)  # fmt: skip


def test_batches_carry_each_tiles_weight_after_the_read_order_sort(slide):
    path, plan = slide
    xy = np.array([[x, y] for y in (0, 96, 192) for x in (0, 96, 192)], np.int64)
    weight = (xy[:, 0] + 10 * xy[:, 1]).astype(np.float32)  # a function of the tile
    unweighted = _tiles(xy, None, plan, path)
    ds = TileBatchDataset.from_slides([_tiles(xy, weight, plan, path), unweighted])
    batch = ds.__getitems__([17, 3, 12, 0, 8])  # read in (slide, y, x) order, not this one
    xy_b, w_b = batch["xy"].numpy(), batch["weight"].numpy()
    expected = np.where(batch["slide_idx"].numpy() == 0, xy_b[:, 0] + 10 * xy_b[:, 1], 1.0)
    np.testing.assert_array_equal(w_b, expected)  # the unweighted slide's tiles count once
    assert "weight" not in TileBatchDataset.from_slides([unweighted]).__getitems__([0, 1])
    summary = split_summary({"train": [_tiles(xy, weight)]}, {"train": ds})
    assert summary["train"]["zero_weight_tiles"] == 1  # the tile at (0, 0)
    assert summary["train"]["tile_weight_sum"] == float(weight.sum())


def _poisoned(seed: int, weighted: bool) -> tuple[dict, dict]:
    """Clean tiles (label = x0 > 0) and three times as many with the label flipped; the
    flipped ones carry weight 0 when ``weighted``."""
    g = np.random.default_rng(seed)
    clean, flipped = g.normal(size=(200, 8)), g.normal(size=(600, 8))
    x = np.concatenate([clean, flipped]).astype(np.float32)
    y = np.concatenate([clean[:, 0] > 0, flipped[:, 0] <= 0]).astype(np.float32)[:, None]
    w = np.r_[np.ones(200), np.zeros(600)].astype(np.float32) if weighted else None
    xy = np.stack([np.arange(len(x)), np.zeros(len(x))], axis=1).astype(np.int64)
    train = SlideTiles("t", "p", "train", "t", None, None, xy, y, np.ones(len(x)), weight=w)
    test_x = g.normal(size=(300, 8)).astype(np.float32)
    test_y = (test_x[:, :1] > 0).astype(np.float32)
    test = SlideTiles("v", "q", "val", "v", None, None, xy[:300], test_y, np.ones(300))
    return {"train": [train], "val": [test]}, {"t": x, "v": test_x}


@pytest.mark.parametrize("weighted", [True, False])
def test_a_head_learns_from_the_weighted_tiles_only(weighted):
    """Known answer: with weight 0 on the flipped tiles the head learns the clean rule
    (held-out AUROC near 1); counting them, it learns the flipped one (near 0)."""
    L.seed_everything(0, workers=False)
    slides, features = _poisoned(0, weighted)
    dm = FeatureDataModule(slides=slides, features=features, batch_size=64, seed=0)
    module = TileClassifier(net=make_head("linear", 8, 1), targets=("stemness",), lr=0.05,
                            scheduler="none", inputs="features")  # fmt: skip
    trainer = L.Trainer(max_epochs=15, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    with torch.no_grad():
        scores = module.net(torch.from_numpy(features["v"]))[:, 0]
    truth = torch.from_numpy(slides["val"][0].targets[:, 0]).long()
    auroc = float(binary_auroc(scores, truth))
    assert auroc > 0.95 if weighted else auroc < 0.1, auroc

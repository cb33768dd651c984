"""End to end on synthetic Visium: synth --visium → labels st → train (regression) → infer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("scanpy")

from cscvision.cli import main as cli_main
from cscvision.inference.predict import TileScorer, predict_slide
from cscvision.labels.table import read_label_table
from cscvision.models.export import load_model
from cscvision.outputs.slide_folder import write_slide_outputs
from cscvision.slides.slide import open_slide, plan_read
from cscvision.synth import write_cohort
from cscvision.training.regression import pearson
from cscvision.training.train import load_config, train

ROOT = Path(__file__).resolve().parents[1]


def _spot_predictions(model, slide_path, table) -> np.ndarray:
    with open_slide(slide_path) as slide:
        plan = plan_read(slide.info, mpp=table.mpp, tile_px=table.tile_px)
        tiles = np.stack([slide.read_tile(tuple(xy), plan) for xy in table.xy_l0])
    return TileScorer(model)(torch.from_numpy(tiles).permute(0, 3, 1, 2))


@pytest.mark.slow
def test_regression_learns_panel_scores_and_writes_continuous_outputs(tmp_path):
    torch.set_num_threads(1)
    cohort = write_cohort(
        tmp_path / "c", n_slides=6, n_patients=6, size_px=2560, seed=5, visium=True
    )
    panels = tmp_path / "panels.yaml"
    panels.write_text("tile_px: 56\nmpp: 2.0\n")
    labels = tmp_path / "labels"
    args = ["labels", "st", str(cohort), "--panels", str(panels), "--out", str(labels)]
    assert cli_main(args) == 0
    cfg = load_config(
        None,
        [
            f"cohort.csv={labels / 'cohort.csv'}", "task=regression", "name=st_test",
            f"run_dir={tmp_path / 'run'}", f"export_dir={tmp_path / 'model'}",
            "grid.mpp=2.0", "grid.tile_px=56", "grid.mask_mpp=8.0", "threads=1",
            "model.backbone=small_cnn", "cohort.split_fractions=[0.5,0.25,0.25]",
            "data.batch_size=32", "data.num_workers=0", "data.augment=flips",
            "optim.lr=0.003", "optim.scheduler=onecycle", "trainer.max_epochs=8",
            "trainer.accelerator=cpu", "regression.bootstrap=100", "card.synthetic=true",
        ],
    )  # fmt: skip
    result = train(cfg, progress=False)
    assert {"pearson_stemness", "spearman_immunosuppressive"} <= set(result.metrics["test"])
    assert result.thresholds == {}
    model = load_model(result.model_dir)
    assert model.card.target_type == "regression" and model.card.unit("stemness") == "score"

    # it learned: on a training slide's spots, predictions follow the measured scores
    splits = dict(
        r.split(",")[::2] for r in (tmp_path / "run" / "splits.csv").read_text().split()[1:]
    )
    slide_id = sorted(s for s, split in splits.items() if split == "train")[0]
    slide_path = cohort.parent / f"{slide_id}.tiff"
    table = read_label_table(labels / f"{slide_id}.labels.csv")
    predicted = _spot_predictions(model, slide_path, table)
    for j, target in enumerate(table.targets):
        assert pearson(predicted[:, j], table.values[:, j]) > 0.5, target

    # continuous outputs: scores, colour bar in score units, no threshold outlines or areas
    pred = predict_slide(slide_path, model, progress=False)
    folder = tmp_path / "out" / slide_id
    summary = write_slide_outputs(pred, folder, model.card)
    assert summary["targets"]["stemness"]["unit"] == "score"
    assert "no threshold" in summary["thresholded_statistics"]
    # the viewer draws the map over the card's span, not 0-1 (else all of it is saturated)
    assert summary["targets"]["stemness"]["value_range"] == list(model.card.value_range("stemness"))
    assert (folder / "overlay_stemness.png").exists()
    assert (folder / f"{slide_id}_likelihood_map_immunosuppressive.tif").exists()
    kinds = {
        json.loads(line.rstrip(","))["properties"]["objectType"]
        for line in (folder / f"{slide_id}.geojson").read_text().splitlines()
        if '"objectType"' in line
    }
    assert kinds == {"tile"}


@pytest.mark.slow
def test_a_regression_head_on_stored_features_learns_panel_scores(tmp_path):
    """task: regression with model.encoder: spot tiles at the encoder's geometry, a linear
    head on demo-cnn features, exported with its encoder and scored through it."""
    torch.set_num_threads(1)
    cohort = write_cohort(
        tmp_path / "c", n_slides=6, n_patients=6, size_px=2560, seed=5, visium=True
    )
    panels = tmp_path / "panels.yaml"
    panels.write_text("tile_px: 224\nmpp: 0.5\n")  # demo-cnn's tiles
    labels = tmp_path / "labels"
    args = ["labels", "st", str(cohort), "--panels", str(panels), "--out", str(labels)]
    assert cli_main(args) == 0
    weights = ROOT / "models" / "demo-synthetic" / "model.safetensors"
    cfg = load_config(
        None,
        [
            f"cohort.csv={labels / 'cohort.csv'}", "task=regression", "name=st_head",
            f"run_dir={tmp_path / 'run'}", f"export_dir={tmp_path / 'model'}",
            "grid.mask_mpp=8.0", "threads=1", "model.encoder=demo-cnn",
            f"model.weights={weights}", "model.head=linear",
            f"model.features_dir={tmp_path / 'features'}",
            "cohort.split_fractions=[0.5,0.25,0.25]", "data.batch_size=32",
            "data.num_workers=0", "optim.lr=0.01", "trainer.max_epochs=30",
            "trainer.accelerator=cpu", "trainer.precision=32-true", "regression.bootstrap=100",
            "card.synthetic=true",
        ],
    )  # fmt: skip
    result = train(cfg, progress=False)
    assert {"pearson_stemness", "pearson_immunosuppressive"} <= set(result.metrics["test"])
    model = load_model(result.model_dir)
    card = model.card
    assert card.target_type == "regression" and card.kind == "head"
    assert card.encoder["name"] == "demo-cnn"
    assert set(card.output_scale) == {"mean", "std", "min", "max"} and result.thresholds == {}
    splits = dict(
        r.split(",")[::2] for r in (tmp_path / "run" / "splits.csv").read_text().split()[1:]
    )
    slide_id = sorted(s for s, split in splits.items() if split == "train")[0]
    table = read_label_table(labels / f"{slide_id}.labels.csv")
    predicted = _spot_predictions(model, cohort.parent / f"{slide_id}.tiff", table)
    for j, target in enumerate(table.targets):
        assert pearson(predicted[:, j], table.values[:, j]) > 0.5, target

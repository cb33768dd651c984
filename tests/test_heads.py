"""Heads trained on stored features: ``cscvision train`` with ``model.encoder``, the export
that names its encoder, and ``cscvision infer --model DIR --encoder-weights FILE``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cscvision.cli import main
from cscvision.core.io import file_sha256
from cscvision.features.store import read_feature_store
from cscvision.models.encoders import save_random_weights
from cscvision.models.export import ModelError, load_model
from cscvision.models.heads import EncoderHead
from cscvision.testing import write_toy_cohort
from cscvision.training.config import ConfigError, load_config
from cscvision.training.train import train

torch.set_num_threads(1)


def head_overrides(csv: Path, root: Path, weights: Path, *extra: str) -> list[str]:
    return [
        f"cohort.csv={csv}",
        "cohort.split_fractions=[0.5, 0.25, 0.25]",
        "name=toy_head",
        f"run_dir={root / 'run'}",
        f"export_dir={root / 'model'}",
        "grid.mpp=2.0",  # replaced by the encoder's 0.5 µm/px
        "grid.tile_px=32",  # and 224 px
        "grid.mask_mpp=4.0",
        "model.encoder=test-vit-tiny",
        f"model.weights={weights}",
        "model.head=linear",
        f"model.features_dir={root.parent / 'features'}",
        "data.batch_size=16",
        "data.num_workers=0",
        "optim.lr=0.01",
        "trainer.max_epochs=4",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.log_every_n_steps=1",
        "threads=1",
        "card.synthetic=true",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    csv = write_toy_cohort(root / "toy", n_slides=4, n_patients=4, size_px=1280, seed=2)
    weights = save_random_weights("test-vit-tiny", root / "tiny.safetensors")
    cfg = load_config(None, head_overrides(csv, root / "a", weights))
    return csv, weights, root, train(cfg, progress=False)


def test_head_training_exports_a_card_naming_the_encoder(trained):
    _, weights, root, result = trained
    card = json.loads((result.model_dir / "model.json").read_text())
    assert card["backbone"] == "linear" and (card["tile_px"], card["mpp"]) == (224, 0.5)
    encoder = card["encoder"]
    assert encoder["name"] == "test-vit-tiny" and encoder["dim"] == 192
    assert encoder["weights_sha256"] == file_sha256(weights)
    assert encoder["weights_file"] == str(weights)
    head = load_file(str(result.model_dir / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in head.items()} == {"0.weight": (2, 192), "0.bias": (2,)}
    assert "auroc_stemness" in result.metrics["val"]
    stores = sorted((root / "features").glob("*.h5"))
    assert len(stores) == 4  # one per slide of every split
    assert read_feature_store(stores[0]).encoder == "test-vit-tiny"


def test_a_second_run_reuses_the_stored_features(trained):
    csv, weights, root, _ = trained
    stores = {p: p.stat().st_mtime_ns for p in (root / "features").glob("*.h5")}
    cfg = load_config(None, head_overrides(csv, root / "b", weights, "model.head=mlp"))
    result = train(cfg, progress=False)
    assert {p: p.stat().st_mtime_ns for p in stores} == stores  # nothing re-extracted
    assert json.loads((result.model_dir / "model.json").read_text())["backbone"] == "mlp"


def test_loaded_head_model_scores_tiles_through_encoder_and_head(trained):
    _, weights, _, result = trained
    model = load_model(result.model_dir, encoder_weights=weights)
    assert isinstance(model.net, EncoderHead)
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        expected = model.net.head(model.net.encoder(x))
        assert torch.allclose(model.net(x), expected)
    assert load_model(result.model_dir).card.encoder["name"] == "test-vit-tiny"  # file kept


def test_infer_with_encoder_weights_writes_every_output(trained, tmp_path, capsys):
    csv, weights, _, result = trained
    slide = sorted(csv.parent.glob("*.tif"))[0]
    args = ["infer", str(slide), "--model", str(result.model_dir), "--out", str(tmp_path)]
    assert main([*args, "--encoder-weights", str(weights), "--workers", "0", "--threads", "1"]) == 0
    folder = tmp_path / slide.stem
    for name in ("tiles.csv", "maps.npz", "summary.json", f"{slide.stem}.geojson"):
        assert (folder / name).is_file(), name
    assert list(folder.glob("overlay_*.png")) and list(folder.glob("*_likelihood_map_*.tif"))
    capsys.readouterr()
    other = save_random_weights("test-vit-tiny", tmp_path / "other.safetensors", seed=5)
    assert main([*args, "--encoder-weights", str(other), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "differ from the ones model 'toy_head' was trained on" in err and str(other) in err


def test_a_head_without_its_encoder_file_says_what_to_pass(trained, tmp_path):
    result = trained[3]
    card = json.loads((result.model_dir / "model.json").read_text())
    card["encoder"]["weights_file"] = str(tmp_path / "moved.safetensors")
    moved = tmp_path / "model"
    moved.mkdir()
    (moved / "model.json").write_text(json.dumps(card))
    (moved / "model.safetensors").write_bytes((result.model_dir / "model.safetensors").read_bytes())
    with pytest.raises(ModelError, match="head on encoder test-vit-tiny: pass --encoder-weights"):
        load_model(moved)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.encoder=unii", "model.encoder: unknown encoder 'unii'"),
        ("model.head=transformer", "model.head 'transformer': input should be 'linear' or 'mlp'"),
        ("model.weights=", "model.weights: name the local weights file"),
    ],
)
def test_bad_head_configs_name_the_key(override, message, tmp_path):
    base = head_overrides(tmp_path / "c.csv", tmp_path, tmp_path / "w.safetensors", override)
    with pytest.raises(ConfigError, match=message):
        load_config(None, base)


def test_head_learns_separable_features():
    """Known answer: a linear head on features that separate the classes reaches AUROC 1."""
    from cscvision.models.heads import make_head

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    y = (x[:, :2] > 0).float()
    head = make_head("linear", 16, 2)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(head(x), y).backward()
        opt.step()
    from torchmetrics.functional.classification import binary_auroc

    scores = head(x).detach()
    assert all(float(binary_auroc(scores[:, t], y[:, t].long())) > 0.99 for t in range(2))
    assert np.isfinite(scores.numpy()).all()


@pytest.mark.slow
def test_linear_head_on_demo_cnn_features_reaches_auroc_09_on_held_out_patients(tmp_path):
    """The issue's road at a third of the demo's size: ``cscvision features`` with the
    demo-cnn test encoder, then a linear head (``configs/cpu_head_demo.yaml``), held-out tile
    AUROC ≥ 0.9 on both targets (0.99 on seeds 1-3). Seed 1: every slide is new to the
    encoder too. scripts/proof_heads.py prints the demo-sized run (16 slides, 4096 px)."""
    from cscvision.synth import write_cohort

    root = Path(__file__).resolve().parents[1]
    cohort = write_cohort(tmp_path / "cohort", n_slides=8, n_patients=8, size_px=3072, seed=1)
    weights = root / "models" / "demo-synthetic" / "model.safetensors"
    flags = ["--encoder", "demo-cnn", "--weights", str(weights), "--threads", "1"]
    assert main(["features", str(cohort), *flags, "--out", str(tmp_path / "features")]) == 0
    overrides = [
        f"cohort.csv={cohort}",
        f"model.weights={weights}",
        f"model.features_dir={tmp_path / 'features'}",
        f"run_dir={tmp_path / 'run'}",
        f"export_dir={tmp_path / 'model'}",
    ]
    result = train(load_config(root / "configs" / "cpu_head_demo.yaml", overrides), progress=False)
    test = result.metrics["test"]
    assert result.summary["test"]["patients"] == 2
    assert test["auroc_stemness"] >= 0.9 and test["auroc_immunosuppressive"] >= 0.9, test


def test_a_regression_head_predicts_in_score_units():
    """Known answer: the head's standardised output z becomes mean + std · z."""
    from cscvision.training.regression import TileRegressor

    head = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    module = TileRegressor(net=head, targets=("a", "b"), target_mean=[10.0, -1.0],
                           target_std=[2.0, 0.5], augment="none", inputs="features")  # fmt: skip
    z = torch.tensor([[0.0, 1.0], [1.5, -2.0]])
    batch = {"features": z, "xy": torch.zeros(2, 2), "slide_idx": torch.zeros(2)}
    with torch.no_grad():  # as in Trainer.predict
        values = module.predict_step(batch, 0)["probs"]
    np.testing.assert_allclose(values.numpy(), [[10.0, -0.5], [13.0, -2.0]])
    target = torch.tensor([[12.0, -1.0], [13.0, -2.0]])  # z [[1, 0], [1.5, -2]]: row 0 off by 1
    assert float(module._loss(z, target)) == pytest.approx(0.5)

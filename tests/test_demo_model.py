"""The committed demo model: loads safely, says it is synthetic, and still works on new slides."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cscvision.inference.predict import predict_slide
from cscvision.labels.annotations import read_annotations, tile_targets
from cscvision.labels.targets import DEFAULT_CLASS_MAP
from cscvision.models.export import load_model, resolve_model_dir
from cscvision.synth import write_slide

DEMO = resolve_model_dir("demo")  # the packaged copy; models/demo-synthetic links to it


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    from torchmetrics.functional.classification import binary_auroc

    return float(binary_auroc(torch.as_tensor(scores), torch.as_tensor(labels).long()))


def test_card_is_honest_about_synthetic_training():
    model = load_model(DEMO)
    card = model.card
    assert card.targets == ("stemness", "immunosuppressive")
    assert card.training.get("synthetic") is True
    assert "synthetic" in card.trained_on.lower()
    assert "not for diagnosis" in card.intended_use.lower()
    readme = (DEMO / "README.md").read_text()
    assert "synthetic data only" in readme.lower()
    assert (DEMO / "model.safetensors").stat().st_size < 5_000_000


def test_demo_model_finds_the_targets_on_an_unseen_synthetic_slide(tmp_path):
    truth = write_slide(tmp_path / "unseen.tiff", size_px=3072, seed=12345)
    model = load_model(DEMO)
    pred = predict_slide(truth.slide_path, model, progress=False)
    regions = read_annotations(truth.annotation_path)
    labels = tile_targets(regions, DEFAULT_CLASS_MAP, pred.grid.xy_l0, pred.grid.plan.tile_l0)
    for t, target in enumerate(model.card.targets):
        positive = labels.targets[:, t] >= 0.5
        if positive.sum() < 3 or (~positive).sum() < 3:
            pytest.skip(f"slide has too few {target} tiles to score")
        assert _auroc(pred.probs[:, t], positive) > 0.8, target

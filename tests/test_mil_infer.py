"""MIL models through `cscvision train` (task mil) and `cscvision infer`: per-tile parts
that aggregate to the slide prediction, CLAM-SB's instance loss, percentile maps, and the
exported model scoring slides through the ordinary writers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cscvision.models.mil import aggregate, rank_percentile, tile_parts
from cscvision.training.mil import (
    BagTargets,
    GatedAttentionMIL,
    MILConfig,
    make_mil_net,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO_WEIGHTS = ROOT / "models" / "demo-synthetic" / "model.safetensors"
RECORD = {
    "regression": [{"name": "a", "mean": 0.3, "sd": 0.1}, {"name": "b", "mean": -2.0, "sd": 4.0}],
    "classification": [{"name": "c", "classes": ["x", "y", "z"]}],
}


@pytest.mark.parametrize("instance_heads", [False, True])
def test_tile_parts_aggregate_to_the_bag_forward(instance_heads):
    torch.manual_seed(0)
    net = GatedAttentionMIL(
        12, n_regression=2, n_classes=(3,), hidden=16, attention=8, instance_heads=instance_heads
    ).eval()
    x = torch.randn(37, 12)
    with torch.no_grad():
        reg, logits, a = net(x)
        rows = tile_parts(net, x).numpy()
    out = aggregate(rows, net, RECORD)
    np.testing.assert_allclose(out.attention, a.numpy(), rtol=1e-5, atol=1e-7)
    want = reg.numpy() * np.array([0.1, 4.0]) + np.array([0.3, -2.0])
    assert out.regression["a"] == pytest.approx(want[0], rel=1e-5)
    assert out.regression["b"] == pytest.approx(want[1], rel=1e-5)
    probs = torch.softmax(logits[0], 0).numpy()
    np.testing.assert_allclose(list(out.class_probs["c"].values()), probs, rtol=1e-5)
    # contributions (label units) plus the bias term sum to the prediction minus the mean
    bias = net.regression.bias.detach().numpy() * np.array([0.1, 4.0])
    np.testing.assert_allclose(
        out.contributions.sum(0) + bias, want - np.array([0.3, -2.0]), rtol=1e-5, atol=1e-6
    )


def test_rank_percentile_known_answer():
    np.testing.assert_allclose(rank_percentile([3.0, 1.0, 2.0, 2.0]), [1.0, 0.0, 0.5, 0.5])
    np.testing.assert_allclose(rank_percentile([-5.0, 10.0]), [0.0, 1.0])
    assert rank_percentile([7.0]).tolist() == [0.5]


def test_clam_instance_loss_labels_attended_tiles_in_and_out_of_class():
    """Top-attended tiles are the slide's class for its instance classifier and not the
    class for the others; weights that say exactly that give a loss near 0, and the
    reversed class gives a large one."""
    net = GatedAttentionMIL(4, n_regression=0, n_classes=(2,), hidden=4, instance_heads=True)
    h = torch.zeros(20, 4)
    h[:10, 0], h[10:, 0] = 10.0, -10.0  # tiles 0-9 carry the signal
    a = torch.linspace(1.0, 0.0, 20)  # ... and are the most attended
    with torch.no_grad():
        for head, sign in zip(net.instance[0], (1.0, -1.0), strict=True):
            head.weight.zero_()
            head.bias.zero_()
            head.weight[1, 0] = sign  # class 0's head: signal → in class; class 1's: → not
        right = net.instance_loss(h, a, torch.tensor([0]))
        wrong = net.instance_loss(h, a, torch.tensor([1]))
        unlabelled = net.instance_loss(h, a, torch.tensor([-1]))
    assert float(right) < 1e-3
    assert float(wrong) > 5.0
    assert float(unlabelled) == 0.0


def test_clam_needs_a_classification_target():
    targets = BagTargets(np.zeros((4, 1)), np.zeros((4, 0), np.int64), ())
    with pytest.raises(ValueError, match=r"clam_sb.*classification target"):
        make_mil_net(MILConfig(architecture="clam_sb"), 8, targets)
    with pytest.raises(ValueError, match=r"(?s)architecture.*'mean' or 'instance_linear'"):
        MILConfig(architecture="transmil")  # refused when made


# --- train (task mil) → infer ----------------------------------------------------------------


@pytest.fixture(scope="module")
def mil_run(tmp_path_factory):
    from cscvision.cli import main
    from cscvision.synth import write_cohort
    from cscvision.synth.slide_labels import write_slide_labels

    root = tmp_path_factory.mktemp("mil_run")
    csv_path = write_cohort(
        root / "cohort", n_slides=8, n_patients=4, size_px=1024, seed=3, region_share=(0.02, 0.5)
    )
    labels = write_slide_labels(csv_path, noise_sd=0.02, seed=3)
    config = root / "mil.yaml"
    config.write_text(
        f"""name: mil-test
seed: 0
threads: 1
task: mil
run_dir: {root / "run"}
export_dir: {root / "model"}
cohort: {{csv: {csv_path}}}
model: {{encoder: demo-cnn, weights: {DEMO_WEIGHTS}}}
data: {{batch_size: 32, num_workers: 0}}
mil:
  labels: {labels}
  targets: [stemness_fraction, "stemness_fraction:tercile"]
  architecture: clam_sb
  epochs: 3
cv: {{folds: 2}}
card: {{synthetic: true}}
"""
    )
    assert main(["train", "--config", str(config), "--quiet"]) == 0
    slides = sorted(str(p) for p in csv_path.parent.glob("SYN-P00[12]-S01.tiff"))
    out = root / "infer"
    args = ["infer", *slides, "--model", str(root / "model"), "--out", str(out)]
    assert main([*args, "--workers", "0", "--threads", "1"]) == 0
    return {"root": root, "out": out, "slides": slides}


def test_mil_run_writes_cv_outputs_and_a_card_naming_its_encoder(mil_run):
    root = mil_run["root"]
    metrics = json.loads((root / "run" / "cv" / "cv_metrics.json").read_text())
    assert metrics["folds"] == 2 and metrics["n_slides"] == 8
    assert {"pearson_stemness_fraction", "auroc_stemness_fraction_tercile"} <= set(
        metrics["pooled"]
    )
    card = json.loads((root / "model" / "model.json").read_text())
    assert card["kind"] == "mil" and card["backbone"] == "clam_sb"
    assert card["encoder"]["name"] == "demo-cnn" and len(card["encoder"]["weights_sha256"]) == 64
    assert card["targets"] == ["attention", "contribution_stemness_fraction"]
    assert card["metrics"]["cv"]["pooled"]["pearson_stemness_fraction"]["ci95"]
    readme = (root / "model" / "README.md").read_text()
    assert "synthetic data only" in readme.lower() and "cross-validation" in readme


def test_infer_prediction_equals_the_bag_model_on_the_stored_features(mil_run):
    """results.csv's slide prediction is the MIL net applied to the slide's whole bag (the
    feature store training wrote), up to float16 storage of the features."""
    from safetensors.torch import load_file

    from cscvision.features.store import read_feature_store
    from cscvision.models.mil import mil_net_from_record
    from cscvision.training.mil import Bag as MILBag
    from cscvision.training.mil import predict_bags

    root = mil_run["root"]
    card = json.loads((root / "model" / "model.json").read_text())
    net = mil_net_from_record(card["mil"])
    net.load_state_dict(load_file(str(root / "model" / "model.safetensors")))
    rows = {r["slide_id"]: r for r in csv.DictReader((mil_run["out"] / "results.csv").open())}
    assert set(rows) == {"SYN-P001-S01", "SYN-P002-S01"}
    reg = card["mil"]["regression"][0]
    for slide_id, row in rows.items():
        store = read_feature_store(root / "run" / "features" / f"{slide_id}.h5")
        tiles = list(csv.DictReader((mil_run["out"] / slide_id / "tiles.csv").open()))
        assert len(tiles) == len(store.xy_l0)  # the whole bag, every tissue tile
        bag = MILBag(slide_id, store.features.astype(np.float32), store.xy_l0)
        (pred,) = predict_bags(net, [bag])
        want = pred.regression[0] * reg["sd"] + reg["mean"]
        assert float(row["pred_stemness_fraction"]) == pytest.approx(want, abs=2e-3)
        probs = [float(row[f"p_stemness_fraction_tercile_{c}"]) for c in ("low", "mid", "high")]
        np.testing.assert_allclose(probs, pred.class_probs[0], atol=2e-3)
        assert (
            row["pred_stemness_fraction_tercile"] == ["low", "mid", "high"][int(np.argmax(probs))]
        )
        attention = np.array([float(t["attention_x_n"]) for t in tiles])
        assert attention.mean() == pytest.approx(1.0, abs=1e-4)  # attention × N averages 1
        pct = np.array([float(t["prob_attention"]) for t in tiles])
        assert pct.min() == 0.0 and pct.max() == 1.0
        assert np.array_equal(np.argsort(pct, kind="stable"), np.argsort(attention, kind="stable"))


def test_infer_writes_mil_maps_through_the_ordinary_writers(mil_run):
    import tifffile
    from PIL import Image

    folder = mil_run["out"] / "SYN-P001-S01"
    for channel in ("attention", "contribution_stemness_fraction"):
        image = Image.open(folder / f"overlay_{channel}.png")
        assert image.size[0] > 300
        with tifffile.TiffFile(folder / f"SYN-P001-S01_likelihood_map_{channel}.tif") as tif:
            level = tif.pages[0].asarray()
        assert level.dtype == np.uint8 and level.max() > 200  # the top tiles near percentile 1
    geo = json.loads((folder / "SYN-P001-S01.geojson").read_text())
    tiles = [f for f in geo["features"] if f["properties"]["objectType"] == "tile"]
    m = tiles[0]["properties"]["measurements"]
    assert {"attention", "attention_x_n", "contribution_stemness_fraction_raw"} <= set(m)
    assert not [f for f in geo["features"] if f["properties"]["objectType"] == "annotation"]
    summary = json.loads((folder / "summary.json").read_text())
    pred = summary["slide_prediction"]
    assert math.isfinite(pred["regression"]["stemness_fraction"])
    assert pred["classification"]["stemness_fraction_tercile"]["predicted"] in (
        "low",
        "mid",
        "high",
    )


def test_a_mil_model_trained_with_covariates_is_refused_by_infer(mil_run, tmp_path):
    import shutil

    from cscvision.models.card import ModelError
    from cscvision.models.export import load_model

    model = tmp_path / "with-cov"
    shutil.copytree(mil_run["root"] / "model", model)
    card = json.loads((model / "model.json").read_text())
    card["mil"]["covariates"] = ["purity"]
    (model / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match=r"covariates.*purity"):
        load_model(model)


def test_stats_says_why_mil_outputs_have_no_niche_tests(mil_run, capsys):
    from cscvision.cli import main

    assert main(["stats", str(mil_run["out"])]) == 2
    err = capsys.readouterr().err
    assert "MIL model" in err and "results.csv" in err


def test_report_shows_each_slides_mil_prediction(mil_run):
    from cscvision.cli import main

    assert main(["report", str(mil_run["out"])]) == 0
    html = (mil_run["out"] / "report" / "index.html").read_text()
    summary = json.loads((mil_run["out"] / "SYN-P001-S01" / "summary.json").read_text())
    value = summary["slide_prediction"]["regression"]["stemness_fraction"]
    assert f"predicted stemness_fraction: {value:.4g}" in html
    assert "pred_stemness_fraction_tercile" in html  # the cohort table's results.csv column


def test_synthetic_slide_labels_are_the_truth_plus_noise_with_terciles(mil_run, tmp_path):
    import shutil

    from cscvision.synth.slide_labels import write_slide_labels

    cohort = mil_run["root"] / "cohort"
    shutil.copy(cohort / "cohort.csv", tmp_path / "cohort.csv")
    for truth in cohort.glob("*_truth.json"):
        shutil.copy(truth, tmp_path / truth.name)
    rows = list(csv.DictReader(write_slide_labels(tmp_path / "cohort.csv", noise_sd=0.0).open()))
    assert len(rows) == 8
    for row in rows:
        truth = json.loads((tmp_path / f"{row['slide_id']}_truth.json").read_text())
        want = truth["fraction_of_tissue"].get("Stemness-rich", 0.0)
        assert float(row["stemness_fraction"]) == pytest.approx(want, abs=5e-6)
    order = sorted(rows, key=lambda r: float(r["stemness_fraction"]))
    classes = [r["stemness_tercile"] for r in order]
    assert classes == sorted(classes, key=["low", "mid", "high"].index)  # monotone in value
    assert {c: classes.count(c) for c in set(classes)} == {"low": 3, "mid": 2, "high": 3}

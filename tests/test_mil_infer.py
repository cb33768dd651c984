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


# --- the OOD record on the MIL model's tile embeddings (issue 29) --------------------------


def _stores(root):
    from cscvision.features.store import read_feature_store

    return {p.stem: read_feature_store(p) for p in sorted((root / "run" / "features").glob("*.h5"))}


def _embed_by_hand(state: dict, features: np.ndarray) -> np.ndarray:
    """The gated-attention net's ``embed`` in numpy: LayerNorm (eps 1e-5), Linear, ReLU."""
    x = np.asarray(features, np.float64)
    x = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5)
    x = x * state["embed.0.weight"] + state["embed.0.bias"]
    return np.maximum(x @ state["embed.1.weight"].T + state["embed.1.bias"], 0.0)


def _ratio_by_hand(record: dict, threshold: float, h: np.ndarray) -> np.ndarray:
    d = h - record["means"][0]
    return np.einsum("nd,de,ne->n", d, record["precision"], d) / threshold


def test_mil_ood_record_is_fitted_on_the_tile_embeddings_and_infer_scores_them(mil_run):
    """The record's mean is the mean of the training tiles' embeddings (not of the encoder
    features), and each tile's ``ood`` in tiles.csv is its squared Mahalanobis distance to
    it under the stored precision ÷ the card's tile threshold, computed here by hand."""
    from safetensors.numpy import load_file

    model = mil_run["root"] / "model"
    card = json.loads((model / "model.json").read_text())
    ood = card["ood"]
    assert ood["features"] == "mil_embedding" and ood["dim"] == card["mil"]["hidden"]
    state = {k: v.astype(np.float64) for k, v in load_file(model / "model.safetensors").items()}
    record = {k: v.astype(np.float64) for k, v in load_file(model / ood["file"]).items()}
    stores = _stores(mil_run["root"])
    embeddings = {sid: _embed_by_hand(state, s.features) for sid, s in stores.items()}
    assert ood["train_tiles"] == sum(len(e) for e in embeddings.values())
    np.testing.assert_allclose(
        record["means"][0], np.concatenate(list(embeddings.values())).mean(0), atol=1e-4
    )
    for slide_id in ("SYN-P001-S01", "SYN-P002-S01"):
        tiles = list(csv.DictReader((mil_run["out"] / slide_id / "tiles.csv").open()))
        got = {(int(t["x"]), int(t["y"])): float(t["ood"]) for t in tiles}
        want = _ratio_by_hand(record, ood["tile_threshold"], embeddings[slide_id])
        xy = [tuple(map(int, p)) for p in stores[slide_id].xy_l0]
        assert set(got) == set(xy)  # the whole bag: features stored in float16, read in 32
        np.testing.assert_allclose([got[p] for p in xy], want, rtol=0.02, atol=1e-3)


def test_mil_ood_thresholds_are_the_held_out_folds_and_its_own_slides_are_not_flagged(mil_run):
    """No slide is held out from the exported net, so the tile threshold is the 99th
    percentile of the training slides' tiles scored against Gaussians fitted without their
    patient; scored with the full record, its own slides are in distribution."""
    from cscvision.labels.cohort import read_cohort
    from cscvision.models.export import load_model
    from cscvision.training.mil import Bag as MILBag
    from cscvision.training.mil_ood import held_out_scores, tile_embeddings

    model = load_model(mil_run["root"] / "model")
    patients = {
        e.slide_id: e.patient_id for e in read_cohort(mil_run["root"] / "cohort" / "cohort.csv")
    }
    stores = _stores(mil_run["root"])
    bags = [MILBag(sid, s.features.astype(np.float32), s.xy_l0) for sid, s in stores.items()]
    scores = held_out_scores(
        tile_embeddings(model.net.mil, bags), [patients[b.slide_id] for b in bags]
    )
    ood = model.card.ood
    assert ood["tile_threshold"] == pytest.approx(
        np.quantile(np.concatenate(scores), 0.99), rel=1e-5
    )
    assert ood["val_slides"] == 8 and ood["slide_share_threshold"] >= 0.10
    for slide_id in ("SYN-P001-S01", "SYN-P002-S01"):
        block = json.loads((mil_run["out"] / slide_id / "summary.json").read_text())["ood"]
        assert block["out_of_distribution"] is False, (slide_id, block)
    rows = list(csv.DictReader((mil_run["out"] / "results.csv").open()))
    assert [r["ood_flag"] for r in rows] == ["no", "no"]


def test_a_slide_far_from_the_mil_training_features_is_flagged(mil_run, tmp_path, capsys):
    """A record fitted on the same bags shifted by a large known offset in feature space
    (so the slide lies that far from every training tile): the slide is flagged with the
    CLI warning line, the summary's ``ood`` block and results.csv's flag."""
    import shutil

    from cscvision.cli import main
    from cscvision.labels.cohort import read_cohort
    from cscvision.models.export import load_model
    from cscvision.training.mil import Bag as MILBag
    from cscvision.training.mil_ood import export_mil_ood

    model_dir = tmp_path / "shifted"
    shutil.copytree(mil_run["root"] / "model", model_dir)
    model = load_model(model_dir)
    offset = np.random.default_rng(0).normal(0.0, 5.0, model.card.mil["in_dim"]).astype(np.float32)
    patients = {
        e.slide_id: e.patient_id for e in read_cohort(mil_run["root"] / "cohort" / "cohort.csv")
    }
    stores = _stores(mil_run["root"])
    bags = [
        MILBag(sid, s.features.astype(np.float32) + offset, s.xy_l0) for sid, s in stores.items()
    ]
    export_mil_ood(model.net.mil, model.card, bags, [patients[b.slide_id] for b in bags], model_dir)
    slide = mil_run["slides"][0]
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["infer", slide, "--model", str(model_dir), "--out", str(out),
                 "--workers", "0", "--threads", "1"])  # fmt: skip
    assert code == 0
    err = capsys.readouterr().err
    assert "warning: 1 slide(s) out of distribution for this model" in err
    assert "SYN-P001-S01 100%" in err
    block = json.loads((out / "SYN-P001-S01" / "summary.json").read_text())["ood"]
    assert block["out_of_distribution"] is True and block["share_beyond_p99"] == 1.0
    (row,) = csv.DictReader((out / "results.csv").open())
    assert row["ood_flag"] == "yes" and float(row["ood_share_beyond_p99"]) == 1.0
    assert (out / "SYN-P001-S01" / "SYN-P001-S01_likelihood_map_ood.tif").is_file()
    assert main(["report", str(out)]) == 0
    assert "Out of distribution for this model" in (out / "report" / "index.html").read_text()


def test_a_mil_model_without_an_ood_record_says_so_and_carries_on(mil_run, tmp_path, capsys):
    import shutil

    from cscvision.cli import main

    model_dir = tmp_path / "old"
    shutil.copytree(mil_run["root"] / "model", model_dir)
    card = json.loads((model_dir / "model.json").read_text())
    del card["ood"]
    (model_dir / "model.json").write_text(json.dumps(card))
    (model_dir / "ood.safetensors").unlink()
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["infer", mil_run["slides"][0], "--model", str(model_dir), "--out", str(out),
                 "--workers", "0", "--threads", "1"])  # fmt: skip
    assert code == 0
    assert "keeps no out-of-distribution record" in capsys.readouterr().err
    summary = json.loads((out / "SYN-P001-S01" / "summary.json").read_text())
    assert "ood" not in summary and summary["slide_prediction"]["regression"]
    assert "ood" not in (out / "SYN-P001-S01" / "tiles.csv").read_text().splitlines()[0]


def test_refit_gives_a_mil_model_exported_without_a_record_the_same_record(mil_run, tmp_path):
    """refit_ood on a MIL model (the run's config, stored bags): the record export wrote
    (up to float rounding: BLAS thread counts may differ); the weights untouched."""
    import shutil

    from safetensors.numpy import load_file

    from cscvision.training.refit import refit_ood
    from cscvision.training.train import load_config

    model_dir = tmp_path / "old"
    shutil.copytree(mil_run["root"] / "model", model_dir)
    card = json.loads((model_dir / "model.json").read_text())
    want = card.pop("ood")
    (model_dir / "model.json").write_text(json.dumps(card))
    (model_dir / "ood.safetensors").unlink()
    weights = (model_dir / "model.safetensors").read_bytes()
    cfg = load_config(str(mil_run["root"] / "mil.yaml"), [])
    got = refit_ood(cfg, model_dir, progress=False).ood
    assert set(got) == set(want)
    for key, value in want.items():
        if key != "sha256":
            assert got[key] == (
                pytest.approx(value, rel=1e-5) if isinstance(value, float) else value
            )
    assert json.loads((model_dir / "model.json").read_text())["ood"] == got
    assert (model_dir / "model.safetensors").read_bytes() == weights
    new, old = (load_file(d / "ood.safetensors") for d in (model_dir, mil_run["root"] / "model"))
    for name in ("means", "precision"):
        np.testing.assert_allclose(new[name], old[name], rtol=1e-4, atol=1e-4)

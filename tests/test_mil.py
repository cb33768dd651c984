"""Attention MIL: slide-label tables, patient-level CV, metrics with bootstrap CIs, and a
model that must find the tiles carrying a planted signal."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cscvision.labels.slide_table import LabelSpec, SlideLabelError, read_slide_labels, terciles
from cscvision.training.mil import Bag, MILConfig, attention_scale
from cscvision.training.mil_cv import bootstrap_ci, cross_validate, patient_folds


def planted_bags(n_slides: int = 60, dim: int = 16, seed: int = 0):
    """Bags whose label is the fraction of 'signal' tiles (feature 0 raised) plus noise."""
    rng = np.random.default_rng(seed)
    bags, fractions, signal = [], [], []
    for s in range(n_slides):
        n = int(rng.integers(40, 160))
        frac = rng.uniform(0.0, 0.6)
        is_signal = rng.random(n) < frac
        x = rng.normal(0, 1, (n, dim)).astype(np.float32)
        x[is_signal, 0] += 3.0
        bags.append(Bag(f"S{s:03d}", x, np.zeros((n, 2), np.int64)))
        fractions.append(is_signal.mean())
        signal.append(is_signal)
    return bags, np.array(fractions), signal


def write_labels(tmp_path, ids, patients, values, name="score"):
    path = tmp_path / "labels.csv"
    lines = ["slide_id,patient_id," + name]
    lines += [f"{s},{p},{v:.5f}" for s, p, v in zip(ids, patients, values, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def planted():
    return planted_bags()


def cv(planted, tmp_path, values, epochs=25, architecture="gated_attention"):
    bags, _, _ = planted
    ids = [b.slide_id for b in bags]
    patients = [f"P{i // 2:03d}" for i in range(len(bags))]  # two slides per patient
    path = write_labels(tmp_path, ids, patients, values)
    labels = read_slide_labels(
        path, [LabelSpec("score", "regression")], list(zip(ids, patients, strict=True))
    )
    cfg = MILConfig(architecture=architecture, epochs=epochs, hidden=32, attention=16)
    return cross_validate(bags, labels, cfg, k=5)


@pytest.mark.slow
def test_mil_learns_the_planted_fraction_and_attends_to_its_tiles(planted, tmp_path):
    from sklearn.metrics import roc_auc_score

    bags, fractions, signal = planted
    noisy = fractions + np.random.default_rng(1).normal(0, 0.02, len(fractions))
    result = cv(planted, tmp_path, noisy)
    pooled = result.pooled["pearson_score"]
    assert pooled["value"] >= 0.8, pooled
    lo, hi = pooled["ci95"]
    assert lo <= pooled["value"] <= hi
    assert len(result.per_fold) == 5
    # held-out per-tile contributions rank the signal tiles first; attention leans the same way
    pairs = list(zip(result.predictions, signal, strict=True))
    contrib = [roc_auc_score(s, p.contributions[:, 0]) for p, s in pairs if 0 < s.mean() < 1]
    attn = [roc_auc_score(s, p.attention) for p, s in pairs if 0 < s.mean() < 1]
    assert np.median(contrib) >= 0.9 and np.median(attn) > 0.6
    # contributions sum (with the bias) to the prediction: their ranking follows the signal
    one = result.predictions[0]
    assert one.contributions.shape == (len(bags[0].features), 1)
    np.testing.assert_allclose(attention_scale(one.attention).mean(), 1.0)


def test_mean_pooling_is_the_mean_of_per_tile_predictions_and_infer_agrees():
    """Known answer: under mean pooling the slide's output is b + mean_i(W h_i), the
    attention is 1/N, and inference's batch-by-batch aggregate gives the same numbers."""
    import torch

    from cscvision.models.mil import aggregate, tile_parts
    from cscvision.models.mil_net import GatedAttentionMIL

    torch.manual_seed(0)
    net = GatedAttentionMIL(8, n_regression=1, n_classes=[3], hidden=6, attention=4, mean_pool=True)
    net.eval()
    x = torch.randn(37, 8)
    with torch.no_grad():
        reg, logits, a = net(x)
        h = net.embed(x)
        per_tile = h @ net.regression.weight.T + net.regression.bias
        rows = torch.cat([tile_parts(net, x[:20]), tile_parts(net, x[20:])]).numpy()
    np.testing.assert_allclose(a.numpy(), np.full(37, 1 / 37), rtol=1e-6)
    np.testing.assert_allclose(reg.numpy(), per_tile.mean(0).numpy(), rtol=1e-5, atol=1e-6)
    record = {"regression": [{"name": "t", "mean": 0.0, "sd": 1.0}],
              "classification": [{"name": "c", "classes": ["a", "b", "c"]}]}  # fmt: skip
    out = aggregate(rows, net, record)
    np.testing.assert_allclose(out.regression["t"], float(reg[0]), rtol=1e-5)
    probs = torch.softmax(logits[0], 0).numpy()
    np.testing.assert_allclose(list(out.class_probs["c"].values()), probs, rtol=1e-5)


def test_an_unknown_architecture_is_refused_naming_the_choices():
    from cscvision.training.mil import check_architecture

    assert check_architecture("mean") == "mean"
    with pytest.raises(
        ValueError, match=r"mil\.architecture 'max'.*gated_attention, clam_sb, mean"
    ):
        check_architecture("max")


@pytest.mark.slow
def test_mean_pooling_learns_the_planted_fraction(planted, tmp_path):
    from sklearn.metrics import roc_auc_score

    _, fractions, signal = planted
    noisy = fractions + np.random.default_rng(1).normal(0, 0.02, len(fractions))
    result = cv(planted, tmp_path, noisy, architecture="mean")
    assert result.pooled["pearson_score"]["value"] >= 0.85  # measured 0.897
    pairs = list(zip(result.predictions, signal, strict=True))
    contrib = [roc_auc_score(s, p.contributions[:, 0]) for p, s in pairs if 0 < s.mean() < 1]
    assert np.median(contrib) >= 0.9


@pytest.mark.slow
def test_labels_shuffled_across_patients_are_not_learned(planted, tmp_path):
    _, fractions, _ = planted
    shuffled = np.random.default_rng(7).permutation(fractions)
    result = cv(planted, tmp_path, shuffled, epochs=15)
    assert abs(result.pooled["pearson_score"]["value"]) < 0.4


def test_patient_folds_keep_patients_together():
    patients = [f"P{i // 3}" for i in range(30)]
    folds = patient_folds(patients, 5, seed=3)
    for p in set(patients):
        assert len({f for f, q in zip(folds, patients, strict=True) if q == p}) == 1
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 3  # at most one patient (3 slides) apart
    with pytest.raises(ValueError, match="only 2 patients"):
        patient_folds(["a", "b"], 5)


def test_bootstrap_ci_known_answer():
    # a perfect predictor: every resample gives Pearson 1
    y = np.arange(10.0)
    lo, hi = bootstrap_ci(lambda a, b: float(np.corrcoef(a, b)[0, 1]), y, y, np.arange(10))
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    # a mean over patients: the interval brackets it and shrinks with more patients
    rng = np.random.default_rng(0)
    small = rng.normal(0, 1, 20)
    big = rng.normal(0, 1, 2000)
    mean = lambda a, b: float(np.mean(a))  # noqa: E731
    w_small = np.subtract(*bootstrap_ci(mean, small, small, np.arange(20))[::-1])
    w_big = np.subtract(*bootstrap_ci(mean, big, big, np.arange(2000))[::-1])
    assert w_big < w_small / 5


def test_terciles_known_answer():
    assert terciles(np.array([1.0, 2, 3, 4, 5, 6, math.nan, 7, 8, 9])).tolist() == [
        0,
        0,
        0,
        1,
        1,
        1,
        -1,
        2,
        2,
        2,
    ]


def test_patient_keyed_labels_apply_to_each_slide(tmp_path):
    path = tmp_path / "by_patient.csv"
    path.write_text("patient_id,subtype,purity\nA,C1,0.5\nB,C2,0.7\n")
    spec = LabelSpec.from_dict(
        "subtype", {"target_type": "classification", "classes": ["C1", "C2"]}
    )
    old = LabelSpec.from_dict("subtype", {"task": "classification", "classes": ["C1", "C2"]})
    assert old == spec and spec.target_type == "classification"  # 0.1.0's key still reads
    labels = read_slide_labels(path, [spec], [("s1", "A"), ("s2", "A"), ("s3", "B")], ["purity"])
    assert labels.values["subtype"].tolist() == [0, 0, 1]
    assert labels.covariates["purity"].tolist() == [0.5, 0.5, 0.7]


@pytest.mark.parametrize(
    ("csv", "spec", "message"),
    [
        (
            "patient_id,subtype\nA,C1\nA,C2\n",
            {"task": "classification", "classes": ["C1", "C2"]},
            "appears twice with different labels",
        ),
        (
            "slide_id,subtype\ns1,C9\ns2,C1\n",
            {"task": "classification", "classes": ["C1", "C2"]},
            r"classes \['C9'\] that are not declared",
        ),
        (
            "slide_id,subtype\ns1,C1\ns2,C1\n",
            {"task": "classification", "classes": ["C1", "C2"]},
            r"classes \['C2'\] of 'subtype' occur on no slide",
        ),
        ("slide_id,subtype\ns1,abc\ns2,1\n", {"task": "regression"}, "is not a number"),
        ("name,subtype\ns1,1\n", {"task": "regression"}, "needs a slide_id or a patient_id"),
        ("slide_id,other\ns1,1\n", {"task": "regression"}, r"missing columns \['subtype'\]"),
    ],
)
def test_bad_slide_label_tables(tmp_path, csv, spec, message):
    path = tmp_path / "labels.csv"
    path.write_text(csv)
    with pytest.raises(SlideLabelError, match=message):
        read_slide_labels(path, [LabelSpec.from_dict("subtype", spec)], [("s1", "A"), ("s2", "B")])


def test_mil_command_writes_cv_outputs_and_names_missing_features(tmp_path, capsys):
    from cscvision.cli import main
    from cscvision.features.store import FeatureStore, write_feature_store

    bags, fractions, _ = planted_bags(n_slides=12, seed=4)
    (tmp_path / "x.tiff").write_bytes(b"")  # MIL reads features only; the manifest names slides
    cohort = tmp_path / "cohort.csv"
    cohort.write_text(
        "slide_id,patient_id,slide_path\n"
        + "".join(f"{b.slide_id},P{i // 2},x.tiff\n" for i, b in enumerate(bags))
    )
    labels = write_labels(
        tmp_path, [b.slide_id for b in bags], [f"P{i // 2}" for i in range(12)], fractions
    )
    feats = tmp_path / "features"
    for b in bags[:-1]:
        write_feature_store(
            feats / f"{b.slide_id}.h5",
            FeatureStore(b.xy_l0.astype(np.int32), b.features, "test", "0"),
        )
    args = [
        "mil",
        str(cohort),
        "--labels",
        str(labels),
        "--target",
        "score",
        "--features",
        str(feats),
        "--out",
        str(tmp_path / "out"),
        "--folds",
        "3",
        "--epochs",
        "2",
    ]
    assert main(args) == 2
    assert (
        f"no feature store for 1 labelled slides ({bags[-1].slide_id})" in capsys.readouterr().err
    )
    last = bags[-1]
    write_feature_store(
        feats / f"{last.slide_id}.h5",
        FeatureStore(last.xy_l0.astype(np.int32), last.features, "test", "0"),
    )
    assert main(args) == 0
    out = tmp_path / "out"
    import json

    metrics = json.loads((out / "cv_metrics.json").read_text())
    assert set(metrics["pooled"]) == {"pearson_score", "spearman_score", "r2_score"}
    assert len((out / "predictions.csv").read_text().splitlines()) == 13
    tiles = (out / "tiles" / f"{last.slide_id}.csv").read_text().splitlines()
    assert (
        tiles[0] == "x,y,attention_x_n,contribution_score" and len(tiles) == len(last.features) + 1
    )

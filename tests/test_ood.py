"""Out-of-distribution record: Mahalanobis known answers, the record beside the weights, and
the packaged demo model on a real slide (flagged) and held-out synthetic ones (not)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats

from cscvision.models.backbones import get_model
from cscvision.models.card import ModelCard, ModelError
from cscvision.models.export import export_model, load_model
from cscvision.models.ood import (
    GaussianRecord,
    export_ood,
    feature_source,
    feature_tap,
    fit_gaussians,
    ledoit_wolf,
    load_ood,
    mahalanobis,
    ood_block,
    ood_scores_of,
)


def test_mahalanobis_of_a_known_gaussian_is_its_closed_form():
    # diagonal: (3-1)²/4 + (5-2)²/9 = 1 + 1 = 2, by hand
    mean = torch.tensor([[1.0, 2.0]])
    precision = torch.diag(torch.tensor([1 / 4, 1 / 9]))
    assert mahalanobis(torch.tensor([[3.0, 5.0]]), mean, precision).item() == pytest.approx(2.0)
    # full covariance: (x-μ)ᵀ Σ⁻¹ (x-μ) by a linear solve
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 5))
    cov = a @ a.T + 5 * np.eye(5)
    mu = rng.normal(size=5)
    x = rng.normal(size=(7, 5)) * 3
    want = np.einsum("nd,nd->n", x - mu, np.linalg.solve(cov, (x - mu).T).T)
    got = mahalanobis(torch.tensor(x), torch.tensor(mu[None]).float(),
                      torch.tensor(np.linalg.inv(cov)).float())  # fmt: skip
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4)


def test_fitted_gaussian_scores_follow_chi_square():
    """Fitted on samples of a known Gaussian (no shrinkage), the precision is Σ⁻¹ and fresh
    samples' squared distances are χ² with D degrees of freedom: their 99th percentile is
    χ²₀.₉₉(D)."""
    rng = np.random.default_rng(1)
    d = 4
    a = rng.normal(size=(d, d))
    cov = a @ a.T + np.eye(d)
    mu = rng.normal(size=d) * 5
    record = fit_gaussians(rng.multivariate_normal(mu, cov, 20000), shrinkage=0.0)
    np.testing.assert_allclose(record.precision, np.linalg.inv(cov), rtol=0.05, atol=0.02)
    scores = ood_scores_of(record, rng.multivariate_normal(mu, cov, 20000))
    assert np.quantile(scores, 0.99) == pytest.approx(stats.chi2.ppf(0.99, d), rel=0.06)
    assert scores.mean() == pytest.approx(d, rel=0.03)


def test_ledoit_wolf_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.covariance")
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 10)) * np.linspace(1, 3, 10)
    x -= x.mean(0)
    cov, a = ledoit_wolf(x)
    want, want_a = sklearn.ledoit_wolf(x, assume_centered=True)
    assert a == pytest.approx(want_a, rel=1e-6)
    np.testing.assert_allclose(cov, want, rtol=1e-6)


def test_class_conditional_score_is_distance_to_the_nearest_mean():
    rng = np.random.default_rng(3)
    second = rng.normal(size=(200, 2)) + np.array([10.0, 0.0])
    x = np.concatenate([rng.normal(size=(200, 2)), second])
    groups = np.repeat([0, 1], 200)
    record = fit_gaussians(x, groups, shrinkage=0.0)
    near_second = ood_scores_of(record, np.array([[10.0, 0.0], [5.0, 0.0]]))
    assert near_second[0] < 0.1 < 10 < near_second[1]  # midway is far from both
    single = fit_gaussians(x, None, shrinkage=0.0)  # one Gaussian: the midpoint is central
    assert ood_scores_of(single, np.array([[5.0, 0.0]]))[0] < 0.1


def test_feature_tap_reads_the_input_of_the_last_linear_layer():
    torch.manual_seed(0)
    net = get_model("small_cnn", 2).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad(), feature_tap(net, "penultimate") as seen:
        logits = net(x)
    assert seen[0].shape == (3, 128)
    torch.testing.assert_close(net[-1](seen[0]), logits)


def test_block_features_are_the_first_blocks_channel_mean_and_spread():
    torch.manual_seed(0)
    net = get_model("small_cnn", 2).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), feature_tap(net, "texture") as seen, feature_tap(net) as seen2:
        net(x)
        seen.append(seen2[0])
        maps = net[3](net[2](net[1](net[0](x))))  # the stem, then the first block
    torch.testing.assert_close(seen[0], maps.std(dim=(2, 3)))  # texture
    # block_stats (the default): per-channel mean, then standard deviation, of the same maps
    torch.testing.assert_close(seen[1], torch.cat([maps.mean(dim=(2, 3)), maps.std(dim=(2, 3))], 1))
    assert feature_source(net)[1] == "block_stats"
    assert feature_source(get_model("resnet18", 2))[0].__class__.__name__ == "Sequential"


def _record(dim: int = 128) -> tuple[GaussianRecord, dict]:
    rng = np.random.default_rng(4)
    record = fit_gaussians(rng.normal(size=(300, dim)))
    val = rng.normal(size=(200, dim))
    scores = ood_scores_of(record, val)
    block = ood_block(
        record, features="penultimate", train_tiles=300, val_scores=scores,
        val_slide_idx=np.arange(200) % 4,
    )  # fmt: skip
    return record, block


def test_ood_record_travels_beside_the_weights(tmp_path):
    card = ModelCard(name="m", backbone="small_cnn", tile_px=64)
    folder = export_model(get_model("small_cnn", 2), card, tmp_path / "m")
    weights = (folder / "model.safetensors").read_bytes()
    record, block = _record()
    card = export_ood(folder, card, record, block)
    assert (folder / "model.safetensors").read_bytes() == weights  # weights untouched
    loaded = load_model(folder)
    assert loaded.card.ood["tile_threshold"] == pytest.approx(block["tile_threshold"])
    assert block["slide_share_threshold"] >= 0.10
    scorer = load_ood(folder, loaded.card)
    torch.testing.assert_close(scorer.precision, torch.as_tensor(record.precision))
    (folder / "ood.safetensors").write_bytes(b"x" + (folder / "ood.safetensors").read_bytes())
    with pytest.raises(ModelError, match="sha256"):
        load_ood(folder, loaded.card)


# --- the packaged demo model -------------------------------------------------------------


def test_demo_model_flags_the_real_slide(cmu_svs, tmp_path, capsys):
    from cscvision.cli import main

    out = tmp_path / "out"
    code = main(["infer", str(cmu_svs), "--model", "demo", "--out", str(out),
                 "--workers", "0", "--threads", "1"])  # fmt: skip
    assert code == 0
    summary = json.loads((out / "cmu_small_region" / "summary.json").read_text())
    block = summary["ood"]
    assert block["out_of_distribution"] is True
    assert block["share_beyond_p99"] > block["slide_share_threshold"]
    assert "out of distribution" in capsys.readouterr().err
    tiles = (out / "cmu_small_region" / "tiles.csv").read_text().splitlines()
    assert tiles[0].split(",")[-1] == "ood"
    assert (out / "cmu_small_region" / "overlay_ood.png").is_file()
    results = (out / "results.csv").read_text().splitlines()
    header, row = results[0].split(","), results[1].split(",")
    assert row[header.index("ood_flag")] == "yes"


def test_demo_model_does_not_flag_held_out_synthetic_slides(demo_batch):
    for slide in demo_batch["slides"]:
        slide_id = slide.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        block = json.loads((demo_batch["out"] / slide_id / "summary.json").read_text())["ood"]
        assert block["out_of_distribution"] is False, (slide_id, block)
        assert block["share_beyond_p99"] < block["slide_share_threshold"]


# --- MIL models: their tile embeddings ----------------------------------------------------


@pytest.mark.parametrize("architecture", ["gated_attention", "instance_linear"])
def test_feature_tap_of_a_mil_model_reads_its_tile_embeddings(architecture):
    """A MIL model's OOD features are its ``embed`` output: the gated-attention net's hidden
    layer, or the encoder's features themselves for ``instance_linear``."""
    from cscvision.models.mil import MILTileNet
    from cscvision.models.mil_net import GatedAttentionMIL, InstanceLinearMIL

    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 6))
    if architecture == "instance_linear":
        mil = InstanceLinearMIL(6, n_regression=1)
    else:
        mil = GatedAttentionMIL(6, n_regression=1, hidden=5, attention=3)
    net = MILTileNet(encoder, mil.eval()).eval()
    x = torch.randn(7, 3, 4, 4)
    with torch.no_grad(), feature_tap(net) as seen:
        net(x)
        want = encoder(x) if architecture == "instance_linear" else mil.embed(encoder(x))
    assert feature_source(net)[1] == "mil_embedding"
    torch.testing.assert_close(seen[0], want)


def test_mil_held_out_scores_leave_each_patient_fold_out():
    """Each slide is scored against the Gaussian of the other patients' tiles only: a
    patient far from the others scores as far as the closed form says, which a fit that
    included its own tiles would not."""
    from cscvision.training.mil_ood import held_out_scores

    rng = np.random.default_rng(0)
    slides = [rng.normal(0, 1, (60, 3)) for _ in range(4)]
    slides[3] = slides[3] + np.array([8.0, 0.0, 0.0])  # patient "d" lies apart
    patients = ["a", "b", "c", "d"]
    scores = held_out_scores(slides, patients)
    for i in range(4):  # 4 patients → 4 folds, each one patient
        rest = np.concatenate([s for j, s in enumerate(slides) if j != i])
        np.testing.assert_allclose(
            scores[i], ood_scores_of(fit_gaussians(rest), slides[i]), rtol=1e-5
        )
    assert np.median(scores[3]) > 30 > 3 * np.median(scores[0])
    pooled = ood_scores_of(fit_gaussians(np.concatenate(slides)), slides[3])
    assert np.median(pooled) < np.median(scores[3]) / 3  # its own tiles pull the fit


def test_out_of_fold_reference_admits_a_new_patient_and_flags_a_shifted_one():
    """Each synthetic patient has its own mean (spread 2 SD between patients, 1 within):
    thresholds from one validation patient measure within-patient spread and flag about a
    third of new patients from the same population; pooled with the three training patients
    scored out of fold (each against the Gaussian fitted without it) they admit nearly
    every new patient and still flag nearly every patient shifted 5 between-patient SD."""
    from cscvision.models.ood import reference_thresholds
    from cscvision.training.ood import held_out_scores

    def patient(rng, shift=0.0):
        return rng.normal(0, 2.0, 2) + np.array([shift, 0.0]) + rng.normal(0, 1, (200, 2))

    def flagged(scores, rule):
        threshold, share, _ = rule
        return np.mean(scores > threshold) > share

    counts = {"old new": 0, "new new": 0, "new shifted": 0}
    draws = 40
    for seed in range(draws):
        rng = np.random.default_rng(seed)
        train, val = [patient(rng) for _ in range(3)], patient(rng)
        record = fit_gaussians(np.concatenate(train))
        val_scores = ood_scores_of(record, val)
        old = reference_thresholds([val_scores])
        new = reference_thresholds([val_scores, *held_out_scores(train, ["a", "b", "c"])])
        fresh, shifted = (ood_scores_of(record, patient(rng, s)) for s in (0.0, 10.0))
        counts["old new"] += flagged(fresh, old)
        counts["new new"] += flagged(fresh, new)
        counts["new shifted"] += flagged(shifted, new)
    assert counts["old new"] >= 0.25 * draws, counts  # the false alarm this rule removes
    assert counts["new new"] <= 0.1 * draws, counts
    assert counts["new shifted"] >= 0.85 * draws, counts


def test_out_of_fold_scores_fit_on_one_set_and_score_another():
    """``score``: the fold's Gaussian is fitted on the training loader's tiles of the other
    patients and scores the held-out patient's other tiles (its slides read whole)."""
    from cscvision.training.ood import held_out_scores

    rng = np.random.default_rng(1)
    fit = [rng.normal(i, 1, (50, 3)) for i in range(3)]
    tissue = [rng.normal(i, 1, (30, 3)) for i in range(3)]
    got = held_out_scores(fit, ["a", "b", "c"], score=tissue)
    for i in range(3):
        rest = np.concatenate([f for j, f in enumerate(fit) if j != i])
        np.testing.assert_allclose(got[i], ood_scores_of(fit_gaussians(rest), tissue[i]), rtol=1e-5)


def test_out_of_fold_scores_stream_one_slide_at_a_time():
    """The fold Gaussians are fitted first, then the slides to score are read one at a time:
    the generator finds every slide it made before dropped (a dead weak reference) when it
    makes the next, and the scores equal a direct computation: each slide against the
    Gaussian (with its groups) fitted on the other patients' fit features only, both
    slides of patient "b" left out together (5 patients → 5 folds, one patient each)."""
    import weakref

    from cscvision.training.ood import held_out_scores

    rng = np.random.default_rng(7)
    patients = ["a", "b", "b", "c", "d", "e", "a"]
    fit = [rng.normal(i % 3, 1 + i / 4, (40, 3)) for i in range(7)]
    groups = [np.repeat([0, 1], 20) for _ in range(7)]
    tissue = [rng.normal(i % 2, 2, (30 + i, 3)).astype(np.float32) for i in range(7)]
    tissue[4] = np.zeros((0, 3), np.float32)  # a slide with no tissue tiles scores empty
    made: list[weakref.ref] = []
    alive_when_reading: list[int] = []

    def read():
        for x in tissue:
            alive_when_reading.append(sum(r() is not None for r in made))
            copy = x.copy()  # the test's list keeps the original, the scorer gets a copy
            made.append(weakref.ref(copy))
            yield copy
            del copy

    got = held_out_scores(fit, patients, score=read(), groups=groups)
    assert alive_when_reading == [0] * 7
    assert all(r() is None for r in made)
    for i, p in enumerate(patients):
        rest = [j for j, q in enumerate(patients) if q != p]
        record = fit_gaussians(
            np.concatenate([fit[j] for j in rest]), np.concatenate([groups[j] for j in rest])
        )
        assert record.means.shape[0] == 2
        want = ood_scores_of(record, tissue[i]) if len(tissue[i]) else np.zeros(0, np.float32)
        np.testing.assert_array_equal(got[i], want)
        # own memory, not a view of torch's buffer: kept views fragmented the heap (RSS grew
        # 662 MiB over 80 slides in scripts/ood_stream_memory.py, 76 MiB with copies)
        assert got[i].base is None
    with pytest.raises(ValueError, match="6 slides to score, 7 fitted"):
        held_out_scores(fit, patients, score=iter(tissue[:6]))

"""Per-tile uncertainty: MC dropout and TTA known answers, and `infer --uncertainty`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_viewer_files import assert_trust_maps_open_like_score_maps
from torch import nn

from cscvision.models.uncertainty import (
    UncertaintyError,
    dihedral_views,
    mc_passes,
    parse_uncertainty,
    predictive_stats,
    tta_passes,
)


def test_mc_dropout_of_a_one_layer_net_has_the_closed_form_variance():
    """y = w · (m ⊙ x) / (1-p), m ~ Bernoulli(1-p): E y = w·x, Var y = p/(1-p) Σ w²x²."""
    torch.manual_seed(0)
    p = 0.3
    w = torch.tensor([[0.5, -1.0, 2.0, 0.25]])
    net = nn.Sequential(nn.Dropout(p), nn.Linear(4, 1, bias=False)).eval()
    net[1].weight.data = w.clone()
    x = torch.tensor([[1.0, 2.0, -1.0, 4.0]])
    with torch.no_grad():
        y = mc_passes(net, x, 20000)[:, 0, 0].double()
    want_var = p / (1 - p) * float((w**2 * x**2).sum())
    assert y.mean().item() == pytest.approx(float((w * x).sum()), abs=0.05)
    assert y.var().item() == pytest.approx(want_var, rel=0.04)
    assert not net.training and not net[0].training  # modes restored


def test_batch_norm_is_unchanged_by_mc_inference():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Dropout(0.5),
                        nn.LazyLinear(2))  # fmt: skip
    net(torch.randn(2, 3, 8, 8))
    net.train()
    for _ in range(3):  # give the running statistics values of their own
        net(torch.randn(8, 3, 8, 8) * 3 + 1)
    net.eval()
    before = {k: v.clone() for k, v in net[1].state_dict().items()}
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        out = mc_passes(net, x, 5)
        plain = net(x)
    for k, v in net[1].state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert not net[1].training
    assert out.std(0).sum() > 0  # dropout did act
    # with dropout off the batch-norm part gives the plain pass: eval-mode statistics used
    with torch.no_grad():
        net[3].p = 0.0
        torch.testing.assert_close(mc_passes(net, x, 2)[0], plain)


class CornerPixel(nn.Module):
    """A model whose one output is the top-left pixel of channel 0."""

    def forward(self, x):
        return x[:, :1, 0, 0]


def test_tta_of_a_corner_pixel_model_is_the_mean_of_the_four_corners():
    x = torch.zeros(1, 3, 5, 5)
    x[0, 0, 0, 0], x[0, 0, 0, -1], x[0, 0, -1, 0], x[0, 0, -1, -1] = 1.0, 2.0, 3.0, 4.0
    out = tta_passes(CornerPixel(), x)[:, 0, 0]
    assert out[0] == 1.0  # view 0 is the tile itself
    assert sorted(out.tolist()) == [1, 1, 2, 2, 3, 3, 4, 4]  # each corner twice
    assert out.mean().item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert len({tuple(v.flatten().tolist()) for v in dihedral_views(torch.rand(1, 1, 3, 3))}) == 8


def test_predictive_stats_by_hand():
    probs = np.array([[[0.5]], [[0.5]]])  # agreement: no mutual information
    s = predictive_stats(probs)
    assert s["std"][0, 0] == 0 and s["mi"][0, 0] == pytest.approx(0, abs=1e-6)
    probs = np.array([[[0.0]], [[1.0]]])  # full disagreement: MI = H(0.5) = ln 2
    s = predictive_stats(probs)
    assert s["mean"][0, 0] == 0.5 and s["std"][0, 0] == 0.5
    assert s["mi"][0, 0] == pytest.approx(np.log(2), rel=1e-4)


@pytest.mark.parametrize("bad", ["mc", "mc:1", "mc:x", "ensemble:3", "tta:3"])
def test_bad_uncertainty_values_are_refused(bad):
    with pytest.raises(UncertaintyError, match="--uncertainty"):
        parse_uncertainty(bad)
    assert parse_uncertainty("mc:10") == ("mc", 10) and parse_uncertainty("tta") == ("tta", 8)
    assert parse_uncertainty("ensemble") == ("ensemble", 0)


def test_infer_with_uncertainty_writes_it_like_a_target(demo_batch, tmp_path):
    """`infer --uncertainty tta` on a synthetic slide: the score is the mean of the views,
    std/mi columns, maps, overlays and QuPath/ASAP TIFFs beside the OOD ones."""
    import csv
    import json

    import openslide

    from cscvision.cli import main

    slide = demo_batch["slides"][0]
    out = tmp_path / "out"
    code = main(["infer", slide, "--model", "demo", "--out", str(out), "--workers", "0",
                 "--threads", "1", "--uncertainty", "tta"])  # fmt: skip
    assert code == 0
    sid = next(p.name for p in out.iterdir() if p.is_dir())
    folder = out / sid
    rows = list(csv.DictReader((folder / "tiles.csv").open()))
    for t in ("stemness", "immunosuppressive"):
        std = np.array([float(r[f"std_{t}"]) for r in rows])
        mi = np.array([float(r[f"mi_{t}"]) for r in rows])
        assert (std >= 0).all() and (std <= 0.5).all() and std.max() > 0
        assert (mi >= 0).all() and (mi <= np.log(2) + 1e-6).all()
        assert (folder / f"overlay_std_{t}.png").is_file()
        with openslide.OpenSlide(folder / f"{sid}_likelihood_map_mi_{t}.tif") as o:
            assert o.dimensions[0] > 0
    with np.load(folder / "maps.npz") as npz:
        assert {"ood", "std_stemness", "mi_immunosuppressive"} <= set(npz.files)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["settings"]["uncertainty"] == "tta" and "ood" in summary
    plain = list(csv.DictReader((demo_batch["out"] / sid / "tiles.csv").open()))
    assert [r["ood"] for r in rows] == [r["ood"] for r in plain]  # view 0 is the tile
    trust = ["ood", *(f"{k}_{t}" for k in ("std", "mi") for t in ("stemness", "immunosuppressive"))]
    with openslide.OpenSlide(slide) as o:
        dimensions = o.dimensions
    assert_trust_maps_open_like_score_maps(folder, sid, trust, "stemness", dimensions)


def test_mc_on_a_network_without_dropout_is_refused(tmp_path, capsys):
    from cscvision.cli import main
    from cscvision.models.backbones import get_model
    from cscvision.models.card import ModelCard
    from cscvision.models.export import export_model

    net = get_model("resnet18", 2)
    folder = export_model(net, ModelCard(name="r", backbone="resnet18"), tmp_path / "m")
    code = main(["infer", str(tmp_path / "none.svs"), "--model", str(folder), "--out",
                 str(tmp_path / "o"), "--uncertainty", "mc:4"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "no dropout layer" in err or "none.svs" in err


def test_the_cards_stain_template_is_applied_by_inference_unasked(tmp_path):
    """A card with a Reinhard template: scoring a tile equals scoring the tile normalised by
    hand with a card that has none; without the template the score differs."""
    from cscvision.inference.predict import TileScorer
    from cscvision.models.backbones import get_model
    from cscvision.models.card import ModelCard
    from cscvision.models.export import export_model, load_model
    from cscvision.slides.stain import fit_stain, normalise_batch
    from cscvision.training.refit import attach_stain

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    card = ModelCard(name="m", backbone="small_cnn", tile_px=32)
    net = get_model("small_cnn", 2)
    net[-1].weight.data *= 1000  # a random net's scores hardly move: make them
    folder = export_model(net, card, tmp_path / "m")
    plain = TileScorer(load_model(folder))
    reference = fit_stain(rng.integers(60, 200, (64, 64, 3), dtype=np.uint8), "reinhard")
    assert attach_stain(folder, reference).stain["method"] == "reinhard"
    stained = TileScorer(load_model(folder))
    tiles = torch.as_tensor(rng.integers(120, 255, (3, 3, 32, 32), dtype=np.uint8))
    by_hand = plain(normalise_batch(tiles, reference))
    np.testing.assert_allclose(stained(tiles), by_hand, rtol=1e-5, atol=1e-6)
    assert np.abs(plain(tiles) - by_hand).max() > 1e-3


def test_head_dropout_gives_mc_to_a_backbone_without_dropout(tmp_path):
    """``model.head_dropout`` puts a dropout before resnet18's last linear layer: the
    weights keep a plain resnet's names (they load into one), the exported model rebuilds
    it from its card, and MC passes then differ where plain passes do not."""
    from cscvision.models.backbones import get_model
    from cscvision.models.card import ModelCard
    from cscvision.models.export import export_model, load_model
    from cscvision.models.uncertainty import dropout_layers, mc_passes

    torch.manual_seed(0)
    net = get_model("resnet18", 2, head_dropout=0.5)
    assert len(dropout_layers(net)) == 1 and not dropout_layers(get_model("resnet18", 2))
    get_model("resnet18", 2).load_state_dict(net.state_dict())  # same names, strict
    card = ModelCard(name="r", backbone="resnet18", tile_px=32, head_dropout=0.5)
    loaded = load_model(export_model(net, card, tmp_path / "m"))
    assert len(dropout_layers(loaded.net)) == 1
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        passes = mc_passes(loaded.net.eval(), x, 4)
        torch.testing.assert_close(loaded.net(x), net.eval()(x))  # eval: dropout off
    assert passes.std(0).max() > 0

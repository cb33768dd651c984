"""Ensembles of exported models: the score is the mean of the members' calibrated outputs,
``--uncertainty ensemble`` their spread (closed forms for two members), members that read
tiles differently are refused, and ``infer`` takes several ``--model`` or one folder."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest
import torch

from cscvision.inference.predict import TileScorer
from cscvision.models.backbones import get_model
from cscvision.models.card import ModelCard, ModelError
from cscvision.models.ensemble import LoadedEnsemble, load_models
from cscvision.models.export import export_model, load_model
from cscvision.testing import write_toy_cohort

CARD = ModelCard(name="m", backbone="small_cnn", tile_px=32, mpp=2.0, thresholds={
    "stemness": 0.4, "immunosuppressive": 0.5})  # fmt: skip


def _member(folder, seed: int, **card_fields):
    torch.manual_seed(seed)
    card = dataclasses.replace(CARD, name=f"m{seed}", **card_fields)
    if seed == 1:  # a calibrated member: its own temperature is applied before averaging
        temperatures = {"stemness": {"temperature": 2.0}, "immunosuppressive": {"temperature": 0.5}}
        card = dataclasses.replace(
            card, calibration={"method": "temperature", "targets": temperatures}
        )
    return export_model(get_model("small_cnn", 2), card, folder / f"m{seed}")


@pytest.fixture
def members(tmp_path):
    return [_member(tmp_path / "ens", s) for s in (0, 1)]


def test_ensemble_score_and_spread_are_the_members_mean_and_sd(members):
    tiles = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    single = np.stack([TileScorer(load_model(m))(tiles) for m in members])  # [2, B, T]
    model = load_models(members)
    assert isinstance(model, LoadedEnsemble) and len(model.members) == 2
    np.testing.assert_allclose(TileScorer(model)(tiles), single.mean(0), atol=1e-6)
    rows = TileScorer(model, uncertainty="ensemble").scored(tiles)
    p1, p2 = single
    np.testing.assert_allclose(rows[:, :2], (p1 + p2) / 2, atol=1e-6)
    np.testing.assert_allclose(rows[:, 2:4], np.abs(p1 - p2) / 2, atol=1e-6)  # sd of two

    def h(p):
        return -(p * np.log(p) + (1 - p) * np.log(1 - p))

    mi = h((p1 + p2) / 2) - (h(p1) + h(p2)) / 2
    np.testing.assert_allclose(rows[:, 4:6], mi, atol=1e-5)
    assert model.card.thresholds == pytest.approx({"stemness": 0.4, "immunosuppressive": 0.5})
    assert model.card.calibration == {} and "ensemble" in model.card.training


def test_a_folder_of_models_is_an_ensemble(members):
    model = load_models([members[0].parent])
    assert isinstance(model, LoadedEnsemble)
    assert [m.card.name for m in model.members] == ["m0", "m1"]


@pytest.mark.parametrize(
    "field, value, phrase",
    [("tile_px", 64, "tile size"), ("mpp", 1.0, "µm/px"), ("targets", ("a", "b"), "targets")],
)
def test_members_that_differ_are_refused_naming_both(tmp_path, members, field, value, phrase):
    other = _member(tmp_path / "other", 2, **{field: value, "thresholds": {}})
    with pytest.raises(ModelError, match=phrase) as info:
        load_models([members[0], other])
    assert str(members[0]) in str(info.value) and str(other) in str(info.value)


def test_infer_with_an_ensemble_writes_the_spread(members, tmp_path, capsys):
    from cscvision.cli import main

    csv_path = write_toy_cohort(tmp_path / "toy", n_slides=1, n_patients=1, size_px=384)
    slide = str(next(csv_path.parent.glob("*.tif")))
    out = tmp_path / "out"
    base = ["infer", slide, "--out", str(out), "--workers", "0", "--threads", "1"]
    code = main([*base, "--model", str(members[0]), "--model", str(members[1]),
                 "--uncertainty", "ensemble"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    rows = list(csv.DictReader(next(out.glob("*/tiles.csv")).open()))
    assert rows and {"std_stemness", "mi_immunosuppressive"} <= set(rows[0])
    assert main([*base, "--model", str(members[0]), "--uncertainty", "ensemble"]) == 2
    assert "two or more --model" in capsys.readouterr().err
    assert main([*base, "--model", str(members[0]), "--model", str(members[1]),
                 "--uncertainty", "tta"]) == 2  # fmt: skip
    assert "--uncertainty ensemble" in capsys.readouterr().err

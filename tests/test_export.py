"""Exported models: round trip, and every way a model folder can be wrong."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from cscvision.cli import main
from cscvision.models.backbones import get_model
from cscvision.models.export import ModelCard, ModelError, export_model, load_model, read_card


@pytest.fixture()
def exported(tmp_path):
    net = get_model("small_cnn", num_outputs=2)
    card = ModelCard(name="t", backbone="small_cnn", thresholds={"stemness": 0.3})
    return export_model(net, card, tmp_path / "m"), net


def test_round_trip_gives_the_same_network(exported):
    folder, net = exported
    loaded = load_model(folder)
    x = torch.rand(2, 3, 64, 64)
    net.eval()
    assert torch.equal(loaded.net(x), net(x))
    assert loaded.card.threshold("stemness") == 0.3 and loaded.card.threshold("x") == 0.5
    assert loaded.card.targets == ("stemness", "immunosuppressive")


def test_the_same_weights_export_to_the_same_bytes(exported, tmp_path):
    """Exports of one network are byte-identical, so ``weights_sha256`` (which marks outputs
    complete or stale) does not change when nothing changed. With two safetensors metadata
    keys the header's order followed a hash map, and 6 exports gave 2 different files."""
    import hashlib

    folder, net = exported
    card = read_card(folder)
    digests = {
        hashlib.sha256(
            (export_model(net, card, tmp_path / f"again{i}") / "model.safetensors").read_bytes()
        ).hexdigest()
        for i in range(6)
    }
    assert len(digests) == 1


def test_backbone_that_does_not_match_the_weights(exported):
    folder, _ = exported
    card = json.loads((folder / "model.json").read_text())
    card["backbone"] = "resnet18"
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="do not match backbone 'resnet18'"):
        load_model(folder)


def test_target_count_that_does_not_match_the_weights(exported):
    folder, _ = exported
    card = json.loads((folder / "model.json").read_text())
    card["targets"] = ["stemness", "immunosuppressive", "third"]
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="3 outputs"):
        load_model(folder)


def test_missing_or_malformed_files(exported, tmp_path):
    folder, _ = exported
    with pytest.raises(ModelError, match="no model card"):
        read_card(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        read_card(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(ModelError, match="backbone"):
        read_card(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="weights file missing"):
        load_model(folder)


class _Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickled!')",))


def test_a_pickle_in_place_of_the_weights_is_refused_not_run(exported):
    folder, _ = exported
    (folder / "model.safetensors").write_bytes(pickle.dumps({"w": _Boom()}))
    with pytest.raises(ModelError, match="cannot read safetensors"):
        load_model(folder)


def test_infer_with_a_bad_model_folder_says_so(tmp_path, capsys):
    slide = tmp_path / "s.tif"
    slide.write_bytes(b"")
    status = main(["infer", str(slide), "--model", str(tmp_path / "nope"), "--out", str(tmp_path)])
    assert status == 2
    assert "no model card" in capsys.readouterr().err

"""Fine-tuning an encoder's last blocks with a head (``model.finetune_blocks``): what trains,
what stays frozen, what is exported, and that loading gives back the trained network."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_heads import head_overrides

from cscvision.cli import main
from cscvision.models.encoders import load_encoder, save_random_weights
from cscvision.models.export import ModelError, load_model
from cscvision.models.heads import EncoderHead, encoder_blocks, make_head, tuned_prefixes
from cscvision.testing import write_toy_cohort
from cscvision.training.config import ConfigError, load_config
from cscvision.training.lit import CheckpointMismatch, TileClassifier, check_checkpoint
from cscvision.training.train import train

pytest.importorskip("timm")
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_random_weights("test-vit-tiny", tmp_path_factory.mktemp("ft") / "tiny.safetensors")


def _net(weights, blocks: int) -> EncoderHead:
    net = EncoderHead(load_encoder("test-vit-tiny", weights), make_head("linear", 192, 2))
    net.tune(blocks)
    return net


def test_tune_opens_the_last_blocks_and_the_final_norm_only(tiny):
    net = _net(tiny, 2)
    assert len(encoder_blocks(net.encoder)) == 12
    assert net.tuned == ["trunk.blocks.10", "trunk.blocks.11", "trunk.norm"]
    training = {n.split(".")[1] + "." + n.split(".")[2] for n, p in net.encoder.named_parameters()
                if p.requires_grad and n.startswith("trunk.blocks")}  # fmt: skip
    assert training == {"blocks.10", "blocks.11"}
    frozen = [n for n, p in net.encoder.named_parameters() if not p.requires_grad]
    assert "trunk.patch_embed.proj.weight" in frozen and "trunk.blocks.9.mlp.fc1.weight" in frozen
    assert all(p.requires_grad for p in net.head.parameters())
    net.train()  # the frozen part stays in eval mode, the tuned blocks and the head train
    assert not net.encoder.trunk.blocks[9].training and not net.encoder.trunk.patch_embed.training
    assert net.encoder.trunk.blocks[11].training and net.head.training
    with pytest.raises(ValueError, match="has 12 blocks; give 1 to 12"):
        tuned_prefixes(net.encoder, 13)


def test_the_tuned_blocks_learn_at_the_scaled_rate_and_nothing_frozen_moves(tiny):
    net = _net(tiny, 1)
    module = TileClassifier(net=net, targets=("a", "b"), lr=0.01, scheduler="none",
                            augment="none", encoder_lr_scale=0.1)  # fmt: skip
    groups = module.param_groups()
    assert [g["lr"] for g in groups] == [0.01, pytest.approx(0.001)]
    tuned = {id(p) for p in groups[1]["params"]}
    assert tuned == {id(p) for n, p in net.encoder.named_parameters() if "blocks.11" in n
                     or n.startswith("trunk.norm")}  # fmt: skip
    before = {n: p.detach().clone() for n, p in net.encoder.named_parameters()}
    optimizer = module.configure_optimizers()
    x = torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8)
    loss = module._loss(module.net(module.prepare_images(x, train=True)), torch.rand(4, 2))
    loss.backward()
    optimizer.step()
    moved = {n for n, p in net.encoder.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("blocks.11" in n or n.startswith("trunk.norm") for n in moved)


def test_config_checks_name_the_key():
    with pytest.raises(ConfigError, match=r"model\.finetune_blocks: name the encoder"):
        load_config(None, ["model.finetune_blocks=2"])
    with pytest.raises(
        ConfigError, match=r"model\.finetune_blocks -1: input should be greater than or equal"
    ):
        load_config(None, ["model.finetune_blocks=-1"])
    with pytest.raises(
        ConfigError, match=r"model\.finetune_lr_scale 0\.0: input should be greater"
    ):
        load_config(None, ["model.finetune_lr_scale=0.0"])
    vit = ["model.encoder=test-vit-tiny", "model.weights=tiny.safetensors"]
    # the block count against the architecture: when training starts, before any file is
    # read (no cohort here), not while the config is read (no encoder built for that)
    too_many = load_config(None, [*vit, "model.finetune_blocks=13", "cohort.csv=none.csv"])
    with pytest.raises(ConfigError, match="test-vit-tiny has 12 blocks; give 1 to 12"):
        train(too_many)
    assert load_config(None, [*vit, "model.finetune_blocks=12"]).model.finetune_blocks == 12


@pytest.fixture(scope="module")
def finetuned(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    csv = write_toy_cohort(root / "toy", n_slides=4, n_patients=4, size_px=1280, seed=2)
    extra = ("model.finetune_blocks=1", "trainer.max_epochs=2", "data.augment=flips",
             "model.finetune_lr_scale=0.5")  # fmt: skip
    cfg = load_config(None, head_overrides(csv, root / "a", tiny, *extra))
    return csv, root, train(cfg, progress=False)


@pytest.mark.slow
def test_export_keeps_the_head_and_tuned_blocks_and_loads_the_trained_network(tiny, finetuned):
    result = finetuned[2]
    state = load_file(str(result.model_dir / "model.safetensors"))
    blocks = {".".join(k.split(".")[:4]) for k in state if k.startswith("encoder.")}
    assert blocks == {"encoder.trunk.blocks.11", "encoder.trunk.norm.weight",
                      "encoder.trunk.norm.bias"}  # fmt: skip
    assert {k for k in state if not k.startswith("encoder.")} == {"0.weight", "0.bias"}
    card = json.loads((result.model_dir / "model.json").read_text())
    assert card["encoder"]["finetune_blocks"] == 1 and card["encoder"]["name"] == "test-vit-tiny"
    assert "last 1 block(s) fine-tuned" in card["training"]["pretrained"]

    model = load_model(result.model_dir, encoder_weights=tiny)
    ckpt = torch.load(result.best_checkpoint, map_location="cpu", weights_only=True)
    trained = {k[len("net.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    loaded = model.net.state_dict()
    assert set(loaded) == set(trained)
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)  # the best checkpoint's
    original = load_encoder("test-vit-tiny", tiny).state_dict()
    assert torch.equal(loaded["encoder.trunk.blocks.0.attn.qkv.weight"],
                       original["trunk.blocks.0.attn.qkv.weight"])  # fmt: skip
    assert not torch.equal(loaded["encoder.trunk.blocks.11.mlp.fc2.weight"],
                           original["trunk.blocks.11.mlp.fc2.weight"])  # fmt: skip


@pytest.mark.slow
def test_a_finetuned_model_infers_and_refuses_another_encoder_file(tiny, finetuned, tmp_path):
    _, root, result = finetuned
    slide = next((root / "toy").glob("*.tif*"))
    out = tmp_path / "out"
    args = ["infer", str(slide), "--model", str(result.model_dir), "--out", str(out),
            "--encoder-weights", str(tiny), "--workers", "0"]  # fmt: skip
    assert main(args) == 0
    assert (out / slide.stem / "summary.json").exists()
    other = save_random_weights("test-vit-tiny", tmp_path / "other.safetensors", seed=1)
    with pytest.raises(ModelError, match="differ from the ones model"):
        load_model(result.model_dir, encoder_weights=other)


@pytest.mark.slow
def test_resuming_with_other_finetune_settings_is_refused(tiny, finetuned):
    last = finetuned[2].run_dir / "checkpoints" / "last.ckpt"

    def module(blocks: int, scale: float) -> TileClassifier:
        targets = ("stemness", "immunosuppressive")
        return TileClassifier(net=_net(tiny, blocks), backbone="linear", targets=targets,
                              encoder_lr_scale=scale)  # fmt: skip

    check_checkpoint(last, module(1, 0.5))  # as trained
    with pytest.raises(CheckpointMismatch, match=r"model\.finetune_blocks or model\.finetune_lr"):
        check_checkpoint(last, module(2, 0.5))
    with pytest.raises(
        CheckpointMismatch, match=r"\(encoder lr × 0\.5\), the config trains \[2, 14\] \(× 0\.1\)"
    ):
        check_checkpoint(last, module(1, 0.1))


def test_a_missing_encoder_file_is_named_before_any_slide_is_read(tmp_path, capsys):
    args = ["train", f"cohort.csv={tmp_path / 'absent.csv'}", "model.encoder=test-vit-tiny",
            f"model.weights={tmp_path / 'uni.bin'}", "model.finetune_blocks=1"]  # fmt: skip
    assert main(args) == 2
    assert f"model.weights: {tmp_path / 'uni.bin'} is not a file" in capsys.readouterr().err


@pytest.mark.slow
def test_an_unreadable_encoder_file_is_a_message_not_a_traceback(finetuned, tmp_path, capsys):
    csv = finetuned[0]
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(b"\x08\x00")
    args = ["train", f"cohort.csv={csv}", "model.encoder=test-vit-tiny", f"model.weights={bad}",
            f"run_dir={tmp_path / 'run'}", "grid.mask_mpp=4.0", "--quiet"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"cannot read weights file {bad}" in err and "Traceback" not in err

"""The encoder registry and local weights: architectures on the meta device, loading,
key remapping (transformers Dinov2 → timm ViT) and clear failures. No real weights here:
a user's real file is the final check that an entry fits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from cscvision.core.io import file_sha256
from cscvision.models.encoders import (
    build_encoder,
    load_encoder,
    remap_dinov2_hf,
    save_random_weights,
)
from cscvision.models.registry import ENCODERS, EncoderError, configured_weights, get_encoder_spec

torch.set_num_threads(1)
REAL = [name for name, spec in ENCODERS.items() if spec.kind != "test"]
IMAGENET_CLASSES = 1000


@pytest.mark.parametrize("name", list(ENCODERS))
def test_architecture_on_meta_device_matches_the_published_figures(name):
    spec = ENCODERS[name]
    encoder = build_encoder(spec, device="meta")
    count = sum(p.numel() for p in encoder.trunk.parameters())
    assert count == spec.params, "the timm kwargs drifted from the registered architecture"
    out = encoder(torch.empty(2, 3, spec.tile_px, spec.tile_px, device="meta"))
    assert tuple(out.shape) == (2, spec.dim)
    if spec.kind == "imagenet":  # published counts include the 1000-class classifier
        count += spec.dim * IMAGENET_CLASSES + IMAGENET_CLASSES
    if spec.published_params:
        assert abs(count / spec.published_params - 1) < 0.035, (count, spec.published_params)


def test_every_real_encoder_says_where_its_weights_are_and_their_licence():
    for name in REAL:
        spec = ENCODERS[name]
        assert spec.weights_url and spec.licence and spec.source and spec.weights_file, name


def test_virchow2_concatenates_class_token_and_mean_patch_tokens():
    spec = ENCODERS["virchow2"]
    trunk_dim = build_encoder(spec, device="meta").trunk.num_features
    assert spec.pool == "cls+mean_patch" and spec.dim == 2 * trunk_dim == 2560


def test_unknown_and_unsupported_encoders_are_named():
    with pytest.raises(EncoderError, match="choose one of"):
        get_encoder_spec("unii")
    with pytest.raises(EncoderError, match="conch"):
        get_encoder_spec("conch")


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    return save_random_weights("test-vit-tiny", tmp_path_factory.mktemp("w") / "tiny.safetensors")


def test_features_are_deterministic(tiny_weights, tmp_path):
    again = save_random_weights("test-vit-tiny", tmp_path / "again.safetensors")
    assert file_sha256(again) == file_sha256(tiny_weights)  # same seed, same bytes
    other = save_random_weights("test-vit-tiny", tmp_path / "other.safetensors", seed=1)
    assert file_sha256(other) != file_sha256(tiny_weights)
    x = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a = load_encoder("test-vit-tiny", tiny_weights)(x)
        b = load_encoder("test-vit-tiny", again)(x)
        c = load_encoder("test-vit-tiny", other)(x)
    assert a.shape == (3, 192) and torch.equal(a, b) and not torch.allclose(a, c)


def test_wrong_architecture_names_encoder_file_and_first_key(tmp_path):
    cnn = save_random_weights("resnet18", tmp_path / "resnet18.safetensors")
    with pytest.raises(EncoderError) as e:
        load_encoder("test-vit-tiny", cnn)
    message = str(e.value)
    assert "test-vit-tiny" in message and str(cnn) in message
    assert "first mismatched key 'cls_token'" in message


def test_a_shape_mismatch_names_the_key_and_both_shapes(tiny_weights, tmp_path):
    wider = dataclasses.replace(
        ENCODERS["test-vit-tiny"], timm_kwargs={"num_classes": 0, "embed_dim": 96, "num_heads": 3}
    )
    with pytest.raises(EncoderError, match=r"'cls_token': shape \(1, 1, 192\) in the file"):
        load_encoder(wider, tiny_weights)


def test_truncated_and_missing_files_fail_clearly(tiny_weights, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(tiny_weights.read_bytes()[: tiny_weights.stat().st_size // 2])
    with pytest.raises(EncoderError, match=r"test-vit-tiny: cannot read weights file .*complete"):
        load_encoder("test-vit-tiny", cut)
    with pytest.raises(EncoderError, match="not found"):
        load_encoder("test-vit-tiny", tmp_path / "absent.bin")


def test_pth_state_dicts_load_with_weights_only_and_pickles_are_refused(tiny_weights, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(tiny_weights))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pth")
    encoder = load_encoder("test-vit-tiny", tmp_path / "w.pth")  # wrapper and prefix removed
    assert torch.equal(encoder.trunk.cls_token, state["cls_token"])
    torch.save({"state_dict": state, "extra": Path("x")}, tmp_path / "pickled.pth")
    with pytest.raises(EncoderError, match="cannot read weights file"):
        load_encoder("test-vit-tiny", tmp_path / "pickled.pth")


def test_imagenet_classifier_heads_in_the_file_are_dropped(tmp_path):
    net = build_encoder("resnet18").trunk
    state = {**net.state_dict(), "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    torch.save(state, tmp_path / "resnet18.pth")
    load_encoder("resnet18", tmp_path / "resnet18.pth")


# --- Phikon-v2: transformers Dinov2 keys → timm ViT -------------------------------------------

HIDDEN, LAYERS, PATCH, IMAGE = 64, 2, 16, 32


def dinov2_hf_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A randomly initialised state dict shaped as transformers' ``Dinov2Model`` saves it."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    tokens = (IMAGE // PATCH) ** 2 + 1
    state = {
        "embeddings.cls_token": r(1, 1, HIDDEN),
        "embeddings.mask_token": r(1, HIDDEN),
        "embeddings.position_embeddings": r(1, tokens, HIDDEN),
        "embeddings.patch_embeddings.projection.weight": r(HIDDEN, 3, PATCH, PATCH),
        "embeddings.patch_embeddings.projection.bias": r(HIDDEN),
        "layernorm.weight": 1 + r(HIDDEN),
        "layernorm.bias": r(HIDDEN),
    }
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        for part in ("query", "key", "value"):
            state[f"{p}attention.attention.{part}.weight"] = r(HIDDEN, HIDDEN)
            state[f"{p}attention.attention.{part}.bias"] = r(HIDDEN)
        state[f"{p}attention.output.dense.weight"] = r(HIDDEN, HIDDEN)
        state[f"{p}attention.output.dense.bias"] = r(HIDDEN)
        for n in (1, 2):
            state[f"{p}norm{n}.weight"] = 1 + r(HIDDEN)
            state[f"{p}norm{n}.bias"] = r(HIDDEN)
            state[f"{p}layer_scale{n}.lambda1"] = r(HIDDEN)
        state[f"{p}mlp.fc1.weight"] = r(4 * HIDDEN, HIDDEN)
        state[f"{p}mlp.fc1.bias"] = r(4 * HIDDEN)
        state[f"{p}mlp.fc2.weight"] = r(HIDDEN, 4 * HIDDEN)
        state[f"{p}mlp.fc2.bias"] = r(HIDDEN)
    return state


SMALL_PHIKON = dataclasses.replace(
    ENCODERS["phikon-v2"],
    timm_name="vit_small_patch16_224",
    timm_kwargs={
        "num_classes": 0,
        "img_size": IMAGE,
        "embed_dim": HIDDEN,
        "depth": LAYERS,
        "num_heads": 4,
        "init_values": 1e-5,
    },
    tile_px=IMAGE,
    dim=HIDDEN,
)


def test_phikon_v2_transformers_keys_load_into_timm(tmp_path):
    from safetensors.torch import save_file

    state = dinov2_hf_state()
    save_file(state, str(tmp_path / "model.safetensors"))
    encoder = load_encoder(SMALL_PHIKON, tmp_path / "model.safetensors")
    trunk = encoder.trunk
    qkv = trunk.blocks[1].attn.qkv.weight
    p = "encoder.layer.1.attention.attention."
    assert torch.equal(qkv[:HIDDEN], state[p + "query.weight"])  # timm's order: q, k, v
    assert torch.equal(qkv[HIDDEN : 2 * HIDDEN], state[p + "key.weight"])
    assert torch.equal(qkv[2 * HIDDEN :], state[p + "value.weight"])
    assert torch.equal(trunk.blocks[0].ls2.gamma, state["encoder.layer.0.layer_scale2.lambda1"])
    assert torch.equal(trunk.pos_embed, state["embeddings.position_embeddings"])
    assert torch.equal(trunk.norm.weight, state["layernorm.weight"])
    with torch.inference_mode():
        out = encoder(torch.rand(2, 3, IMAGE, IMAGE))
    assert out.shape == (2, HIDDEN) and torch.isfinite(out).all()


def test_phikon_v2_file_missing_a_tensor_names_it(tmp_path):
    from safetensors.torch import save_file

    state = dinov2_hf_state()
    del state["encoder.layer.1.mlp.fc2.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(EncoderError, match=r"'blocks\.1\.mlp\.fc2\.bias': missing from the file"):
        load_encoder(SMALL_PHIKON, tmp_path / "model.safetensors")
    state = dinov2_hf_state()
    del state["encoder.layer.0.attention.attention.key.bias"]
    with pytest.raises(EncoderError, match="lacks"):
        remap_dinov2_hf(state)


def test_configured_weights_are_found_by_name(tmp_path):
    spec = ENCODERS["uni"]
    assert configured_weights(spec, tmp_path) is None
    (tmp_path / "uni").mkdir()
    (tmp_path / "uni" / "pytorch_model.bin").write_bytes(b"")
    assert configured_weights(spec, tmp_path) == tmp_path / "uni" / "pytorch_model.bin"
    (tmp_path / "resnet50.safetensors").write_bytes(b"")
    assert configured_weights(ENCODERS["resnet50"], tmp_path) == tmp_path / "resnet50.safetensors"

"""Tile encoders built with timm from the registry, weights from a local file only.

``load_encoder("uni", "weights/uni/pytorch_model.bin")`` builds the architecture on the
meta device (no random initialisation, no download: ``pretrained=False`` and
``HF_HUB_OFFLINE=1``, which the CLI sets), reads the file (``.safetensors``, or a
``.bin``/``.pth`` state dict with ``torch.load(weights_only=True)``: nothing is unpickled),
translates its key names where the checkpoint uses another convention (Phikon-v2's
transformers Dinov2 → timm ViT) and loads it key by key. A file that does not fit raises
:class:`EncoderError` naming the encoder, the file and the first mismatched key.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cscvision.core.errors import CscvisionError
from cscvision.models.registry import (
    FEATURES_INSTALL,
    EncoderError,
    EncoderSpec,
    get_encoder_spec,
)

# Leading names a checkpoint may wrap its keys in, and classifier heads the encoder drops.
_WRAPPERS = ("module.", "model.", "trunk.", "dinov2.")
_HEADS = ("fc.", "head.", "classifier.")


class FeaturesUnavailable(CscvisionError, ImportError):
    """timm or h5py is missing; the message says how to install them."""


def import_timm() -> Any:
    try:
        import timm
    except ImportError:
        raise FeaturesUnavailable(
            f"encoders need timm, which is not installed here: {FEATURES_INSTALL}"
        ) from None
    return timm


class Encoder(nn.Module):
    """A trunk (timm, or the small CNN) and its pooling: normalised float [B, 3, H, W] →
    embeddings [B, D] as the registry's ``pool`` says."""

    def __init__(self, spec: EncoderSpec, trunk: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.trunk = trunk
        self.prefix_tokens = int(getattr(trunk, "num_prefix_tokens", 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.trunk.forward_features(x)
        pool = self.spec.pool
        if pool == "avg":
            return out.mean(dim=(2, 3))
        cls, patches = out[:, 0], out[:, self.prefix_tokens :]
        if pool == "cls":
            return cls
        if pool == "mean_patch":
            return patches.mean(dim=1)
        return torch.cat([cls, patches.mean(dim=1)], dim=1)  # cls+mean_patch


def _resolve(value: Any) -> Any:
    """Layer classes named as dotted strings in the registry (``"torch.nn.SiLU"``)."""
    if isinstance(value, str) and value.startswith(("timm.", "torch.")):
        module, _, name = value.rpartition(".")
        return getattr(importlib.import_module(module), name)
    return value


def build_encoder(spec: EncoderSpec | str, *, device: str | torch.device = "cpu") -> Encoder:
    """The architecture of ``spec`` on ``device`` (``"meta"``: shapes only), untrained."""
    spec = get_encoder_spec(spec) if isinstance(spec, str) else spec
    if spec.timm_name == "cscvision.small_cnn":
        from cscvision.models.cnn import SmallCnnTrunk

        with torch.device(device):
            return Encoder(spec, SmallCnnTrunk())
    timm = import_timm()
    kwargs = {k: _resolve(v) for k, v in spec.timm_kwargs.items()}
    with torch.device(device):
        trunk = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    return Encoder(spec, trunk)


def read_state_dict(path: Path, encoder: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a plain state dict, never unpickling objects."""
    if not path.is_file():
        raise EncoderError(f"encoder {encoder}: weights file {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, corrupt, or holding pickled objects
        raise EncoderError(
            f"encoder {encoder}: cannot read weights file {path} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); is the file complete? download it "
            "again and compare its sha256"
        ) from None
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise EncoderError(f"encoder {encoder}: {path} does not hold a state dict of tensors")
    return dict(state)


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _WRAPPERS:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


_DINOV2_HF = [  # transformers Dinov2Model name → timm VisionTransformer name
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.norm([12])\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.fc([12])\.", r"blocks.\1.mlp.fc\2."),
    (r"^layernorm\.", "norm."),
]
_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(\w+)$")


def remap_dinov2_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``Dinov2Model`` state dict in timm ``VisionTransformer`` names:
    query/key/value concatenated into ``qkv`` (timm's order), the mask token dropped."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key == "embeddings.mask_token":
            continue  # iBOT masking during pre-training only
        match = _QKV.match(key)
        if match:
            block, part, kind = match.groups()
            qkv.setdefault((block, kind), {})[part] = value
            continue
        for pattern, repl in _DINOV2_HF:
            if re.search(pattern, key):
                key = re.sub(pattern, repl, key)
                break
        out[key] = value
    for (block, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            missing = sorted({"query", "key", "value"} - set(parts))
            raise EncoderError(f"layer {block}: attention {kind} lacks {missing}")
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]], dim=0
        )
    return out


_KEY_MAPS = {"dinov2_hf": remap_dinov2_hf}


def _first_mismatch(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str:
    """A sentence naming the first key (in the architecture's order) that does not fit."""
    for key, value in own.items():
        if key not in state:
            return f"first mismatched key {key!r}: missing from the file"
        if tuple(state[key].shape) != tuple(value.shape):
            return (
                f"first mismatched key {key!r}: shape {tuple(state[key].shape)} in the file, "
                f"{tuple(value.shape)} in the architecture"
            )
    extra = next(k for k in state if k not in own)
    return f"first mismatched key {extra!r}: in the file, not in the architecture"


def fit_state_dict(
    encoder: Encoder, state: dict[str, torch.Tensor], path: Path
) -> dict[str, torch.Tensor]:
    """``state`` in the trunk's key names, checked key by key (:class:`EncoderError`)."""
    spec = encoder.spec
    state = _strip_wrappers(state)
    if spec.key_map:
        state = _KEY_MAPS[spec.key_map](state)
    own = encoder.trunk.state_dict()
    unused = (*_HEADS, *spec.drop_keys)
    state = {k: v for k, v in state.items() if k in own or not k.startswith(unused)}
    bad_shape = [k for k in own if k in state and state[k].shape != own[k].shape]
    if set(own) != set(state) or bad_shape:
        missing, extra = len(set(own) - set(state)), len(set(state) - set(own))
        raise EncoderError(
            f"encoder {spec.name}: {path} does not fit its architecture ({spec.timm_name}); "
            f"{_first_mismatch(own, state)} ({missing} missing, {extra} unexpected, "
            f"{len(bad_shape)} of another shape). Point --weights at the {spec.name} file "
            f"({spec.weights_file}) from {spec.weights_url or 'its publisher'}"
        )
    return state


def load_encoder(
    spec: EncoderSpec | str, weights: str | Path, *, device: str | torch.device = "cpu"
) -> Encoder:
    """A registered encoder with the weights of a local file (nothing is downloaded).

    Parameters
    ----------
    spec
        A registered encoder or its name (``cscvision encoders`` lists them).
    weights
        The local weights file (``.safetensors``, or ``.bin``/``.pth`` read with
        ``weights_only=True``).
    device
        Where to put the encoder.

    Returns
    -------
    Encoder
        A torch module in eval mode, float32: normalised float [B, 3, H, W] → [B, D].

    Raises
    ------
    EncoderError
        An unknown name, or a file that is missing or does not fit the architecture (the
        message names the encoder, the file and the first mismatched key).
    FeaturesUnavailable
        The ``features`` extra is not installed.

    Examples
    --------
    >>> encoder = cscvision.load_encoder("uni", "/models/uni/pytorch_model.bin")
    """
    spec = get_encoder_spec(spec) if isinstance(spec, str) else spec
    path = Path(weights)
    state = read_state_dict(path, spec.name)
    encoder = build_encoder(spec, device="meta")
    state = fit_state_dict(encoder, state, path)
    encoder.trunk.load_state_dict(state, strict=True, assign=True)
    encoder = encoder.float()
    on_meta = [n for n, t in [*encoder.named_parameters(), *encoder.named_buffers()] if t.is_meta]
    if on_meta:  # a buffer the file does not hold (none in the registered architectures)
        raise EncoderError(f"encoder {spec.name}: {path} leaves {on_meta[0]!r} unset")
    return encoder.eval().to(device)


def save_random_weights(spec: EncoderSpec | str, path: str | Path, *, seed: int = 0) -> Path:
    """Random-initialisation weights of ``spec`` as ``.safetensors`` (test encoders)."""
    from safetensors.torch import save_file

    from cscvision.core.io import atomic_path

    torch.manual_seed(seed)
    encoder = build_encoder(spec)
    state = {k: v.contiguous() for k, v in encoder.trunk.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))
    return Path(path)

"""Tile networks: torchvision backbones by name, with one output (a logit) per target.

Each has its record in the network registry (:data:`cscvision.models.registry.BACKBONE_SPECS`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from cscvision.models.cnn import small_cnn
from cscvision.models.registry import BACKBONE_SPECS


def _torchvision(name: str, head: Callable[[nn.Module, int], None]) -> Callable[[int], nn.Module]:
    def build(num_outputs: int) -> nn.Module:
        net = getattr(models, name)(weights=None)
        head(net, num_outputs)
        return net

    return build


def _fc_head(net: nn.Module, n: int) -> None:
    net.fc = nn.Linear(net.fc.in_features, n)


def _classifier_head(net: nn.Module, n: int) -> None:
    last = net.classifier[-1]
    net.classifier[-1] = nn.Linear(last.in_features, n)


BACKBONES: dict[str, Callable[[int], nn.Module]] = {
    "small_cnn": small_cnn,
    "resnet18": _torchvision("resnet18", _fc_head),
    "resnet34": _torchvision("resnet34", _fc_head),
    "resnet50": _torchvision("resnet50", _fc_head),
    "efficientnet_b0": _torchvision("efficientnet_b0", _classifier_head),
    "convnext_tiny": _torchvision("convnext_tiny", _classifier_head),
    "mobilenet_v3_large": _torchvision("mobilenet_v3_large", _classifier_head),
}


missing = set(BACKBONES) ^ set(BACKBONE_SPECS)
if missing:  # pragma: no cover - a programming error, caught on import
    raise RuntimeError(f"backbones and their registry records differ: {sorted(missing)}")


class DropoutLinear(nn.Linear):
    """A linear layer whose input passes a dropout first (its ``dropout`` child). Its
    parameters keep a plain linear layer's names, so weights load either way; the dropout
    is what ``--uncertainty mc`` switches on at inference."""

    def __init__(self, in_features: int, out_features: int, p: float, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.dropout = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.dropout(x))


def add_head_dropout(net: nn.Module, p: float) -> nn.Module:
    """Put a dropout of rate ``p`` before ``net``'s last linear layer (in place)."""
    parent, name, last = None, "", None
    for module in net.modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear):
                parent, name, last = module, child_name, child
    if last is None:
        raise ValueError(f"{type(net).__name__}: no linear layer to put a dropout before")
    head = DropoutLinear(last.in_features, last.out_features, p, bias=last.bias is not None)
    head.load_state_dict(last.state_dict())
    setattr(parent, name, head)
    return net


def get_model(name: str, num_outputs: int, head_dropout: float = 0.0) -> nn.Module:
    """A backbone by name with a fresh head of ``num_outputs`` logits (no weights
    downloaded); ``head_dropout`` > 0 puts a dropout of that rate before the head."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    net = BACKBONES[name](num_outputs)
    return add_head_dropout(net, head_dropout) if head_dropout > 0 else net


def load_pretrained(net: nn.Module, weights_path: str | Path) -> tuple[list[str], list[str]]:
    """Load a local backbone checkpoint (safetensors or a plain state dict) except the head.

    Returns (missing, unexpected) keys. Never unpickles arbitrary objects.
    """
    path = Path(weights_path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: pretrained weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    own = net.state_dict()
    # Drop the pretrained head: its shape is that of the source task's classes.
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"{path}: no tensor in this file matches the backbone's layers")
    result = net.load_state_dict(usable, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)

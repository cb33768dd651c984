"""Exported models: ``model.safetensors`` + ``model.json`` in one folder.

Loading never unpickles: weights come from safetensors, everything else from JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cscvision.core.io import atomic_path, write_json
from cscvision.models.card import (
    CARD_FILE,
    WEIGHTS_FILE,
    ModelCard,
    ModelError,
    read_card,
    resolve_model_dir,
)
from cscvision.models.kinds import ModelKind, UnknownKind, get_kind

__all__ = [
    "CARD_FILE",
    "WEIGHTS_FILE",
    "LoadedModel",
    "ModelCard",
    "ModelError",
    "export_model",
    "load_model",
    "read_card",
    "resolve_model_dir",
]


@dataclass(frozen=True)
class LoadedModel:
    """An exported model ready to run: its network (eval mode), card and folder."""

    net: torch.nn.Module
    card: ModelCard
    path: Path

    @property
    def kind(self) -> ModelKind:
        """What kind of model it is (:mod:`cscvision.models.kinds`): how its tiles become
        outputs, and its outputs slide outputs."""
        return get_kind(self.card.kind)


def export_model(
    net: torch.nn.Module,
    card: ModelCard,
    out_dir: str | Path,
    *,
    state: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``net``'s weights (or ``state``, the part of them to keep) and ``card`` into
    ``out_dir`` (each file atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = net.state_dict() if state is None else state
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"backbone": card.backbone, "name": card.name})
    write_json(out_dir / CARD_FILE, card.to_json())
    return out_dir


def load_model(
    model_dir: str | Path,
    device: str | torch.device = "cpu",
    *,
    encoder_weights: str | Path | None = None,
) -> LoadedModel:
    """Build the card's network and load its safetensors weights; eval mode, on ``device``.

    ``model_dir`` is an exported model folder or a packaged model name such as ``"demo"``.
    The card's kind builds the network (:meth:`ModelKind.build`): a head on an encoder is
    joined to the encoder loaded from ``encoder_weights``
    (:func:`cscvision.models.heads.load_head_net`). No Lightning is imported.
    """
    model_dir = resolve_model_dir(model_dir)
    card = read_card(model_dir)
    weights = model_dir / WEIGHTS_FILE
    if not weights.exists():
        raise ModelError(f"{weights}: weights file missing")
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ModelError(f"{weights}: cannot read safetensors weights ({e})") from None
    try:
        kind = get_kind(card.kind)
    except UnknownKind as e:
        raise ModelError(f"{model_dir / CARD_FILE}: {e}") from None
    net = kind.build(card, state, encoder_weights)
    return LoadedModel(net=net.eval().to(device), card=card, path=model_dir)

"""Exported models: ``model.safetensors`` + ``model.json`` in one folder.

Loading never unpickles: weights come from safetensors, everything else from JSON.
"""

from __future__ import annotations

import json
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
    """Write a network's weights and its card into a model folder.

    Parameters
    ----------
    net
        The network.
    card
        Its model card.
    out_dir
        The model folder (created).
    state
        The part of the weights to keep, when not all of ``net``'s (a fine-tuned encoder's
        tuned blocks and head).

    Returns
    -------
    pathlib.Path
        ``out_dir``, holding ``model.safetensors`` and ``model.json``, each written
        atomically.

    Examples
    --------
    >>> model = cscvision.load_model("demo")
    >>> cscvision.export_model(model.net, model.card, "models/copy")
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = net.state_dict() if state is None else state
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        # one metadata key: safetensors writes several in hash-map order, so the same
        # weights gave files (and weights_sha256 digests) that differed from export to export
        about = json.dumps({"backbone": card.backbone, "name": card.name}, sort_keys=True)
        save_file(state, str(tmp), metadata={"cscvision": about})
    write_json(out_dir / CARD_FILE, card.to_json())
    return out_dir


def load_model(
    model_dir: str | Path,
    device: str | torch.device = "cpu",
    *,
    encoder_weights: str | Path | None = None,
) -> LoadedModel:
    """Load an exported model: its network with the card's weights, in eval mode.

    Models load from safetensors and JSON only; nothing is unpickled. The card's kind
    (``ModelKind.build``, ``cscvision.models.kinds``) builds the network; no Lightning is
    imported.

    Parameters
    ----------
    model_dir
        An exported model folder, or a packaged model name such as ``"demo"``.
    device
        Where to put the network.
    encoder_weights
        For a head on a foundation-model encoder (the card names one): the encoder's local
        weights file; default the file named at training. Its sha256 must equal the card's.

    Returns
    -------
    LoadedModel
        ``net`` (the network), ``card``, ``path`` and ``kind``.

    Raises
    ------
    ModelError
        No model there, a card that does not fit, a kind that is not registered, weights
        that do not fit the network, or an encoder file whose digest differs from the card's.

    Examples
    --------
    >>> model = cscvision.load_model("demo")  # the packaged demo model: synthetic data only
    >>> model.card.targets, model.kind.name
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
    kind.check_card(card, str(model_dir / CARD_FILE))
    net = kind.build(card, state, encoder_weights)
    return LoadedModel(net=net.eval().to(device), card=card, path=model_dir)

"""Ensembles of exported models (``cscvision infer --model A --model B ...``, or a folder
holding several model folders; Lakshminarayanan et al., NeurIPS 2017).

Every member scores every tile through its own kind and calibration; the ensemble's score
is the mean of the members' calibrated probabilities (regression: of their scores in the
card's units), and with ``--uncertainty ensemble`` the standard deviation and mutual
information across members are written beside it. Members must read tiles alike and
predict the same things: same tile px, µm/px, normalisation (mean, std, stain template),
targets and target type, and a tile-scoring kind; anything else is refused naming the two
members that differ.

The ensemble's card is the first member's with: a name listing the members, the members'
mean threshold per target (each chosen on its own validation split, on its calibrated
scale; the rule is stated in the card), no calibration (each member's is applied before
averaging) and, for regression, scores already in the card's units. The OOD record is
the first member's, read from its network.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cscvision.models.card import CARD_FILE, WEIGHTS_FILE, ModelCard, ModelError
from cscvision.models.export import LoadedModel, load_model

MAX_MEMBERS = 32
# what members must share, with the phrase a refusal uses
SHARED = {
    "tile_px": "tile size",
    "mpp": "µm/px",
    "mean": "normalisation mean",
    "std": "normalisation std",
    "stain": "stain template",
    "targets": "targets",
    "target_type": "target type",
}


@dataclasses.dataclass(frozen=True)
class LoadedEnsemble(LoadedModel):
    """Several exported models scored as one (``net`` holds the members' networks)."""

    members: tuple[LoadedModel, ...] = ()

    def member_outputs(self, x: torch.Tensor) -> np.ndarray:
        """Each member's per-tile outputs (calibrated probabilities or scores) on a
        normalised batch: float32 [M, B, T]."""
        return np.stack(
            [m.kind.tile_outputs(m.card, m.net(x).float()) for m in self.members]
        ).astype(np.float32)


def member_folders(path: str | Path) -> list[Path]:
    """The model folders directly inside ``path`` (each holding a card), sorted."""
    return sorted(p for p in Path(path).iterdir() if (p / CARD_FILE).is_file())


def load_models(
    paths: Sequence[str | Path],
    device: str | torch.device = "cpu",
    *,
    encoder_weights: str | Path | None = None,
) -> LoadedModel:
    """One model (a folder or a packaged name), or an ensemble: several folders, or one
    folder with no card of its own holding two or more model folders."""
    paths = list(paths)
    if len(paths) == 1 and Path(paths[0]).is_dir() and not (Path(paths[0]) / CARD_FILE).exists():
        inside = member_folders(paths[0])
        if len(inside) >= 2:
            paths = inside
    if len(paths) == 1:
        return load_model(paths[0], device, encoder_weights=encoder_weights)
    if len(paths) > MAX_MEMBERS:
        raise ModelError(f"--model: {len(paths)} members; an ensemble takes at most {MAX_MEMBERS}")
    members = [load_model(p, device, encoder_weights=encoder_weights) for p in paths]
    return ensemble_of(members)


def ensemble_of(members: Sequence[LoadedModel]) -> LoadedEnsemble:
    """The ensemble of loaded ``members`` (two or more), checked to read and predict alike."""
    if len(members) < 2:
        raise ModelError("an ensemble needs two or more models")
    first = members[0]
    for m in members:
        if m.kind.slide_level:
            raise ModelError(
                f"{m.path}: a slide-level ({m.kind.name}) model cannot be an ensemble "
                "member; ensembles are for tile-scoring models"
            )
        for field, phrase in SHARED.items():
            a, b = getattr(first.card, field), getattr(m.card, field)
            if a != b:
                raise ModelError(
                    f"ensemble members differ in {phrase}: {first.path} has {a!r}, "
                    f"{m.path} has {b!r}; use models trained on the same grid and targets"
                )
    card = _ensemble_card([m.card for m in members])
    net = torch.nn.ModuleList([m.net for m in members])
    return LoadedEnsemble(net=net, card=card, path=first.path, members=tuple(members))


def _ensemble_scale(cards: Sequence[ModelCard]) -> dict[str, list[float]]:
    """The members' regression scales pooled for the ensemble card's colour range and floor
    (mean of means and of SDs, least min, greatest max). Only drawn from: each member's
    outputs are rescaled by its own card (:meth:`LoadedEnsemble.member_outputs`)."""
    scales = [c.output_scale for c in cards]
    if not all(scales):
        return {}
    out = {k: np.mean([s[k] for s in scales], axis=0).tolist() for k in ("mean", "std")}
    if all("min" in s and "max" in s for s in scales):
        out["min"] = np.min([s["min"] for s in scales], axis=0).tolist()
        out["max"] = np.max([s["max"] for s in scales], axis=0).tolist()
    return out


def _ensemble_card(cards: Sequence[ModelCard]) -> ModelCard:
    first = cards[0]
    thresholds = {}
    for t in first.targets:
        values = [c.thresholds[t] for c in cards if t in c.thresholds]
        if len(values) == len(cards):
            thresholds[t] = float(np.mean(values))
    names = "+".join(c.name for c in cards)
    return dataclasses.replace(
        first,
        name=f"ensemble-{hashlib.sha256(names.encode()).hexdigest()[:8]}",
        thresholds=thresholds,
        calibration={},
        output_scale=_ensemble_scale(cards),
        trained_on=f"ensemble of {len(cards)} models: {', '.join(c.name for c in cards)}",
        training={
            **first.training,
            "ensemble": {
                "members": [c.name for c in cards],
                "threshold_rule": "mean of the members' thresholds (each chosen on its own "
                "validation split, on its calibrated scale)",
            },
        },
    )


def ensemble_weights_digest(model: LoadedModel) -> str:
    """sha256 over the members' weights files (one model: its weights file's)."""
    members = model.members if isinstance(model, LoadedEnsemble) else (model,)
    h = hashlib.sha256()
    for m in members:
        h.update((Path(m.path) / WEIGHTS_FILE).read_bytes())
    return h.hexdigest()

"""Per-tile trust columns at inference: the OOD score (when the model keeps an OOD record,
:mod:`cscvision.models.ood`) and, when asked, per-target uncertainty
(:mod:`cscvision.models.uncertainty`).

The scorer appends them to a batch's per-tile outputs, so corrupt tiles, tile order and
process boundaries treat them as they treat the scores; :func:`split_trust` takes them off
again before the model kind turns the scores into maps.
"""

from __future__ import annotations

import numpy as np
import torch

from cscvision.models.card import ModelCard
from cscvision.models.ensemble import LoadedEnsemble
from cscvision.models.export import LoadedModel
from cscvision.models.ood import OODScorer, feature_tap, load_ood

OOD_COLUMN = "ood"


def card_stain(card: ModelCard):
    """The card's stain normalisation template (:class:`~cscvision.slides.stain.StainReference`),
    or None. Macenko/Vahadane unmix each slide's tiles with that slide's own stains
    (:mod:`cscvision.slides.slide_stains`, fitted once per slide) and recompose them with the
    template's; Reinhard matches each tile's L*a*b* statistics."""
    from cscvision.slides.stain import StainReference

    return StainReference.from_dict(card.stain) if card.stain else None


def has_ood(model: LoadedModel) -> bool:
    """Whether inference scores ``model``'s tiles for OOD (see :func:`ood_scorer`)."""
    return bool(model.card.ood)


def ood_scorer(model: LoadedModel) -> OODScorer | None:
    """The model's OOD scorer, or None (no record in its card). A MIL model's is read on
    its tile embeddings (:data:`cscvision.models.ood.MIL_FEATURES`)."""
    if not has_ood(model):
        return None
    return load_ood(model.path, model.card)


def trust_columns(card: ModelCard, *, ood: bool, uncertainty: str | None = None) -> list[str]:
    """Names of the trust columns a scorer appends, in order."""
    names = [OOD_COLUMN] if ood else []
    if uncertainty:
        from cscvision.models.uncertainty import uncertainty_columns

        names += uncertainty_columns(card.targets, regression=card.is_regression)
    return names


def check_uncertainty(model: LoadedModel, spec: str | None) -> tuple[str, int] | None:
    """The parsed ``--uncertainty`` value, refused for MIL models (OOD only) and for
    ``mc`` on a network without dropout."""
    from cscvision.models.uncertainty import (
        UncertaintyError,
        dropout_layers,
        parse_uncertainty,
    )

    parsed = parse_uncertainty(spec)
    if parsed is None:
        return None
    if model.kind.slide_level:
        raise UncertaintyError(
            f"--uncertainty: model {model.card.name!r} is a slide-level ({model.kind.name}) "
            "model; per-tile uncertainty is for tile-scoring models"
        )
    ensemble = isinstance(model, LoadedEnsemble)
    if ensemble != (parsed[0] == "ensemble"):
        raise UncertaintyError(
            f"--uncertainty {spec}: give two or more --model for an ensemble"
            if not ensemble
            else f"--uncertainty {spec}: with an ensemble of models use --uncertainty ensemble"
        )
    if parsed[0] == "mc" and not dropout_layers(model.net):
        raise UncertaintyError(
            f"--uncertainty {spec}: model {model.card.name!r} has no dropout layer; "
            "use --uncertainty tta"
        )
    return parsed


def scored_with_uncertainty(scorer, x: torch.Tensor) -> np.ndarray:
    """A :class:`~cscvision.inference.predict.TileScorer` batch with uncertainty: the
    predictive mean, then the OOD ratio (read with dropout off: from view 0 for ``tta``,
    from one plain pass more for ``mc``) and the uncertainty columns."""
    from cscvision.models.uncertainty import uncertain_outputs

    method = scorer.uncertainty[0]
    ratio = []
    if scorer.ood is not None and method == "mc":
        ratio = [run_with_ood(scorer.net, x, scorer.ood)[1]]
    features = scorer.ood.features if scorer.ood is not None else None
    with feature_tap(scorer.net, features) as seen:
        mean, columns, _ = uncertain_outputs(
            scorer.net, x, scorer.uncertainty,
            lambda logits: scorer.kind.tile_outputs(scorer.card, logits),
            probabilities=not scorer.card.is_regression,
        )  # fmt: skip
    if scorer.ood is not None and method == "tta":
        ratio = [ood_ratio(scorer.ood, seen[0])]
    return np.column_stack([mean, *ratio, columns])


def scored_ensemble(scorer, x: torch.Tensor) -> np.ndarray:
    """A :class:`~cscvision.inference.predict.TileScorer` batch of an ensemble: the mean of
    the members' outputs, then the OOD ratio (from the first member's network) and, with
    ``--uncertainty ensemble``, the spread across members."""
    from cscvision.models.uncertainty import predictive_stats

    model = scorer.model
    probabilities = not scorer.card.is_regression
    ratio = []
    if scorer.ood is not None:
        with feature_tap(model.members[0].net, scorer.ood.features) as seen:
            outputs = model.member_outputs(x)
        ratio = [ood_ratio(scorer.ood, seen[0])]
    else:
        outputs = model.member_outputs(x)
    stats = predictive_stats(outputs, probabilities=probabilities)
    columns = []
    if scorer.uncertainty is not None:
        columns = [stats["std"]] + ([stats["mi"]] if probabilities else [])
    return np.column_stack([stats["mean"], *ratio, *columns])


def ood_ratio(scorer: OODScorer, features: torch.Tensor) -> np.ndarray:
    """OOD scores as multiples of the validation tiles' 99th percentile: > 1 is beyond it."""
    return (scorer(features) / scorer.tile_threshold).cpu().numpy()


def run_with_ood(net: torch.nn.Module, x: torch.Tensor, scorer: OODScorer):
    """Logits of ``net`` on ``x`` and the OOD ratio of each tile (one forward pass)."""
    with feature_tap(net, scorer.features) as seen:
        logits = net(x).float()
    return logits, ood_ratio(scorer, seen[-1])


def split_trust(rows: np.ndarray, names: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per-tile outputs [N, W + K] → the outputs [N, W] and the K trust columns by name."""
    if not names:
        return rows, {}
    k = len(names)
    trust = {name: np.ascontiguousarray(rows[:, -k + i]) for i, name in enumerate(names)}
    return rows[:, :-k], trust

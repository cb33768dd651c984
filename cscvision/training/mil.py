"""Attention MIL over bags of stored tile features: gated attention (Ilse et al. 2018)
and CLAM-SB (Lu et al. 2021).

A slide is a bag of its tiles' encoder features ``[N, D]``. Each tile is embedded
(``h_i``), scored by a gated attention (``a_i = softmax_i(w · tanh(V h_i) ⊙ σ(U h_i))``)
and the slide is ``z = Σ a_i h_i``; one linear head per output reads ``z`` (and the
covariates, when given). Because the heads are linear, a regression output is exactly
``b + Σ_i a_i (W h_i)``: the per-tile contribution ``a_i (W h_i)`` sums to the slide's
prediction, which is what the contribution maps show. The same holds for class logits, so
a slide's prediction can be computed from per-tile parts scored batch by batch
(:class:`MILTileNet`, :func:`aggregate`): that is how ``cscvision infer`` runs MIL models.

CLAM-SB is the same single attention branch plus CLAM's instance-level clustering loss:
for each classification target, the ``k`` most and least attended tiles of a training
bag are pseudo-labelled for an in-class instance classifier of the slide's class (and the
most attended as negatives for the other classes' classifiers), and the loss is
``0.7 × bag loss + 0.3 × instance loss`` (CLAM's ``bag_weight``). It needs a
classification target (a tercile of a continuous column will do).

Several targets train at once: regression targets (standardised with the training
slides' mean and sd, MSE) and classification targets (cross-entropy). Training samples up
to ``max_bag`` tiles of a bag per step; evaluation uses whole bags.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated

import lightning as L
import numpy as np
import torch
from pydantic import Field
from pydantic.dataclasses import dataclass as pydantic_dataclass
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cscvision.core.errors import CscvisionError
from cscvision.models.mil_net import ARCHITECTURES, GatedAttentionMIL
from cscvision.training.config_sections import SECTION, MILNetConfig, OptimConfig

CLAM_BAG_WEIGHT = 0.7


class MILError(CscvisionError, ValueError):
    """MIL settings that do not fit the data (architecture, folds); the message names them."""


@pydantic_dataclass(frozen=True, config=SECTION)
class MILConfig(MILNetConfig):
    """The network and schedule (:class:`~cscvision.training.config_sections.MILNetConfig`,
    the defaults of the training config's ``mil`` section) with the optimiser and seed."""

    lr: Annotated[float, Field(gt=0)] = OptimConfig.lr
    weight_decay: Annotated[float, Field(ge=0)] = OptimConfig.weight_decay
    seed: Annotated[int, Field(ge=0)] = 0


@dataclass(frozen=True)
class Bag:
    slide_id: str
    features: np.ndarray  # float [N, D]
    xy_l0: np.ndarray  # int [N, 2]


@dataclass(frozen=True)
class BagTargets:
    """Per-slide targets in bag order: regression float [S, R] (NaN missing), classification
    int [S, C] (-1 missing), covariates float [S, K]."""

    regression: np.ndarray
    classification: np.ndarray
    n_classes: tuple[int, ...]
    covariates: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))


class BagDataset(Dataset):
    def __init__(self, bags: Sequence[Bag], targets: BagTargets, *, max_bag: int | None, seed: int):
        self.bags, self.targets, self.max_bag = bags, targets, max_bag
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        feats = self.bags[i].features
        if self.max_bag and len(feats) > self.max_bag:
            feats = feats[np.sort(self.rng.choice(len(feats), self.max_bag, replace=False))]
        t = self.targets
        cov = t.covariates[i] if t.covariates.size else np.zeros(0)
        return {
            "x": torch.as_tensor(np.asarray(feats, np.float32)),
            "reg": torch.as_tensor(t.regression[i], dtype=torch.float32),
            "cls": torch.as_tensor(t.classification[i], dtype=torch.long),
            "cov": torch.as_tensor(np.nan_to_num(cov), dtype=torch.float32),
        }


def _single(items: list[dict]) -> dict:
    return items[0]  # bags differ in length: one bag per step


class MILSystem(L.LightningModule):
    """The Lightning system: a :class:`GatedAttentionMIL` and its multi-target loss."""

    def __init__(self, net: GatedAttentionMIL, *, lr: float = 1e-3, weight_decay: float = 1e-4):
        super().__init__()
        self.net, self.lr, self.weight_decay = net, lr, weight_decay

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        h, a = self.net.attend(batch["x"])
        reg, logits, _ = self.net.pool(h, a, batch["cov"])
        loss = self._bag_loss(reg, logits, batch)
        if any(len(heads) for heads in self.net.instance):
            instance = self.net.instance_loss(h, a, batch["cls"])
            loss = CLAM_BAG_WEIGHT * loss + (1 - CLAM_BAG_WEIGHT) * instance
        self.log("train_loss", loss, batch_size=1, prog_bar=False)
        return loss

    def _bag_loss(self, reg, logits, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = batch["x"].new_zeros(())
        if reg is not None:
            known = torch.isfinite(batch["reg"])
            if known.any():
                loss = loss + ((reg[known] - batch["reg"][known]) ** 2).mean()
        for c, out in enumerate(logits):
            label = batch["cls"][c]
            if label >= 0:
                loss = loss + nn.functional.cross_entropy(out[None], label[None])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def make_mil_net(cfg: MILConfig, in_dim: int, targets: BagTargets) -> GatedAttentionMIL:
    """An untrained net of ``cfg.architecture`` for ``targets``; ``MILError`` naming the
    setting when the two do not fit."""
    architecture = resolve_architecture(cfg.architecture, has_classes=bool(targets.n_classes))
    if architecture == "instance_linear":
        raise MILError("mil.architecture instance_linear is fitted in closed form: use fit_mil")
    clam = architecture == "clam_sb"
    if clam and not targets.n_classes:
        raise MILError(
            "mil.architecture clam_sb: its instance loss needs a classification target; add "
            "one (e.g. NAME:tercile) or use gated_attention"
        )
    return GatedAttentionMIL(
        in_dim,
        n_regression=targets.regression.shape[1],
        n_classes=targets.n_classes,
        n_covariates=targets.covariates.shape[1] if targets.covariates.size else 0,
        hidden=cfg.hidden,
        attention=cfg.attention,
        dropout=cfg.dropout,
        instance_heads=clam,
        mean_pool=architecture == "mean",
    )


def check_architecture(architecture: str) -> str:
    """``architecture`` when it is one of :data:`ARCHITECTURES`, else ``MILError``."""
    if architecture not in ARCHITECTURES:
        raise MILError(
            f"mil.architecture {architecture!r}: choose one of {', '.join(ARCHITECTURES)}"
        )
    return architecture


def resolve_architecture(architecture: str, *, has_classes: bool) -> str:
    """The network ``architecture`` names. ``auto`` (the default): ``instance_linear`` when
    every target is a regression (a fraction or score of the whole section: the mean of
    per-tile predictions), ``gated_attention`` when any is a class (presence: a few tiles
    may decide). ``instance_linear`` with a class target is a ``MILError``."""
    architecture = check_architecture(architecture)
    if architecture == "auto":
        return "gated_attention" if has_classes else "instance_linear"
    if architecture == "instance_linear" and has_classes:
        raise MILError(
            "mil.architecture instance_linear fits regression targets only; drop the class "
            "target (NAME:tercile or a categorical label) or use gated_attention"
        )
    return architecture


def fit_mil(
    bags: Sequence[Bag],
    targets: BagTargets,
    cfg: MILConfig,
    groups: Sequence[str] | None = None,
) -> GatedAttentionMIL:
    """Train a model on ``bags`` (regression targets already standardised); ``groups``
    (each bag's patient) keep a patient's slides in one inner fold where a fit chooses its
    penalty by cross-validation (``instance_linear``)."""
    architecture = resolve_architecture(cfg.architecture, has_classes=bool(targets.n_classes))
    if architecture == "instance_linear":
        from cscvision.training.mil_linear import fit_instance_linear

        return fit_instance_linear(
            [b.features for b in bags], targets.regression, groups,
            covariates=targets.covariates, seed=cfg.seed,
        )  # fmt: skip
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    net = make_mil_net(cfg, bags[0].features.shape[1], targets)
    loader = DataLoader(
        BagDataset(bags, targets, max_bag=cfg.max_bag, seed=cfg.seed),
        batch_size=1,
        shuffle=True,
        collate_fn=_single,
    )
    trainer = L.Trainer(
        max_epochs=cfg.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accumulate_grad_batches=cfg.accumulate,
    )
    trainer.fit(MILSystem(net, lr=cfg.lr, weight_decay=cfg.weight_decay), loader)
    return net.eval()


@dataclass(frozen=True)
class BagPrediction:
    slide_id: str
    regression: np.ndarray  # [R], standardised units
    class_probs: list[np.ndarray]  # per classification target: [K]
    attention: np.ndarray  # [N], sums to 1
    contributions: np.ndarray  # [N, R], standardised units


@torch.inference_mode()
def predict_bags(
    net: GatedAttentionMIL, bags: Sequence[Bag], covariates: np.ndarray | None = None
) -> list[BagPrediction]:
    """Whole-bag predictions, attention and per-tile contributions."""
    net.eval()
    out = []
    for i, bag in enumerate(bags):
        x = torch.as_tensor(np.asarray(bag.features, np.float32))
        cov = None
        if covariates is not None and covariates.size:
            cov = torch.as_tensor(np.nan_to_num(covariates[i]), dtype=torch.float32)
        reg, logits, a = net(x, cov)
        contrib = net.contributions(x) if net.regression is not None else torch.zeros(len(x), 0)
        out.append(
            BagPrediction(
                bag.slide_id,
                reg.numpy() if reg is not None else np.zeros(0),
                [torch.softmax(lg, 0).numpy() for lg in logits],
                a.numpy(),
                contrib.numpy(),
            )
        )
    return out


def attention_scale(attention: np.ndarray) -> np.ndarray:
    """Attention on a scale that compares across slides: weight × number of tiles (1 = the
    slide's average tile; 3 = three times the average tile's weight)."""
    return np.asarray(attention, np.float64) * len(attention)

"""The training system: ``TileClassifier`` holds a tile network and trains it on soft targets.

Loss: BCE-with-logits on soft targets (fractions of each tile's tissue per target), with an
optional ``pos_weight``, averaged over targets and then over tiles, each tile counted by its
sample weight where batches carry one (``"weight"``: a tile-label table's column). A target
a tile has no label for (NaN, e.g. a marker whose registration was refused) is left out of
the loss and of that target's metrics; the tile still trains the targets it has. Metrics
per target, at tile and slide level, on validation and test: AUROC, average precision, and
F1 at the threshold that maximises F1 on validation; they count every held-out tile once,
whatever its weight. Soft targets are binarised at 0.5 for metrics; a slide is positive
when its mean target fraction exceeds ``slide_cutoff``. Predictions are gathered across DDP
ranks by a torchmetrics state (each tile once, whatever the world size), and the evaluation
loss is computed from them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_precision_recall_curve,
)
from torchmetrics.utilities import dim_zero_cat

from cscvision.core.errors import CscvisionError
from cscvision.models.backbones import get_model, load_pretrained
from cscvision.models.card import IMAGENET_MEAN, IMAGENET_STD
from cscvision.slides.slide_stains import cohort_stains, per_tile
from cscvision.slides.stain import StainReference, normalise_batch
from cscvision.training.augment import augment_batch, augment_preset, normalize, to_unit_float

log = logging.getLogger(__name__)

SCHEDULERS = ("cosine", "onecycle", "none")
# what a batch gives the network: uint8 tile images (augmented in training, normalised), or
# tile features from a store (a head on a frozen encoder), used as they are
INPUTS = ("image", "features")
LABEL_CUTOFF = 0.5  # soft target ≥ this counts as positive for metrics


class TilePredictions(Metric):
    """Every tile's logits, soft targets, slide index and level-0 ``xy``, gathered across ranks.

    Under DDP, Lightning's ``DistributedSampler`` pads the evaluation tiles so that every rank
    gets as many (up to ``world_size - 1`` tiles are seen twice). :meth:`compute` keeps one
    row per tile (a tile is its slide and ``xy``) and sorts the rows by (slide, y, x), so the
    metrics are those of every tile once, whatever the world size and batch order.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("logits", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")
        self.add_state("slide_idx", default=[], dist_reduce_fx="cat")
        self.add_state("xy", default=[], dist_reduce_fx="cat")

    def update(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        slide_idx: torch.Tensor,
        xy: torch.Tensor,
    ) -> None:
        self.logits.append(logits.detach().float())
        self.targets.append(targets.detach().float())
        self.slide_idx.append(slide_idx.detach().long())
        self.xy.append(xy.detach().long().reshape(-1, 2))

    def compute(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits [N, T], soft targets [N, T], slide_idx [N])``, one row per tile."""
        logits, targets = dim_zero_cat(self.logits), dim_zero_cat(self.targets)
        slide_idx, xy = dim_zero_cat(self.slide_idx), dim_zero_cat(self.xy).reshape(-1, 2)
        if len(logits) == 0:
            return logits, targets, slide_idx
        keys = torch.stack([slide_idx, xy[:, 1], xy[:, 0]], dim=1)
        _, inverse = torch.unique(keys, dim=0, return_inverse=True)  # sorted by (slide, y, x)
        rows = torch.arange(len(keys), device=keys.device)
        first = torch.full((int(inverse.max()) + 1,), len(keys), device=keys.device)
        first = first.scatter_reduce(0, inverse, rows, reduce="amin")
        return logits[first], targets[first], slide_idx[first]


def best_f1_threshold(probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """The threshold maximising F1 of ``probs ≥ t`` against 0/1 ``labels``: (t, F1)."""
    if labels.sum() == 0:
        return 0.5, float("nan")
    precision, recall, thresholds = binary_precision_recall_curve(probs, labels.long())
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    best = int(torch.argmax(f1[: len(thresholds)]))
    return float(thresholds[best]), float(f1[best])


def f1_at(probs: torch.Tensor, labels: torch.Tensor, threshold: float) -> float:
    predicted = probs >= threshold
    tp = float((predicted & (labels > 0)).sum())
    denom = float(predicted.sum() + (labels > 0).sum())
    return 2 * tp / denom if denom else float("nan")


def _both_classes(labels: torch.Tensor) -> bool:
    return 0 < int(labels.sum()) < len(labels)


def slide_means(values: torch.Tensor, slide_idx: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` [N, T] per slide, in the order of ``slide_idx.unique()``; NaN
    values (no label) are left out, and a slide with none of a column's values gets NaN."""
    _, inverse = torch.unique(slide_idx, return_inverse=True)
    n = int(inverse.max()) + 1 if len(inverse) else 0
    known = ~torch.isnan(values)
    sums = torch.zeros(n, values.shape[1], dtype=values.dtype, device=values.device)
    sums.index_add_(0, inverse, torch.where(known, values, torch.zeros_like(values)))
    counts = torch.zeros_like(sums).index_add_(0, inverse, known.to(values.dtype))
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, math.nan))


def target_metrics(
    probs: torch.Tensor,
    labels: torch.Tensor,
    threshold: float | None,
) -> dict[str, float]:
    """AUROC, AP and F1 of one target; F1 at ``threshold`` or at the best one (also returned).

    AUROC and AP are left out where the labels hold only one class (they are undefined).
    """
    out: dict[str, float] = {}
    binary = labels.long()
    if _both_classes(binary):
        out["auroc"] = float(binary_auroc(probs, binary))
        out["ap"] = float(binary_average_precision(probs, binary))
    if threshold is None:
        threshold, out["f1"] = best_f1_threshold(probs, binary)
    else:
        out["f1"] = f1_at(probs, binary, threshold)
    out["threshold"] = threshold
    return out


def evaluate(
    probs: torch.Tensor,
    targets: torch.Tensor,
    slide_idx: torch.Tensor,
    target_names: Sequence[str],
    *,
    thresholds: Sequence[float] | None = None,
    slide_cutoff: float = 0.05,
) -> dict[str, float]:
    """Tile- and slide-level metrics per target, named ``<metric>_<target>`` and ``slide_…``.

    Without ``thresholds`` each target's F1 threshold is chosen to maximise F1 here.
    """
    out: dict[str, float] = {}
    slide_probs = slide_means(probs, slide_idx)
    slide_targets = slide_means(targets, slide_idx)
    for t, name in enumerate(target_names):
        given = None if thresholds is None else float(thresholds[t])
        known = ~torch.isnan(targets[:, t])  # tiles without this target's label count not
        tile = target_metrics(probs[known, t], targets[known, t] >= LABEL_CUTOFF, given)
        out |= {f"{k}_{name}": v for k, v in tile.items()}
        known = ~torch.isnan(slide_targets[:, t])
        slide = target_metrics(
            slide_probs[known, t], slide_targets[known, t] > slide_cutoff, tile["threshold"]
        )
        out |= {f"slide_{k}_{name}": v for k, v in slide.items() if k in ("auroc", "ap")}
    out["n_tiles"] = float(len(probs))
    out["n_slides"] = float(len(slide_probs))
    aurocs = [out[f"auroc_{n}"] for n in target_names if f"auroc_{n}" in out]
    out["auroc_mean"] = sum(aurocs) / len(aurocs) if aurocs else 0.5  # undefined: chance
    return out


def masked_mean(
    values: torch.Tensor, known: torch.Tensor, weight: torch.Tensor | None
) -> torch.Tensor:
    """Mean of per-(tile, target) ``values`` [B, T] over the entries ``known`` [B, T] holds,
    each counted by its tile's ``weight`` [B]: Σ w·m·v / Σ w·m; with every entry known, the
    tiles' weighted mean of their per-target means. 0 where nothing counts."""
    w = known.to(values.dtype)
    if weight is not None:
        w = w * weight.to(values).reshape(-1, 1)
    total = (w * torch.where(known, values, torch.zeros_like(values))).sum()
    return total / w.sum().clamp_min(torch.finfo(values.dtype).tiny)


def weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-tile ``values`` [B], each counted ``weight`` [B] times (a tile-label
    table's ``weight`` column): Σ w·v / Σ w, 0 for a batch whose weights are all 0."""
    if weight is None:
        return values.mean()
    weight = weight.to(values)
    return (weight * values).sum() / weight.sum().clamp_min(torch.finfo(values.dtype).tiny)


class TileClassifier(L.LightningModule):
    """A tile network (``net``, from :func:`~cscvision.models.backbones.get_model`), trained.

    Batches are ``{"image": uint8 [B,3,H,W], "xy", "target": float [B,T], "slide_idx"}``;
    augmentation (training only) and normalisation ``(x/255 − mean)/std`` run here, on the
    batch's device, outside autocast. ``thresholds`` (a buffer, saved in checkpoints) is
    set after each validation epoch to the F1-maximising threshold per target; test F1
    uses it. ``load_from_checkpoint(path, pretrained=None)`` skips re-reading the
    pretrained file (the checkpoint's weights replace it anyway).
    """

    def __init__(
        self,
        *,
        net: nn.Module | None = None,
        backbone: str = "small_cnn",
        targets: Sequence[str] = ("stemness", "immunosuppressive"),
        pretrained: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        scheduler: str = "cosine",
        warmup_frac: float = 0.05,
        pos_weight: Sequence[float] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        augment: str = "histo",
        slide_cutoff: float = 0.05,
        channels_last: bool = True,
        encoder_lr_scale: float = 1.0,
        inputs: str = "image",
        head_dropout: float = 0.0,
        stain: dict[str, Any] | None = None,
    ):
        super().__init__()
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler {scheduler!r}: choose one of {SCHEDULERS}")
        if inputs not in INPUTS:
            raise ValueError(f"inputs {inputs!r}: choose one of {INPUTS}")
        self.save_hyperparameters(ignore=["net"])
        self.target_names = tuple(targets)
        self.augment_params = augment_preset(augment)
        self.stain = StainReference.from_dict(stain) if stain else None
        # Macenko/Vahadane: each slide's own stains by ``slide_idx`` (slides.slide_stains,
        # set with the data: :meth:`use_slide_stains`); None unmixes with the reference's
        self.stain_sources: list[StainReference] | None = None
        self.net = (
            net
            if net is not None
            else self._build(backbone, len(targets), pretrained, head_dropout)
        )
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.register_buffer("thresholds", torch.full((len(targets),), 0.5))
        weight = None if pos_weight is None else torch.tensor(pos_weight, dtype=torch.float32)
        if weight is not None and weight.shape != (len(targets),):
            raise ValueError(f"pos_weight needs one value per target {self.target_names}")
        self.register_buffer("pos_weight", weight)
        self.val_preds = TilePredictions()
        self.test_preds = TilePredictions()
        self.last_metrics: dict[str, dict[str, float]] = {}
        # every evaluated tile's (logits, soft targets) per stage, for calibration
        self.last_predictions: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.calibration: dict[str, Any] = {}  # set after training; see training.calibration

    @staticmethod
    def _build(
        backbone: str, n_outputs: int, pretrained: str | None, head_dropout: float = 0.0
    ) -> nn.Module:
        net = get_model(backbone, n_outputs, head_dropout=head_dropout)
        if pretrained:
            missing, _ = load_pretrained(net, pretrained)
            log.info(
                "%s: loaded pretrained weights from %s (%d new layers)",
                backbone,
                pretrained,
                len(missing),
            )
        else:
            log.warning(
                "%s: no pretrained weights given (model.pretrained); training from scratch",
                backbone,
            )
        return net

    # --- forward -------------------------------------------------------------------------
    def use_slide_stains(self, slides: Sequence[tuple[str, float | None]]) -> None:
        """Fit (or take from the cache) the stains of ``slides`` (path, µm/px override, in
        ``slide_idx`` order) for a Macenko/Vahadane ``stain`` reference."""
        self.stain_sources = cohort_stains(slides, self.stain)

    def prepare_images(
        self, image: torch.Tensor, *, train: bool, slide_idx: torch.Tensor | None = None
    ) -> torch.Tensor:
        """uint8 batch → augmented (if ``train``) and normalised float batch; ``slide_idx``
        picks each tile's slide stains (:meth:`use_slide_stains`)."""
        with torch.autocast(device_type=image.device.type, enabled=False):
            if self.stain is not None:  # float 0-255, as inference normalises tiles
                source = per_tile(self.stain_sources, slide_idx)
                image = normalise_batch(image, self.stain, source=source)
            x = to_unit_float(image)
            if train:
                x = augment_batch(x, self.augment_params)
            if self.hparams.channels_last:  # colour jitter may hand back NCHW
                x = x.contiguous(memory_format=torch.channels_last)
            return normalize(x, self.mean, self.std)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits [B, T] for a uint8 batch (no augmentation)."""
        return self.net(self.prepare_images(image, train=False))

    def _loss(
        self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        target = target.float()
        known = ~torch.isnan(target)
        losses = nn.functional.binary_cross_entropy_with_logits(
            logits.float(),
            torch.where(known, target, torch.zeros_like(target)),
            pos_weight=self.pos_weight,
            reduction="none",
        )
        return masked_mean(losses, known, weight)

    def batch_logits(self, batch: dict[str, torch.Tensor], *, train: bool) -> torch.Tensor:
        """The network's outputs for a batch's images (``inputs="image"``) or stored
        features (``inputs="features"``)."""
        if self.hparams.inputs == "features":
            return self.net(batch["features"].float())
        image, slide_idx = batch["image"], batch.get("slide_idx")
        return self.net(self.prepare_images(image, train=train, slide_idx=slide_idx))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.batch_logits(batch, train=True)
        loss = self._loss(logits, batch["target"], batch.get("weight"))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str, preds: Metric) -> None:
        # The loss, like every evaluation metric, is computed at the epoch's end from the
        # predictions of all ranks (each tile once): see TilePredictions.
        logits = self.batch_logits(batch, train=False)
        preds.update(logits, batch["target"], batch["slide_idx"], batch["xy"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_preds)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_preds)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        probs = torch.sigmoid(self.batch_logits(batch, train=False).float())
        return {"xy": batch["xy"], "slide_idx": batch["slide_idx"], "probs": probs}

    # --- epoch ends: metrics ---------------------------------------------------------------
    def _epoch_metrics(self, stage: str, preds: TilePredictions, choose: bool) -> None:
        logits, targets, slide_idx = preds.compute()
        preds.reset()
        if len(logits) == 0:
            return
        self.last_predictions[stage] = (logits.cpu(), targets.cpu())
        probs = self._probabilities(logits)
        thresholds = None if choose else self.thresholds.tolist()
        metrics = evaluate(
            probs,
            targets,
            slide_idx,
            self.target_names,
            thresholds=thresholds,
            slide_cutoff=self.hparams.slide_cutoff,
        )
        metrics["loss"] = float(self._loss(logits, targets))
        if choose and not self.trainer.sanity_checking:
            chosen = [metrics[f"threshold_{n}"] for n in self.target_names]
            self.thresholds.copy_(torch.tensor(chosen, device=self.thresholds.device))
        self.last_metrics[stage] = metrics
        finite = {
            f"{stage}/{k}": v
            for k, v in metrics.items()
            if math.isfinite(v) and k not in ("auroc_mean", "loss")
        }
        # Identical on every rank (computed from gathered predictions): the mean over ranks
        # changes nothing, and every rank has the value its checkpoint callback monitors.
        self.log_dict(finite, sync_dist=True)
        self.log(f"{stage}/auroc_mean", metrics["auroc_mean"], prog_bar=True, sync_dist=True)
        self.log(f"{stage}/loss", metrics["loss"], prog_bar=True, sync_dist=True)

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.calibration:
            return torch.sigmoid(logits)
        from cscvision.models.calibration import calibrate

        probs = calibrate(logits.cpu().numpy(), self.target_names, self.calibration)
        return torch.from_numpy(probs).to(logits.device)

    def on_validation_epoch_end(self) -> None:
        self._epoch_metrics("val", self.val_preds, choose=True)

    def on_test_epoch_end(self) -> None:
        self._epoch_metrics("test", self.test_preds, choose=False)

    # --- optimisation ---------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """The optimiser's groups: the parameters that train, those of a fine-tuned encoder
        (``net.encoder``) at ``lr × encoder_lr_scale``, the rest at ``lr``."""
        lr = float(self.hparams.lr)
        encoder = getattr(self.net, "encoder", None)
        tuned = set() if encoder is None else {id(p) for p in encoder.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in tuned]
        groups = [{"params": rest, "lr": lr}]
        if encoder is not None:
            opened = [p for p in encoder.parameters() if p.requires_grad]
            if opened:
                scale = float(self.hparams.get("encoder_lr_scale", 1.0))
                groups.append({"params": opened, "lr": lr * scale})
        return groups

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups = self.param_groups()
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if hp.scheduler == "onecycle":
            scheduler: Any = torch.optim.lr_scheduler.OneCycleLR(
                optimizer,
                max_lr=[g["lr"] for g in groups],
                total_steps=total,
                pct_start=max(hp.warmup_frac, 0.01),
            )
        else:
            warmup = max(1, round(total * hp.warmup_frac))
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, total))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


@dataclass(frozen=True)
class WarmupCosine:
    """LR factor: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    warmup: int
    total: int

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))


class CheckpointMismatch(CscvisionError, ValueError):
    """A checkpoint that belongs to a different model than the one configured."""


def check_checkpoint(path: str | Path, module: TileClassifier) -> None:
    """Raise :class:`CheckpointMismatch` unless ``path`` holds weights for ``module``.

    Loads with ``weights_only=True``: Lightning checkpoints written by cscvision hold only
    tensors, numbers, strings and plain containers.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unreadable, truncated, or holding arbitrary objects
        raise CheckpointMismatch(f"{path}: not a readable training checkpoint ({e})") from None
    hp = dict(ckpt.get("hyper_parameters") or {})
    want = {"backbone": module.hparams.backbone, "targets": list(module.target_names)}
    have = {"backbone": hp.get("backbone"), "targets": list(hp.get("targets") or [])}
    state = ckpt.get("state_dict") or {}
    own = module.state_dict()
    shapes_differ = [
        k for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if have != want or shapes_differ or set(own) - set(state):
        raise CheckpointMismatch(
            f"{path}: this checkpoint is for backbone {have['backbone']!r} with targets "
            f"{have['targets']}, but the config asks for {want['backbone']!r} with "
            f"{want['targets']}; train in another run folder (--run-dir) or pass --no-resume"
        )
    # What trains, and how fast: a fine-tuned encoder's blocks (model.finetune_blocks,
    # model.finetune_lr_scale) change the optimiser's groups, not the state's keys.
    optimizers = ckpt.get("optimizer_states") or [{}]
    saved = [len(g.get("params", [])) for g in optimizers[0].get("param_groups", [])]
    groups = [len(g["params"]) for g in module.param_groups()]
    scale = (float(hp.get("encoder_lr_scale", 1.0)), float(module.hparams.encoder_lr_scale))
    if (saved and saved != groups) or (len(groups) > 1 and scale[0] != scale[1]):
        raise CheckpointMismatch(
            f"{path}: this checkpoint trained {saved} parameter tensors per optimiser group "
            f"(encoder lr × {scale[0]:g}), the config trains {groups} (× {scale[1]:g}): "
            "model.finetune_blocks or model.finetune_lr_scale changed; train in another run "
            "folder (--run-dir) or pass --no-resume"
        )

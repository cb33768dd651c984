"""Training data: batch datasets over cached tile tables, class balance, the DataModule.

A dataset holds only slide paths, read plans and level-0 coordinates; each worker opens
slides lazily. Workers hand over **whole batches** (``uint8 [B, 3, H, W]`` + ``xy`` +
``target`` + ``slide_idx``): pickling single tiles costs more than decoding them.
Augmentation and normalisation run on the batch where the model is
(:class:`cscvision.training.lit.TileClassifier`). The per-slide tile tables come from
:mod:`cscvision.training.tilecache` (re-exported here).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, WeightedRandomSampler

from cscvision.slides.slide import ReadPlan, Slide, open_slide
from cscvision.training.tilecache import (
    SPLITS,
    DataError,
    SlideTiles,
    cache_key,
    label_slide,
    prepare_cohort,
    prepare_slide,
    subsample,
)

__all__ = [
    "BALANCE_MODES",
    "SPLITS",
    "DataError",
    "SlideSource",
    "SlideTiles",
    "TileBatchDataset",
    "TileDataModule",
    "cache_key",
    "label_slide",
    "pass_batch",
    "pos_weight",
    "prepare_cohort",
    "prepare_slide",
    "sample_weights",
    "stacked_weights",
    "subsample",
]

BALANCE_MODES = ("none", "pos_weight", "sampler")


# --- the batch dataset -----------------------------------------------------------------------


@dataclass(frozen=True)
class SlideSource:
    """What a worker needs to read one slide's tiles."""

    path: str
    plan: ReadPlan
    mpp_override: float | None


class TileBatchDataset(Dataset):
    """Tiles of many slides; ``__getitems__`` reads a whole batch in one worker call.

    Holds paths, read plans and coordinates only; slides are opened lazily by the process
    that reads (each DataLoader worker) and kept in a small per-process LRU. Batches number
    slide ``i`` of ``sources`` as ``first_index + i`` (``slide_idx``). With ``weights``
    (float32[N], a tile-label table's sample weights) batches carry ``"weight"`` too.
    """

    def __init__(
        self,
        sources: Sequence[SlideSource],
        slide_idx: np.ndarray,
        xy_l0: np.ndarray,
        targets: np.ndarray,
        *,
        weights: np.ndarray | None = None,
        first_index: int = 0,
        max_open: int = 32,
    ):
        if not len(slide_idx) == len(xy_l0) == len(targets):
            raise ValueError("slide_idx, xy_l0 and targets need one row per tile")
        if weights is not None and len(weights) != len(xy_l0):
            raise ValueError("weights need one value per tile")
        sizes = {s.plan.tile_px for s in sources}
        if len(sizes) > 1:
            raise ValueError(f"all slides must give tiles of one size, got {sorted(sizes)}")
        self.sources = tuple(sources)
        self.slide_idx = np.asarray(slide_idx, np.int64)
        self.xy_l0 = np.asarray(xy_l0, np.int64).reshape(-1, 2)
        self.targets = np.asarray(targets, np.float32)
        self.weights = None if weights is None else np.asarray(weights, np.float32)
        self.tile_px = sizes.pop() if sizes else 0
        self.first_index = first_index
        self.max_open = max_open
        self._slides: OrderedDict[int, Slide] = OrderedDict()
        self._pid = os.getpid()

    @classmethod
    def from_slides(
        cls, slides: Sequence[SlideTiles], *, first_index: int = 0, n_targets: int = 0
    ) -> TileBatchDataset:
        """A dataset over the tiles of ``slides``."""
        if not slides:
            empty = np.zeros(0, np.int64)
            return cls([], empty, empty.reshape(0, 2), np.zeros((0, n_targets), np.float32))
        return cls(
            [SlideSource(s.slide_path, s.plan, s.mpp_override) for s in slides],
            np.concatenate([np.full(len(s), i, np.int64) for i, s in enumerate(slides)]),
            np.concatenate([s.xy_l0 for s in slides]),
            np.concatenate([s.targets for s in slides]),
            weights=stacked_weights(slides),
            first_index=first_index,
        )

    def __len__(self) -> int:
        return len(self.xy_l0)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_slides"] = OrderedDict()  # open slides never travel to another process
        return state

    def open_slide_count(self) -> int:
        """Slides this process holds open (none until it reads a tile)."""
        return len(self._slides) if self._pid == os.getpid() else 0

    def _slide(self, i: int) -> Slide:
        if self._pid != os.getpid():  # forked: the parent's handles are not ours
            self._slides, self._pid = OrderedDict(), os.getpid()
        slide = self._slides.get(i)
        if slide is None:
            source = self.sources[i]
            slide = self._slides[i] = open_slide(source.path, mpp=source.mpp_override)
            if len(self._slides) > self.max_open:
                self._slides.popitem(last=False)[1].close()
        else:
            self._slides.move_to_end(i)
        return slide

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """A collated batch; tiles are read in (slide, y, x) order for cache locality."""
        idx = np.asarray(indices, np.int64)
        idx = idx[np.lexsort((self.xy_l0[idx, 0], self.xy_l0[idx, 1], self.slide_idx[idx]))]
        images = np.empty((len(idx), self.tile_px, self.tile_px, 3), np.uint8)
        for j, i in enumerate(idx):
            s = int(self.slide_idx[i])
            images[j] = self._slide(s).read_tile(tuple(self.xy_l0[i]), self.sources[s].plan)
        batch = {
            # NHWC storage viewed as NCHW: the channels_last memory format, without a copy.
            "image": torch.from_numpy(images).permute(0, 3, 1, 2),
            "xy": torch.from_numpy(self.xy_l0[idx]),
            "target": torch.from_numpy(self.targets[idx]),
            "slide_idx": torch.from_numpy(self.slide_idx[idx] + self.first_index),
        }
        if self.weights is not None:
            batch["weight"] = torch.from_numpy(self.weights[idx])
        return batch


def stain_sources_of(dm: Any, stain: dict[str, Any] | None) -> list | None:
    """:meth:`TileDataModule.stain_sources` of ``dm``; None for data modules of stored
    features or slides (no tiles to normalise)."""
    return dm.stain_sources(stain) if isinstance(dm, TileDataModule) else None


def stacked_weights(slides: Sequence[SlideTiles]) -> np.ndarray | None:
    """The sample weights of the tiles of ``slides`` in order, or None when no slide's
    labels carry any (every tile counts once)."""
    if all(s.weight is None for s in slides):
        return None
    return np.concatenate([s.weights() for s in slides])


def pass_batch(batch: Any) -> Any:
    """Collate function for datasets whose ``__getitems__`` already returns a batch."""
    return batch


# --- class balance -------------------------------------------------------------------------------


def pos_weight(targets: np.ndarray, max_weight: float = 50.0) -> np.ndarray:
    """BCE ``pos_weight`` per target: negative / positive soft mass over the tiles that have
    the target (NaN: no label), float32[T]."""
    t = np.asarray(targets, np.float64)
    pos = np.nansum(t, axis=0)
    neg = (~np.isnan(t)).sum(axis=0) - pos
    return np.clip(neg / np.maximum(pos, 1e-6), 1.0 / max_weight, max_weight).astype(np.float32)


def sample_weights(targets: np.ndarray, max_weight: float = 50.0) -> np.ndarray:
    """Per-tile weight so that each rare target's positives are drawn about as often as not.

    ``w = 1 + Σ_t y_t (w_t − 1)`` with ``w_t = max(1, pos_weight_t)``.
    """
    w_t = np.maximum(pos_weight(targets, max_weight), 1.0)
    return 1.0 + np.nan_to_num(np.asarray(targets, np.float64)) @ (w_t - 1.0)


# --- the DataModule ------------------------------------------------------------------------------


class TileDataModule(L.LightningDataModule):
    """Train / val / test tiles as batch datasets, slides numbered across all splits.

    ``slides`` maps a split name to its :class:`SlideTiles`; ``slide_ids[i]`` names slide
    ``i`` of ``slide_idx``. ``balance="sampler"`` draws training tiles by
    :func:`sample_weights` (``"pos_weight"`` is the model's business).
    """

    def __init__(
        self,
        *,
        slides: Mapping[str, Sequence[SlideTiles]],
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        balance: str = "none",
        seed: int = 0,
        pin_memory: bool = False,
    ):
        super().__init__()
        if balance not in BALANCE_MODES:
            raise ValueError(f"balance {balance!r}: choose one of {BALANCE_MODES}")
        unknown = set(slides) - set(SPLITS)
        if unknown:
            raise ValueError(f"unknown split(s) {sorted(unknown)}; use {SPLITS}")
        self.slides = {s: list(slides.get(s, ())) for s in SPLITS}
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.balance = balance
        self.seed = seed
        self.pin_memory = pin_memory
        n_targets = next((s.targets.shape[1] for v in self.slides.values() for s in v), 0)
        self.slide_ids: list[str] = []
        self.datasets: dict[str, TileBatchDataset] = {}
        for split in SPLITS:
            self.datasets[split] = TileBatchDataset.from_slides(
                self.slides[split], first_index=len(self.slide_ids), n_targets=n_targets
            )
            self.slide_ids += [s.slide_id for s in self.slides[split]]

    def _loader(self, split: str, *, sampler: Any = None, drop_last: bool = False) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=workers,
            collate_fn=pass_batch,
            persistent_workers=workers > 0,
            pin_memory=self.pin_memory,
            prefetch_factor=4 if workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        ds = self.datasets["train"]
        generator = torch.Generator().manual_seed(self.seed)
        if self.balance == "sampler":
            weights = torch.as_tensor(sample_weights(ds.targets))
            sampler: Any = WeightedRandomSampler(weights, len(ds), generator=generator)
        else:
            sampler = RandomSampler(ds, generator=generator)
        return self._loader("train", sampler=sampler, drop_last=len(ds) > self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def summary(self) -> dict[str, dict[str, Any]]:
        return split_summary(self.slides, self.datasets)

    def slide_sources(self) -> list[tuple[str, float | None]]:
        """Path and µm/px override of every slide, in ``slide_idx`` order."""
        return [(s.slide_path, s.mpp_override) for split in SPLITS for s in self.slides[split]]

    def stain_sources(self, stain: dict[str, Any] | None) -> list | None:
        """Each slide's own stains (``slide_idx`` order) for a card's Macenko/Vahadane
        ``stain`` template (:mod:`cscvision.slides.slide_stains`), or None."""
        from cscvision.slides.slide_stains import cohort_stains
        from cscvision.slides.stain import StainReference

        template = StainReference.from_dict(stain) if stain else None
        return cohort_stains(self.slide_sources(), template)


def split_summary(
    slides: Mapping[str, Sequence[SlideTiles]], datasets: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """Slides, patients, tiles and positive tiles (target ≥ 0.5) per split; ``datasets``
    hold each split's ``targets`` [N, T]."""
    out: dict[str, dict[str, Any]] = {}
    for split, tiles in slides.items():
        targets = datasets[split].targets
        out[split] = {
            "slides": len(tiles),
            "patients": len({t.patient_id for t in tiles}),
            "tiles": len(targets),
            "positive_tiles": [int(v) for v in (targets >= 0.5).sum(axis=0)],
        }
        weights = stacked_weights(tiles)
        if weights is not None:  # the table's weights, as training counts them
            out[split]["tile_weight_sum"] = float(weights.sum())
            out[split]["zero_weight_tiles"] = int((weights == 0).sum())
    return out

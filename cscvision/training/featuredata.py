"""Training data for heads: the stored features of each training tile, as a DataModule.

:func:`slide_features` reads a slide's tiles from its feature store
(``<features_dir>/<slide_id>.h5``) and extracts the tiles the store lacks (adding them to
it); :class:`FeatureDataModule` serves them as batches ``{"features", "xy", "target",
"slide_idx"}`` with the splits, slide numbering and class balance of
:class:`~cscvision.training.data.TileDataModule`. :func:`head_pieces` builds both, and the
:func:`~cscvision.training.heads.encoder_system`, from a training config.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, WeightedRandomSampler
from tqdm.auto import tqdm

from cscvision.features.extract import FeatureExtractor, extract_batches, plan_record
from cscvision.features.store import (
    STORE_SUFFIX,
    FeatureStore,
    read_feature_store,
    store_matches,
    write_feature_store,
)
from cscvision.slides.tilebatches import TileBatches
from cscvision.training.data import (
    SPLITS,
    SlideTiles,
    pass_batch,
    sample_weights,
    split_summary,
    stacked_weights,
)

if TYPE_CHECKING:
    from cscvision.training.config import TrainConfig

log = logging.getLogger(__name__)


# --- features of the training tiles ----------------------------------------------------------


def _store_path(features_dir: Path, slide_id: str) -> Path:
    return features_dir / f"{slide_id}{STORE_SUFFIX}"


def slide_features(
    tiles: SlideTiles,
    extractor: FeatureExtractor,
    features_dir: Path,
    *,
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """float16 [N, D] features of ``tiles`` (in their order), from the slide's store where it
    holds them; missing tiles are extracted and added to the store."""
    path = _store_path(features_dir, tiles.slide_id)
    plan = plan_record(tiles.plan)
    grid = {k: plan[k] for k in ("mpp", "tile_px", "level", "read_px")}
    name, digest = extractor.spec.name, extractor.weights_sha256
    store = None
    if store_matches(path, encoder=name, weights_sha256=digest, grid=grid):
        store = read_feature_store(path)
    rows = store.rows_of(tiles.xy_l0) if store is not None else np.full(len(tiles), -1)
    missing = rows < 0
    if missing.any():
        xy = tiles.xy_l0[missing]
        dataset = TileBatches.of_tiles(
            tiles.slide_path, tiles.mpp_override, tiles.plan, xy, batch_size
        )
        kw = dict(workers=workers, reader="threads", progress=progress, desc=tiles.slide_id)
        new = extract_batches(dataset, extractor, **kw)
        store = _merged(store, tiles, extractor, tiles.xy_l0[missing], new, plan)
        write_feature_store(path, store)
        rows = store.rows_of(tiles.xy_l0)
    return store.features[rows]


def _merged(
    old: FeatureStore | None,
    tiles: SlideTiles,
    extractor: FeatureExtractor,
    xy: np.ndarray,
    feats: np.ndarray,
    plan: dict[str, Any],
) -> FeatureStore:
    if old is not None:
        xy, feats = np.concatenate([old.xy_l0, xy]), np.concatenate([old.features, feats])
        return dataclasses.replace(old, xy_l0=xy.astype(np.int32), features=feats)
    return FeatureStore(
        xy_l0=np.asarray(xy, np.int32),
        features=feats,
        encoder=extractor.spec.name,
        weights_sha256=extractor.weights_sha256,
        grid=plan,
        slide_id=tiles.slide_id,
        slide_path=str(Path(tiles.slide_path).resolve()),
        slide_mpp=float(tiles.mpp_override or 0.0),
    )


# --- the data module ---------------------------------------------------------------------------


class FeatureTiles(Dataset):
    """Stored features of many slides; ``__getitems__`` returns a whole batch."""

    def __init__(self, features, xy_l0, targets, slide_idx, weights=None) -> None:
        self.features = torch.as_tensor(np.asarray(features, np.float32))
        self.xy_l0 = torch.as_tensor(np.asarray(xy_l0, np.int64).reshape(-1, 2))
        self.targets = np.asarray(targets, np.float32)
        self._targets = torch.as_tensor(self.targets)
        self.slide_idx = torch.as_tensor(np.asarray(slide_idx, np.int64))
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.features)

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        batch = {
            "features": self.features[idx],
            "xy": self.xy_l0[idx],
            "target": self._targets[idx],
            "slide_idx": self.slide_idx[idx],
        }
        if self.weights is not None:
            batch["weight"] = self.weights[idx]
        return batch


class FeatureDataModule(L.LightningDataModule):
    """Train / val / test features, slides numbered across splits (as TileDataModule)."""

    def __init__(
        self,
        *,
        slides: Mapping[str, Sequence[SlideTiles]],
        features: Mapping[str, np.ndarray],  # slide_id → float16 [N, D]
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        balance: str = "none",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.slides = {s: list(slides.get(s, ())) for s in SPLITS}
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.balance, self.seed = balance, seed
        dim = next(iter(features.values())).shape[1] if features else 0
        n_targets = next((t.targets.shape[1] for v in self.slides.values() for t in v), 0)
        self.slide_ids: list[str] = []
        self.datasets: dict[str, FeatureTiles] = {}
        for split in SPLITS:
            tiles = self.slides[split]
            first = len(self.slide_ids)
            self.datasets[split] = FeatureTiles(
                np.concatenate([features[t.slide_id] for t in tiles] or [np.zeros((0, dim))]),
                np.concatenate([t.xy_l0 for t in tiles] or [np.zeros((0, 2))]),
                np.concatenate([t.targets for t in tiles] or [np.zeros((0, n_targets))]),
                np.concatenate(
                    [np.full(len(t), first + i) for i, t in enumerate(tiles)] or [np.zeros(0)]
                ),
                stacked_weights(tiles),
            )
            self.slide_ids += [t.slide_id for t in tiles]

    def _loader(self, split: str, sampler: Any = None, drop_last: bool = False) -> DataLoader:
        size = self.batch_size if split == "train" else self.eval_batch_size
        return DataLoader(
            self.datasets[split],
            batch_size=size,
            sampler=sampler,
            drop_last=drop_last,
            collate_fn=pass_batch,
        )

    def train_dataloader(self) -> DataLoader:
        ds = self.datasets["train"]
        generator = torch.Generator().manual_seed(self.seed)
        if self.balance == "sampler":
            weights = torch.as_tensor(sample_weights(ds.targets))
            sampler: Any = WeightedRandomSampler(weights, len(ds), generator=generator)
        else:
            sampler = RandomSampler(ds, generator=generator)
        return self._loader("train", sampler, drop_last=len(ds) > self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def summary(self) -> dict[str, dict[str, Any]]:
        return split_summary(self.slides, self.datasets)


# --- from a training config --------------------------------------------------------------------


def with_encoder_grid(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``grid.mpp`` and ``grid.tile_px`` set to ``model.encoder``'s geometry."""
    from cscvision.features.extract import encoder_grid_spec
    from cscvision.models.registry import get_encoder_spec

    if not cfg.model.encoder:
        return cfg
    return dataclasses.replace(
        cfg, grid=encoder_grid_spec(get_encoder_spec(cfg.model.encoder), cfg.grid)
    )


def _extractor(cfg: TrainConfig) -> FeatureExtractor:
    from cscvision.core.io import file_sha256
    from cscvision.models.encoders import load_encoder

    weights = Path(cfg.model.weights or "")
    encoder = load_encoder(cfg.model.encoder, weights)
    gpu = cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    amp = cfg.trainer.precision != "32-true"
    digest = file_sha256(weights)
    return FeatureExtractor(
        encoder, weights_sha256=digest, device="cuda" if gpu else "cpu", amp=amp
    )


def encoder_reference(
    cfg: TrainConfig, extractor: FeatureExtractor, features_dir: Path
) -> dict[str, Any]:
    """The card's ``encoder`` field: which encoder and weights made the stored features."""
    from cscvision.models.heads import encoder_reference as reference

    return reference(
        extractor.spec,
        weights_sha256=extractor.weights_sha256,
        weights_file=str(cfg.model.weights),
        features_dir=str(features_dir),
    )


def head_pieces(
    cfg: TrainConfig,
    targets: Sequence[str],
    by_split: Mapping[str, Sequence[SlideTiles]],
    run_dir: Path,
    progress: bool = True,
) -> tuple[FeatureDataModule, Any, dict[str, Any]]:
    """Kind ``head``: the data module of stored features, the system training the head on
    them (:func:`~cscvision.training.heads.encoder_system`) and the card's encoder
    reference for a config with ``model.encoder`` (features extracted
    into ``model.features_dir``, default ``<run_dir>/features``, where missing)."""
    from cscvision.models.heads import make_head
    from cscvision.training.data import subsample
    from cscvision.training.heads import encoder_system

    limit = {"train": cfg.data.max_tiles_per_slide}
    limit["val"] = limit["test"] = cfg.data.eval_max_tiles_per_slide
    slides = {s: [subsample(t, limit[s], cfg.seed) for t in tiles] for s, tiles in by_split.items()}
    extractor = _extractor(cfg)
    spec = extractor.spec
    features_dir = Path(cfg.model.features_dir or run_dir / "features")
    everything = [t for tiles in slides.values() for t in tiles]
    workers = cfg.data.num_workers  # reader threads ahead of the encoder
    features = {
        t.slide_id: slide_features(t, extractor, features_dir, workers=workers, progress=progress)
        for t in tqdm(everything, desc="features", unit="slide", disable=not progress)
    }
    reference = encoder_reference(cfg, extractor, features_dir)
    del extractor  # the encoder is not needed to train the head
    dm = FeatureDataModule(
        slides=slides,
        features=features,
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.eval_batch_size,
        balance="sampler" if cfg.data.balance == "sampler" else "none",
        seed=cfg.seed,
    )
    net = make_head(cfg.model.head, spec.dim, len(targets))
    # features are stored once: no augmentation of the images
    module = encoder_system(
        cfg, targets, dm, net, augment="none", channels_last=False, inputs="features"
    )
    return dm, module, reference

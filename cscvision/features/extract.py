"""Feature extraction: every tile of a slide through an encoder into a feature store.

The tiles are cut at the encoder's own µm/px and tile size (:func:`encoder_grid_spec`;
they override a config's ``grid.mpp``/``grid.tile_px``), read ahead of the model by the
same batch readers inference uses (:mod:`cscvision.slides.tilebatches`), normalised with the
encoder's mean and std on the model's device, with channels-last memory for CNNs and, with
``amp``, bfloat16 autocast on CPUs that support it or mixed precision on GPUs. With
``decode="gpu"`` (or ``"auto"`` on CUDA) stored JPEG tiles are decoded, assembled and
resized in batches on the model's device (:mod:`cscvision.slides.gpudecode`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cscvision.core.guard import item_lock
from cscvision.core.names import child
from cscvision.features.settings import ExtractSettings
from cscvision.features.store import STORE_SUFFIX, FeatureStore, write_feature_store
from cscvision.models.encoders import Encoder
from cscvision.models.registry import EncoderSpec
from cscvision.slides.batch import SlideJob
from cscvision.slides.grid import GridSpec, TileGrid, make_grid
from cscvision.slides.slide import ReadPlan, SlideError, open_slide
from cscvision.slides.tilebatches import (
    TileBatches,
    autocast,
    decode_device,
    resolve_device,
    tile_batches,
)

log = logging.getLogger(__name__)


def encoder_grid_spec(spec: EncoderSpec, base: GridSpec | None = None) -> GridSpec:
    """``base`` (default: :class:`GridSpec`) at the encoder's µm/px and tile size."""
    base = base or GridSpec()
    if (base.mpp, base.tile_px) != (spec.mpp, spec.tile_px):
        log.info(
            "encoder %s: tiles of %d px at %s µm/px (the encoder's geometry replaces "
            "grid.tile_px %d and grid.mpp %s)",
            spec.name, spec.tile_px, spec.mpp, base.tile_px, base.mpp,
        )  # fmt: skip
    return dataclasses.replace(base, mpp=spec.mpp, tile_px=spec.tile_px)


def plan_record(plan: ReadPlan) -> dict[str, Any]:
    """The read plan as stored in a feature store's ``grid`` attribute."""
    return {
        "mpp": plan.mpp,
        "tile_px": plan.tile_px,
        "level": plan.level,
        "downsample": plan.downsample,
        "read_px": plan.read_px,
        "tile_l0": plan.tile_l0,
    }


def grid_record(grid: TileGrid) -> dict[str, Any]:
    spec = grid.spec
    extra = {"overlap": spec.overlap, "min_tissue": spec.min_tissue, "mask_mpp": spec.mask_mpp}
    return {**plan_record(grid.plan), "stride_l0": grid.stride_l0, **extra}


class FeatureExtractor:
    """uint8 tiles [B, 3, H, W] → float16 embeddings [B, D] on ``device``."""

    def __init__(
        self, encoder: Encoder, *, weights_sha256: str, device: str | torch.device = "cpu",
        amp: bool = False,
    ) -> None:  # fmt: skip
        self.spec = encoder.spec
        self.weights_sha256 = weights_sha256
        self.device = resolve_device(device)
        cnn = self.spec.is_cnn
        self.memory = torch.channels_last if cnn else torch.contiguous_format
        self.encoder = encoder.to(self.device).eval().to(memory_format=self.memory)
        self.mean = torch.tensor(self.spec.mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(self.spec.std, device=self.device).view(1, 3, 1, 1) * 255
        self.amp = amp

    def __call__(self, image: torch.Tensor) -> np.ndarray:
        with torch.inference_mode(), autocast(self.device, self.amp):
            x = image.to(self.device, non_blocking=True)
            x = ((x.float() - self.mean) / self.std).contiguous(memory_format=self.memory)
            return self.encoder(x).float().cpu().numpy().astype(np.float16)


def extract_batches(
    dataset: TileBatches,
    extractor: FeatureExtractor,
    *,
    workers: int = 0,
    reader: str = "threads",
    progress: bool = True,
    desc: str = "features",
) -> np.ndarray:
    """Embeddings float16 [N, D] of the tiles of ``dataset``, in its order."""
    n = len(dataset.xy_l0)
    out = np.zeros((n, extractor.spec.dim), np.float16)
    done = np.zeros(n, bool)
    bar = tqdm(total=n, desc=desc, unit="tile", leave=False, disable=not progress)
    try:
        for batch in tile_batches(dataset, workers, reader, extractor.device):
            if batch["errors"]:  # an undecodable tile fails the slide, naming where it is
                raise batch["errors"][0]
            index = batch["index"].numpy()
            out[index] = extractor(batch["image"])
            done[index] = True
            bar.update(len(index))
    finally:
        bar.close()
        dataset.close()
    if not done.all():
        raise RuntimeError(f"{dataset.slide_path}: {int((~done).sum())} tiles got no features")
    return out


def extract_slide(
    slide_path: str | Path,
    extractor: FeatureExtractor,
    out_path: str | Path,
    settings: ExtractSettings | None = None,
    *,
    slide_mpp: float | None = None,
    progress: bool = True,
) -> FeatureStore:
    """Tile ``slide_path`` at the encoder's geometry, embed every tissue tile, write the
    store to ``out_path`` atomically and return it. Raises ``SlideError`` for a slide that
    cannot be read or has no tile with ``settings.min_tissue`` tissue."""
    settings = settings or ExtractSettings()
    spec = encoder_grid_spec(extractor.spec)
    spec = dataclasses.replace(spec, min_tissue=settings.min_tissue, mask_mpp=settings.mask_mpp)
    with open_slide(slide_path, mpp=slide_mpp) as slide:
        grid = make_grid(slide, spec)
    if len(grid) == 0:
        raise SlideError(
            f"{slide_path}: no tile reaches --min-tissue {settings.min_tissue}; lower "
            "--min-tissue or check the slide"
        )
    dataset = TileBatches(grid, settings.batch_size)
    in_process = settings.workers == 0 or settings.reader == "threads"
    dataset.decode_device = decode_device(settings.decode, extractor.device, in_process=in_process)
    kw = dict(workers=settings.workers, reader=settings.reader, progress=progress)
    feats = extract_batches(dataset, extractor, desc=grid.slide_id, **kw)
    store = FeatureStore(
        xy_l0=grid.xy_l0.astype(np.int32),
        features=feats,
        encoder=extractor.spec.name,
        weights_sha256=extractor.weights_sha256,
        grid=grid_record(grid),
        slide_id=grid.slide_id,
        slide_path=str(Path(slide_path).resolve()),
        slide_mpp=grid.slide_mpp,
    )
    write_feature_store(out_path, store)
    return store


def store_path(out_dir: str | Path, slide_id: str) -> Path:
    """Where ``cscvision features`` keeps a slide's store: ``OUT/<slide_id>.h5``; an id that
    is not an allowed name (:mod:`cscvision.core.names`) raises ``UnsafeNameError``."""
    return child(out_dir, slide_id, STORE_SUFFIX, what="slide_id")


def store_lock_path(out_dir: str | Path, slide_id: str) -> Path:
    """The lock file a run holds while it checks or writes a slide's store:
    ``OUT/.<slide_id>.h5.lock`` (stays; :func:`cscvision.core.guard.item_lock`)."""
    store = store_path(out_dir, slide_id)
    return store.with_name(f".{store.name}.lock")


def extraction_setup(
    encoder: Encoder,
    weights_sha256: str,
    out_dir: str,
    settings: ExtractSettings,
    *,
    device: str | torch.device,
) -> Callable[[SlideJob], None]:
    """The encoder on ``device`` and a function that writes a job's store into ``out_dir``:
    a Ray worker's setup for ``cscvision features --ray``
    (:class:`~cscvision.inference.distributed.JobWorker`)."""
    extractor = FeatureExtractor(
        encoder, weights_sha256=weights_sha256, device=device, amp=settings.amp
    )
    if settings.decode == "gpu" and extractor.device.type != "cuda":
        raise ValueError(f"--decode gpu needs a CUDA device; this worker has {device}")

    def process(job: SlideJob) -> None:  # under the slide's lock, as the local path
        path = store_path(out_dir, job.slide_id)
        with item_lock(store_lock_path(out_dir, job.slide_id), wait=True):
            extract_slide(job.slide_path, extractor, path, settings, slide_mpp=job.mpp,
                          progress=False)  # fmt: skip

    return process

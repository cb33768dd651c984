"""Inference on one slide: tile it at the model's µm/px, score every tile, stitch the maps.

``predict_slide`` is the whole path for one slide file; ``predict_grid`` starts from a
tile grid that is already made (tests, or a grid saved by ``cscvision tile``).

Reading overlaps compute. With ``workers > 0`` and ``reader="threads"`` (the default) a
pool of threads in this process fills each batch (the slide readers are thread-safe and
their decoders release the GIL), one batch ahead of the model, with no copies between
processes. With ``reader="processes"``, a DataLoader's worker processes each open the
slide once and return *whole batches* (uint8 [B, 3, H, W] in channels-last memory, with
their level-0 ``xy`` and tile indices); moving single tiles between processes costs more
than decoding them. Measured (``scripts/bench_infer.py``): threads were as fast or faster
on 2 CPU cores (ResNet-18 bf16 95 % of the model alone either way; small_cnn 83 % vs 77 %)
and on an H200 with 12 readers (6,600 vs 5,250 tiles/s), with flat memory.

Normalisation ``(x / 255 - mean) / std`` and the sigmoid run in the main process, on the
model's device, with channels-last memory and, with ``amp``, bfloat16 autocast on CPUs
that support it or mixed precision on GPUs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cscvision.core.geometry import area_fraction
from cscvision.inference.settings import READERS
from cscvision.inference.stitch import choose_sub, map_layout, stitch
from cscvision.outputs.prediction import SlidePrediction
from cscvision.slides.grid import GridSpec, TileGrid, detect_tissue, make_grid
from cscvision.slides.info import ON_CORRUPT_TILE, CorruptTileError
from cscvision.slides.slide import Slide, SlideError, open_slide
from cscvision.slides.tissue import DEFAULT_MASK_MPP
from cscvision.training.calibration import calibrate
from cscvision.training.card import ModelCard
from cscvision.training.export import LoadedModel


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is an error."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
    return device


def cpu_supports_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    if not amp:
        return contextlib.nullcontext()
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if device.type == "cpu" and cpu_supports_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _channels_last(device: torch.device, tile_px: int) -> bool:
    """Channels-last memory: faster on GPUs, and on CPUs for tiles of 128 px and more
    (measured: ResNet-18 at 224 px 32 → 43 tiles/s; small 64 px tiles are slower with it)."""
    return device.type == "cuda" or tile_px >= 128


class TileBatches(Dataset):
    """Item ``i`` is the ``i``-th batch of tiles, read in grid (raster) order.

    The slide is opened lazily, once per process, so the dataset pickles as a path plus
    coordinates. :meth:`read` can split a batch among a pool of threads (the slide
    readers are thread-safe and their decoders release the GIL). A tile that cannot be
    decoded is left black, flagged in the batch's ``corrupt`` mask, and its
    :class:`CorruptTileError` returned in ``errors``: raised in the consumer's process, it
    arrives whole from a reader process too.
    """

    def __init__(self, grid: TileGrid, batch_size: int) -> None:
        self.slide_path = grid.slide_path
        self.slide_mpp = grid.slide_mpp
        self.plan = grid.plan
        self.xy_l0 = np.asarray(grid.xy_l0, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.threads = 1  # runs of tiles a batch is split into when read with a pool
        self.ready: dict[int, dict[str, torch.Tensor]] = {}  # batches read ahead (prefetch)
        self.decode_device: torch.device | None = None  # decode stored JPEG tiles there
        self._slide: Slide | None = None
        self._device_reader = None

    def __len__(self) -> int:
        return math.ceil(len(self.xy_l0) / self.batch_size)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.read(index)

    def read(
        self, index: int, pool: ThreadPoolExecutor | None = None, pin: bool = False
    ) -> dict[str, torch.Tensor]:
        """Batch ``index``: ``image`` uint8 [B, 3, H, W] in channels-last memory, with
        ``xy`` and ``index`` (positions in the grid). With ``pool``, the batch is split into
        one run of tiles per thread; ``pin`` allocates it in pinned memory (for GPUs)."""
        if index in self.ready:
            return self.ready.pop(index)
        if self._slide is None:
            self._slide = open_slide(self.slide_path, mpp=self.slide_mpp)
        start = index * self.batch_size
        xy = self.xy_l0[start : start + self.batch_size]
        image = self._read_on_device(xy) if self.decode_device is not None else None
        if image is not None:
            return {
                "image": image,
                "xy": torch.from_numpy(xy),
                "index": torch.arange(start, start + len(xy)),
                "corrupt": torch.zeros(len(xy), dtype=torch.bool),
                "errors": [],
            }
        side = self.plan.tile_px
        nhwc = torch.empty((len(xy), side, side, 3), dtype=torch.uint8, pin_memory=pin)
        image = nhwc.numpy()
        errors: dict[int, CorruptTileError] = {}  # by position in the batch
        if pool is None:
            self._fill(image, errors, xy, 0, len(xy))
        else:
            step = math.ceil(len(xy) / self.threads)
            spans = [(a, min(a + step, len(xy))) for a in range(0, len(xy), step)]
            for done in [pool.submit(self._fill, image, errors, xy, a, b) for a, b in spans]:
                done.result()
        corrupt = np.zeros(len(xy), bool)
        corrupt[list(errors)] = True
        return {
            # [B, H, W, 3] viewed as [B, 3, H, W]: channels-last memory, no copy.
            "image": nhwc.permute(0, 3, 1, 2),
            "xy": torch.from_numpy(xy),
            "index": torch.arange(start, start + len(xy)),
            "corrupt": torch.from_numpy(corrupt),
            "errors": [errors[k] for k in sorted(errors)],  # raster order
        }

    def _read_on_device(self, xy: np.ndarray) -> torch.Tensor | None:
        """The batch decoded on ``decode_device`` (:mod:`cscvision.slides.gpudecode`), or
        None where that path does not serve this slide or batch."""
        if self._device_reader is None:
            from cscvision.slides.gpudecode import DeviceTileReader

            reader = DeviceTileReader.open(self.slide_path, self._slide.info, self.decode_device)
            if reader is None or not reader.supports(self.plan):
                self.decode_device = None  # not this slide: the CPU path reads it all
                return None
            self._device_reader = reader
        try:
            if self.decode_device.type != "cuda":
                return self._device_reader.read(xy, self.plan)
            stream = torch.cuda.Stream(self.decode_device)  # decode beside the model's kernels
            with torch.cuda.stream(stream):
                image = self._device_reader.read(xy, self.plan)
            stream.synchronize()
            return image
        except RuntimeError:  # a stream the device decoder refuses: the CPU path names it
            return None

    def _fill(self, image: np.ndarray, errors: dict, xy: np.ndarray, first: int, stop: int) -> None:
        for k in range(first, stop):
            try:
                image[k] = self._slide.read_tile((int(xy[k, 0]), int(xy[k, 1])), self.plan)
            except CorruptTileError as e:
                image[k] = 0
                errors[k] = e

    def close(self) -> None:
        if self._device_reader is not None:
            self._device_reader.close()
            self._device_reader = None
        if self._slide is not None:
            self._slide.close()
            self._slide = None


def _loader(dataset: TileBatches, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,  # items are whole batches already
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if workers > 0 else None,
    )


def _threaded(
    dataset: TileBatches, threads: int, device: torch.device, prefetch: int = 2
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches read by ``threads`` threads of this process, ``prefetch`` batches ahead of
    the consumer: no pickling, no copies between processes."""
    pin = device.type == "cuda"
    dataset.threads = threads
    with (
        ThreadPoolExecutor(threads, thread_name_prefix="tiles") as pool,
        ThreadPoolExecutor(1, thread_name_prefix="batches") as ahead,
    ):
        pending: deque[Future] = deque()
        for index in range(len(dataset)):
            pending.append(ahead.submit(dataset.read, index, pool, pin))
            if len(pending) > prefetch:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class TileScorer:
    """The model as inference runs it: uint8 tiles [B, 3, H, W] → probabilities [B, T]
    (regression models: scores in the card's units).

    Moves the net to ``device`` (eval mode, channels-last where that is faster), applies
    ``(x / 255 - mean) / std``, autocast with ``amp``, and the sigmoid.
    """

    def __init__(self, model: LoadedModel, *, device: str | torch.device = "cpu", amp=False):
        self.device = resolve_device(device)
        card = model.card
        self.memory = (
            torch.channels_last
            if _channels_last(self.device, card.tile_px)
            else torch.contiguous_format
        )
        self.net = model.net.to(self.device).eval().to(memory_format=self.memory)
        self.mean = torch.tensor(card.mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(card.std, device=self.device).view(1, 3, 1, 1) * 255
        self.amp = amp
        # Regression models predict standardised scores: back to score units, no sigmoid.
        scale = card.output_scale if card.is_regression else {}
        self.out_mean = torch.tensor(scale.get("mean", [0.0]), device=self.device)
        self.out_std = torch.tensor(scale.get("std", [1.0]), device=self.device)
        self.regression = card.is_regression
        self.targets = card.targets
        self.calibration = card.calibration

    def __call__(self, image: torch.Tensor) -> np.ndarray:
        with torch.inference_mode(), _autocast(self.device, self.amp):
            x = image.to(self.device, non_blocking=True)
            x = ((x.float() - self.mean) / self.std).contiguous(memory_format=self.memory)
            logits = self.net(x).float()
            if self.regression:
                return (logits * self.out_std + self.out_mean).cpu().numpy()
            if not self.calibration:
                return torch.sigmoid(logits).cpu().numpy()
        return calibrate(logits.cpu().numpy(), self.targets, self.calibration)


def predict_tiles(
    grid: TileGrid,
    model: LoadedModel,
    *,
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device = "cpu",
    amp: bool = False,
    reader: str = "threads",
    progress: bool = True,
    dataset: TileBatches | None = None,
    decode: str = "cpu",
    on_corrupt_tile: str = "fail",
) -> np.ndarray:
    """Sigmoid probabilities float32[N, T] for the tiles of ``grid``, in grid order.

    ``workers`` > 0 reads ahead of the model in that many DataLoader processes
    (``reader="processes"``) or threads of this process (``reader="threads"``). A tile
    that cannot be decoded raises :class:`CorruptTileError`, or with
    ``on_corrupt_tile="skip"`` gets a row of NaN.
    ``dataset``: the grid's batches, some perhaps read already (:func:`prepare_slide`).
    ``decode``: ``gpu`` decodes stored JPEG tiles in batches on the model's device (on a
    CPU device, with torch's CPU decoder: the same path), ``auto`` does so on CUDA only,
    ``cpu`` never; slides the device path does not serve are read on the CPU.
    """
    if reader not in READERS:
        raise ValueError(f"reader {reader!r}: choose one of {READERS}")
    if on_corrupt_tile not in ON_CORRUPT_TILE:
        raise ValueError(f"on_corrupt_tile {on_corrupt_tile!r}: choose one of {ON_CORRUPT_TILE}")
    scorer = TileScorer(model, device=device, amp=amp)
    probs = np.full((len(grid), len(model.card.targets)), np.nan, np.float32)
    corrupt = np.zeros(len(grid), bool)
    dataset = dataset or TileBatches(grid, batch_size)
    in_process = workers == 0 or reader == "threads"  # no CUDA in DataLoader processes
    if in_process and (decode == "gpu" or (decode == "auto" and scorer.device.type == "cuda")):
        dataset.decode_device = scorer.device
    if workers > 0 and reader == "processes":
        dataset.ready.clear()  # read again by the workers: no tensors pickled to them
    if workers > 0 and reader == "threads":
        batches = _threaded(dataset, workers, scorer.device)
    else:
        batches = _loader(dataset, workers, scorer.device)
    bar = tqdm(total=len(grid), desc=grid.slide_id, unit="tile", leave=False, disable=not progress)
    try:
        for batch in batches:
            if batch["errors"] and on_corrupt_tile == "fail":
                raise batch["errors"][0]
            index = batch["index"].numpy()
            probs[index] = scorer(batch["image"])
            corrupt[index] = batch["corrupt"].numpy()
            bar.update(len(index))
    finally:
        bar.close()
        dataset.close()
    probs[corrupt] = np.nan
    if np.isnan(probs[~corrupt]).any():
        raise RuntimeError(f"{grid.slide_path}: some tiles got no prediction (NaN)")
    return probs


def assemble_prediction(
    grid: TileGrid,
    probs: np.ndarray,
    *,
    targets: tuple[str, ...],
    thumb: np.ndarray,
    mask: np.ndarray,
    sub: int | None = None,
    seconds: float = 0.0,
    predict_seconds: float = 0.0,
    device: str = "cpu",
    amp: bool = False,
) -> SlidePrediction:
    """Stitch tile probabilities ``probs`` [N, T] of ``grid`` into a :class:`SlidePrediction`
    (pure: no model, no slide). ``mask`` is the tissue mask over the whole slide."""
    layout = map_layout(
        grid.origin_l0,
        grid.shape(),
        tile_l0=grid.plan.tile_l0,
        stride_l0=grid.stride_l0,
        sub=sub or choose_sub(grid.spec.overlap),
    )
    mask_scale = mask.shape[1] / grid.dimensions[0]
    mask_px_um = grid.slide_mpp / mask_scale
    return SlidePrediction(
        grid=grid,
        targets=tuple(targets),
        probs=np.asarray(probs, np.float32),
        maps=stitch(grid.cells(), probs, layout),
        tissue_map=area_fraction(mask, mask_scale, layout.transform, layout.shape),
        map_transform=layout.transform,
        thumb=thumb,
        mask=mask,
        mask_scale=mask_scale,
        tissue_mm2=float(mask.sum()) * mask_px_um * mask_px_um / 1e6,
        seconds=seconds,
        predict_seconds=predict_seconds,
        device=device,
        amp=amp,
    )


def predict_grid(
    grid: TileGrid,
    model: LoadedModel,
    *,
    thumb: np.ndarray,
    mask: np.ndarray,
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device = "cpu",
    amp: bool = False,
    reader: str = "threads",
    progress: bool = True,
    sub: int | None = None,
    started: float | None = None,
    batches: TileBatches | None = None,
    decode: str = "cpu",
    on_corrupt_tile: str = "fail",
) -> SlidePrediction:
    """Score the tiles of ``grid`` and stitch them; ``mask`` is the tissue mask the grid
    came from (covering the whole slide), ``thumb`` its thumbnail. With
    ``on_corrupt_tile="skip"`` undecodable tiles are dropped from the grid and listed in
    ``corrupt_xy_l0``."""
    started = time.perf_counter() if started is None else started
    t0 = time.perf_counter()
    kw = dict(batch_size=batch_size, workers=workers, device=device, amp=amp, reader=reader)
    kw["decode"] = decode
    probs = predict_tiles(
        grid, model, progress=progress, dataset=batches, on_corrupt_tile=on_corrupt_tile, **kw
    )
    predict_seconds = time.perf_counter() - t0
    grid, probs, corrupt_xy = drop_corrupt_tiles(grid, probs)
    pred = assemble_prediction(
        grid,
        probs,
        targets=tuple(model.card.targets),
        thumb=thumb,
        mask=mask,
        sub=sub,
        predict_seconds=predict_seconds,
        device=str(resolve_device(device)),
        amp=amp,
    )
    seconds = time.perf_counter() - started
    return dataclasses.replace(pred, seconds=seconds, corrupt_xy_l0=corrupt_xy)


def drop_corrupt_tiles(
    grid: TileGrid, probs: np.ndarray
) -> tuple[TileGrid, np.ndarray, np.ndarray]:
    """The grid and probabilities without the tiles skipped as corrupt (rows of NaN), and
    those tiles' level-0 corners int[K, 2]; a slide with no readable tile is an error."""
    bad = np.isnan(probs).any(axis=1)
    if not bad.any():
        return grid, probs, np.zeros((0, 2), np.int64)
    if bad.all():
        raise SlideError(f"{grid.slide_path}: every one of its {len(grid)} tiles is corrupt")
    kept = dataclasses.replace(grid, xy_l0=grid.xy_l0[~bad], tissue=grid.tissue[~bad])
    return kept, probs[~bad], np.asarray(grid.xy_l0[bad], np.int64)


@dataclasses.dataclass
class PreparedSlide:
    """A slide ready to score: its grid, thumbnail and mask, and its first batches read."""

    grid: TileGrid
    thumb: np.ndarray
    mask: np.ndarray
    batches: TileBatches
    started: float  # perf_counter when its preparation began


def prepare_slide(
    slide_path: str | Path,
    card: ModelCard,
    *,
    overlap: float = 0.0,
    batch_size: int = 64,
    min_tissue: float = 0.5,
    slide_mpp: float | None = None,
    mask_mpp: float = DEFAULT_MASK_MPP,
    read_ahead: int = 0,
) -> PreparedSlide:
    """Open ``slide_path``, detect tissue, make the grid at the card's µm/px and tile size
    and read its first ``read_ahead`` batches; raises ``SlideError`` for a slide with no
    tile reaching ``min_tissue``. What a prefetch thread does for the next slide."""
    started = time.perf_counter()
    spec = GridSpec(
        mpp=card.mpp,
        tile_px=card.tile_px,
        overlap=overlap,
        min_tissue=min_tissue,
        mask_mpp=mask_mpp,
    )
    with open_slide(slide_path, mpp=slide_mpp) as slide:
        thumb, mask = detect_tissue(slide, spec.mask_mpp)
        grid = make_grid(slide, spec, mask=mask)
    if len(grid) == 0:
        raise SlideError(
            f"{slide_path}: no tile reaches --min-tissue {min_tissue} (tissue covers "
            f"{mask.mean():.1%} of the thumbnail); lower --min-tissue or check the slide"
        )
    batches = TileBatches(grid, batch_size)
    for index in range(min(read_ahead, len(batches))):
        batches.ready[index] = batches.read(index)
    return PreparedSlide(grid, thumb, mask, batches, started)


def predict_slide(
    slide_path: str | Path,
    model: LoadedModel,
    *,
    overlap: float = 0.0,
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device = "cpu",
    amp: bool = False,
    min_tissue: float = 0.5,
    slide_mpp: float | None = None,
    mask_mpp: float = DEFAULT_MASK_MPP,
    reader: str = "threads",
    progress: bool = True,
    prepared: PreparedSlide | None = None,
    decode: str = "cpu",
    on_corrupt_tile: str = "fail",
) -> SlidePrediction:
    """Tile ``slide_path`` at the model card's µm/px and tile size, score and stitch.

    ``slide_mpp`` overrides the slide's level-0 µm/px; ``workers`` and ``reader``: see
    :func:`predict_tiles`, as ``decode``; ``on_corrupt_tile``: see :func:`predict_grid`;
    ``prepared``: this slide made ready ahead (:func:`prepare_slide`). Raises ``SlideError``
    when the slide cannot be read or has no tile with ``min_tissue`` tissue.
    """
    if prepared is None:
        prepared = prepare_slide(
            slide_path,
            model.card,
            overlap=overlap,
            batch_size=batch_size,
            min_tissue=min_tissue,
            slide_mpp=slide_mpp,
            mask_mpp=mask_mpp,
        )
    return predict_grid(
        prepared.grid,
        model,
        thumb=prepared.thumb,
        mask=prepared.mask,
        batch_size=batch_size,
        workers=workers,
        device=device,
        amp=amp,
        reader=reader,
        progress=progress,
        started=prepared.started,
        batches=prepared.batches,
        decode=decode,
        on_corrupt_tile=on_corrupt_tile,
    )

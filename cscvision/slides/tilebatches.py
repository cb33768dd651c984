"""Tile batches read ahead of a model, and the device and precision helpers that go with it.

Shared by feature extraction (:mod:`cscvision.features.extract`) and inference
(:mod:`cscvision.inference.predict`, which documents the measured reader choices): a
:class:`TileBatches` item is a whole batch of tiles (uint8 [B, 3, H, W], channels-last
memory) with its level-0 ``xy`` and grid indices; :func:`threaded_batches` fills batches
with a pool of threads of this process, :func:`process_batches` with DataLoader workers.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cscvision.core.errors import CscvisionError
from cscvision.slides.grid import TileGrid
from cscvision.slides.info import DECODERS, CorruptTileError
from cscvision.slides.slide import ReadPlan, Slide, open_slide


class DeviceError(CscvisionError, RuntimeError):
    """A device that is not there (``--device cuda`` without a visible GPU)."""


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is an error."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
    return device


def decode_device(decode: str, device: torch.device, *, in_process: bool) -> torch.device | None:
    """Where :class:`TileBatches` decodes stored JPEG tiles for a model on ``device``: None
    for the CPU readers. ``gpu`` decodes on ``device`` (on a CPU device with torch's CPU
    decoder: the same path, which is how it is tested), ``auto`` on CUDA only; never in
    DataLoader processes (``in_process`` False), which cannot use CUDA."""
    if decode not in DECODERS:
        raise ValueError(f"decode {decode!r}: choose one of {DECODERS}")
    if not in_process or decode == "cpu" or (decode == "auto" and device.type != "cuda"):
        return None
    return device


def cpu_supports_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    if not amp:
        return contextlib.nullcontext()
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if device.type == "cpu" and cpu_supports_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def channels_last(device: torch.device, tile_px: int) -> bool:
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
        self._setup(grid.slide_path, grid.slide_mpp, grid.plan, grid.xy_l0, batch_size)

    @classmethod
    def of_tiles(
        cls,
        slide_path: str,
        slide_mpp: float | None,
        plan: ReadPlan,
        xy_l0: np.ndarray,
        batch_size: int,
    ) -> TileBatches:
        """Batches of the tiles at ``xy_l0`` read as ``plan`` says (a tile table, not a grid)."""
        batches = cls.__new__(cls)
        batches._setup(slide_path, slide_mpp, plan, xy_l0, batch_size)
        return batches

    def _setup(
        self, slide_path: str, slide_mpp: float | None, plan: ReadPlan, xy_l0, batch_size: int
    ) -> None:
        self.slide_path = slide_path
        self.slide_mpp = slide_mpp
        self.plan = plan
        self.xy_l0 = np.asarray(xy_l0, dtype=np.int64).reshape(-1, 2)
        self.batch_size = int(batch_size)
        self.threads = 1  # runs of tiles a batch is split into when read with a pool
        self.ready: dict[int, dict[str, torch.Tensor]] = {}  # batches read ahead (prefetch)
        self.decode_device: torch.device | None = None  # decode stored JPEG tiles there
        self._slide: Slide | None = None
        self._borrowed = False  # _slide is the caller's (use_slide): left open at close
        self._device_reader = None

    def use_slide(self, slide: Slide) -> None:
        """Read from ``slide``, open already (its owner closes it): the slide is opened
        once for tissue, grid and tiles. Reader processes still open their own."""
        self._slide, self._borrowed = slide, True
        slide.reserve_raster(self.plan)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)  # a reader process opens the slide itself
        state.update(_slide=None, _borrowed=False, _device_reader=None)
        return state

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
            self._slide.reserve_raster(self.plan)  # batches follow the grid's raster order
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
                self._slide.read_tile((int(xy[k, 0]), int(xy[k, 1])), self.plan, out=image[k])
            except CorruptTileError as e:
                image[k] = 0
                errors[k] = e

    def close(self) -> None:
        if self._device_reader is not None:
            self._device_reader.close()
            self._device_reader = None
        if self._slide is not None and not self._borrowed:
            self._slide.close()
        self._slide, self._borrowed = None, False


def process_batches(dataset: TileBatches, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,  # items are whole batches already
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if workers > 0 else None,
    )


def threaded_batches(
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


def tile_batches(
    dataset: TileBatches, workers: int, reader: str, device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    """The batches of ``dataset`` read by ``workers`` threads (``reader="threads"``) or
    DataLoader processes (``"processes"``); ``workers=0`` reads between batches."""
    if workers > 0 and reader == "threads":
        return threaded_batches(dataset, workers, device)
    return iter(process_batches(dataset, workers, device))

"""Device decode path: stored JPEG tiles decoded in batches on the model's device.

CPU threads only fetch compressed bytes (``os.pread`` at tifffile's offsets, Aperio's
shared JPEG tables spliced into each stream, as :mod:`cscvision.slides.fastread` does);
one ``torchvision.io.decode_jpeg`` call decodes a batch's distinct stored tiles on the
device (nvJPEG on CUDA, libjpeg on the CPU); tiles are then assembled, cropped and
box-reduced on the device, so the batch reaches the model without a host round trip.

Every step but the CUDA decoder runs on CPU tensors as well, and the tests compare it there
with the CPU fast path. Pixels: assembly and cropping are exact; whole-factor reduction
is ``(sum + f²/2) // f²``, which is PIL's ``reduce`` for factors 2 and 4 (bit for bit) and
within 1 level for others; a remaining non-whole factor uses antialiased bilinear
resampling (PIL's path uses Lanczos: a few levels apart). Decoders may differ from
libjpeg-turbo by their IDCT rounding; :meth:`DeviceTileReader.open` measures that on one
tile and declines a slide whose difference is over :data:`MAX_MEAN_DIFF`.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from cscvision.slides.fastread import StoredTileReader
from cscvision.slides.info import SlideInfo
from cscvision.slides.slide import ReadPlan
from cscvision.slides.storedtiles import StoredLevel, decode_stream, full_stream

MAX_MEAN_DIFF = 1.0  # mean |Δ| per channel against libjpeg-turbo a decoder may show


@dataclass(frozen=True)
class BatchLayout:
    """Which stored tiles a batch of regions needs, and where each region lies in them."""

    indices: np.ndarray  # int64[U]: distinct stored tiles to decode (present ones)
    slots: np.ndarray  # int64[B, K, K]: per region, its tiles as rows into ``indices``; U = white
    offset: np.ndarray  # int64[B, 2]: (x, y) of each region within its first tile
    origin: np.ndarray  # int64[B, 2]: (x, y) of each region in level pixels
    side: int  # region side in level pixels


def batch_layout(lvl: StoredLevel, xy_level: np.ndarray, side: int) -> BatchLayout:
    """The layout of square regions of ``side`` level pixels at ``xy_level`` int[B, 2]."""
    tw, th = lvl.tile_w, lvl.tile_h
    k = math.ceil(side / min(tw, th)) + 1
    col0, row0 = np.floor_divide(xy_level[:, 0], tw), np.floor_divide(xy_level[:, 1], th)
    cols = col0[:, None] + np.arange(k)  # [B, K]
    rows = row0[:, None] + np.arange(k)
    inside_x = (cols >= 0) & (cols < lvl.tiles_across)
    inside_y = (rows >= 0) & (rows < lvl.tiles_down)
    inside = inside_y[:, :, None] & inside_x[:, None, :]
    index = rows[:, :, None] * lvl.tiles_across + cols[:, None, :]  # [B, K, K]
    present = inside & (lvl.bytecounts[np.where(inside, index, 0)] > 0)
    indices, inverse = np.unique(np.where(present, index, -1), return_inverse=True)
    inverse = inverse.reshape(index.shape)
    if indices.size and indices[0] == -1:  # -1 stood for "white": move it to the end
        indices, inverse = indices[1:], inverse - 1
    slots = np.where(present, inverse, len(indices))
    offset = xy_level - np.stack([col0 * tw, row0 * th], axis=1)
    return BatchLayout(indices, slots, offset, xy_level.astype(np.int64), side)


def fetch_streams(reader: StoredTileReader, lvl: StoredLevel, indices: np.ndarray) -> list[bytes]:
    """Complete JPEG streams of stored tiles ``indices`` (tables spliced in)."""
    reader._ensure_process()
    return [
        full_stream(os.pread(reader._fd, int(lvl.bytecounts[i]), int(lvl.offsets[i])), lvl.header)
        for i in indices
    ]


def decode_batch(
    streams: list[bytes], device: torch.device, shape: tuple[int, int]
) -> torch.Tensor:
    """Streams decoded on ``device`` to uint8 [U, 3, h, w] (one batched call)."""
    with warnings.catch_warnings():  # 0.29 deprecates torchvision.io for torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

    if not streams:
        return torch.empty((0, 3, *shape), dtype=torch.uint8, device=device)
    data = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in streams]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return torch.stack(images)


def assemble(tiles: torch.Tensor, layout: BatchLayout, level_wh: tuple[int, int]) -> torch.Tensor:
    """Regions uint8 [B, 3, side, side] from decoded ``tiles`` [U, 3, th, tw] (on their
    device); pixels outside the level are white, as OpenSlide composites them."""
    device = tiles.device
    u, _, th, tw = tiles.shape
    white = torch.full((1, 3, th, tw), 255, dtype=torch.uint8, device=device)
    stack = torch.cat([tiles, white]) if u else white
    slots = torch.as_tensor(layout.slots, device=device)
    b, k, _ = slots.shape
    canvas = stack[slots].permute(0, 3, 1, 4, 2, 5).reshape(b, 3, k * th, k * tw)
    span = torch.arange(layout.side, device=device)
    offset = torch.as_tensor(layout.offset, device=device)
    rows = (offset[:, 1, None] + span)[:, :, None]  # [B, side, 1]
    cols = (offset[:, 0, None] + span)[:, None, :]  # [B, 1, side]
    batch = torch.arange(b, device=device)[:, None, None]
    out = canvas[batch, :, rows, cols].permute(0, 3, 1, 2)  # [B, 3, side, side]
    origin = torch.as_tensor(layout.origin, device=device)
    gx, gy = origin[:, 0, None] + span, origin[:, 1, None] + span
    valid_x = (gx >= 0) & (gx < level_wh[0])
    valid_y = (gy >= 0) & (gy < level_wh[1])
    valid = valid_y[:, None, :, None] & valid_x[:, None, None, :]
    return torch.where(valid, out, torch.full_like(out, 255)).contiguous()


def box_reduce(image: torch.Tensor, factor: int) -> torch.Tensor:
    """Mean of ``factor`` x ``factor`` boxes of uint8 [B, 3, H, W], rounded half up as PIL's
    ``reduce`` does for 2 and 4; H and W must be multiples of ``factor``."""
    b, c, h, w = image.shape
    boxes = image.view(b, c, h // factor, factor, w // factor, factor)
    total = boxes.sum(dim=(3, 5), dtype=torch.int32)
    area = factor * factor
    return ((total + area // 2) // area).to(torch.uint8)


def resize_batch(image: torch.Tensor, tile_px: int) -> torch.Tensor:
    """uint8 [B, 3, S, S] to ``tile_px``: box reduction by the whole part of the factor,
    then antialiased bilinear for what remains (as :func:`cscvision.slides.slide.resize_tile`
    does with Lanczos)."""
    factor = image.shape[-1] // tile_px
    if factor >= 2 and image.shape[-1] % factor == 0:
        image = box_reduce(image, factor)
    if image.shape[-1] != tile_px:
        x = torch.nn.functional.interpolate(
            image.float(), size=(tile_px, tile_px), mode="bilinear", antialias=True
        )
        image = x.round_().clamp_(0, 255).to(torch.uint8)
    return image


class DeviceTileReader:
    """Reads batches of tiles of one slide, decoded and resized on ``device``."""

    def __init__(self, reader: StoredTileReader, device: torch.device) -> None:
        self.reader = reader
        self.device = torch.device(device)

    @classmethod
    def open(cls, path: str, info: SlideInfo, device: torch.device) -> DeviceTileReader | None:
        """A reader where the slide's tiles are stored JPEG this path decodes within
        :data:`MAX_MEAN_DIFF` of libjpeg-turbo on ``device`` (checked on one tile), else None."""
        reader = StoredTileReader.open(path, info)
        if reader is None:
            return None
        out = cls(reader, device)
        if out.mean_difference() > MAX_MEAN_DIFF:
            reader.close()
            return None
        return out

    def close(self) -> None:
        self.reader.close()

    def mean_difference(self) -> float:
        """Largest mean |Δ| per channel between this decoder and libjpeg-turbo on the first
        present tile of the first fast level."""
        level = next(i for i, lvl in enumerate(self.reader.levels) if lvl is not None)
        lvl = self.reader.levels[level]
        index = np.flatnonzero(lvl.bytecounts)[:1]
        streams = fetch_streams(self.reader, lvl, index)
        ours = decode_batch(streams, self.device, (lvl.tile_h, lvl.tile_w))[0].cpu()
        ref = torch.from_numpy(decode_stream(streams[0], b"")).permute(2, 0, 1)
        diff = (ours.to(torch.int16) - ref.to(torch.int16)).abs().float()
        return float(diff.mean(dim=(1, 2)).max())

    def supports(self, plan: ReadPlan) -> bool:
        lvl = self.reader.levels[plan.level] if plan.level < len(self.reader.levels) else None
        return lvl is not None and not lvl.resampled

    def read(self, xy_l0: np.ndarray, plan: ReadPlan) -> torch.Tensor | None:
        """Tiles uint8 [B, 3, tile_px, tile_px] on the device, or None where a coordinate
        is not a whole level pixel (the CPU path then reads the batch)."""
        lvl = self.reader.levels[plan.level]
        xy_level = np.asarray(xy_l0, dtype=np.float64) / plan.downsample
        if lvl is None or not np.all(xy_level == np.round(xy_level)):
            return None
        layout = batch_layout(lvl, xy_level.astype(np.int64), plan.read_px)
        streams = fetch_streams(self.reader, lvl, layout.indices)
        tiles = decode_batch(streams, self.device, (lvl.tile_h, lvl.tile_w))
        regions = assemble(tiles, layout, (lvl.width, lvl.height))
        return resize_batch(regions, plan.tile_px)

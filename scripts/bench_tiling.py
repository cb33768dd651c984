"""Benchmark tile reading on one core: cscvision's fast path vs OpenSlide vs the decode limit.

Writes a 20k x 20k synthetic JPEG-tiled pyramidal TIFF (256 px tiles, q85, levels 1, 4,
16 at 0.25 µm/px; ``--size W H`` for another) to a temporary folder, or reuses ``--slide
PATH`` (written there first if missing), then times three grids read in raster order
(medians of ``--rounds`` rounds), each after ``Slide.reserve_raster`` as ``infer`` and
``features`` read (``--no-reserve``: without):

1. aligned: 256 px tiles at 0.25 µm/px (level 0, one stored tile each);
2. unaligned: 224 px tiles at 0.25 µm/px (level 0, cut from up to 4 cached stored tiles);
3. resized: 224 px tiles at 0.5 µm/px (448 px at level 0 reduced to 224: each stored tile
   is reduced once and cached, the same pixels as reducing the region).

For each: (a) ``Slide.read_tile`` with a ``plan_read`` plan (the fast path), (b) the same
call with ``fast=False`` (OpenSlide ``read_region``, RGBA on white, same resize), (b0)
bare ``OpenSlide.read_region`` (PIL RGBA, no conversion or resize), and (c) the limit:
libjpeg-turbo decoding, from memory, every stored tile the grid touches, once, with each
of three bindings every round (simplejpeg, simplejpeg into a reused buffer, imagecodecs
``jpeg8_decode`` into a buffer); (c) is the one with the best median. (a) and (c) run
interleaved, one grid row at a time (the row's tiles, then the stored tiles it is the
first to touch, in rotating order), so a shared core's drifting speed slows both alike.
For the resized case, (d) is the floor of any reader that reduces: (c) with each stored
tile also box-reduced once (the same ``reduce_tile``), with no reading, caching or pasting.

    taskset -c 1 .venv/bin/python scripts/bench_tiling.py [--slide PATH] [--size W H] [--tiles 3000]
        [--rounds 3] [--no-reserve] [--into-batch]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
import openslide
import simplejpeg
import tifffile

from cscvision.slides.slide import open_slide, plan_read
from cscvision.slides.storedtiles import full_stream, reduce_tile, stored_level
from cscvision.testing import texture_tile_fn, write_pyramid

SLIDE_PX = 20_480
SLIDE_MPP = 0.25


@dataclass(frozen=True)
class Case:
    name: str
    mpp: float
    tile_px: int


CASES = (
    Case("aligned 256 px @ 0.25 µm/px", 0.25, 256),
    Case("unaligned 224 px @ 0.25 µm/px", 0.25, 224),
    Case("224 px @ 0.5 µm/px", 0.5, 224),
)
RESERVE = True  # as TileBatches does: the cache keeps the stored rows the next grid row reuses
INTO_BATCH = False  # read_tile(..., out=slot of a 256-tile batch), as TileBatches does


def write_bench_slide(path: Path, size: tuple[int, int] = (SLIDE_PX, SLIDE_PX)) -> None:
    start = time.perf_counter()
    write_pyramid(
        path,
        texture_tile_fn(seed=0),
        size=size,
        mpp=SLIDE_MPP,
        tile_px=256,
        levels=3,
        downsample=4,
        quality=85,
    )
    size_mb = path.stat().st_size / 1e6
    print(f"wrote {path} ({size_mb:.0f} MB) in {time.perf_counter() - start:.1f} s")


def grid_xy(path: Path, case: Case, n_tiles: int) -> tuple[np.ndarray, object]:
    """The first ``n_tiles`` tiles of a non-overlapping grid, in raster order."""
    with open_slide(path) as slide:
        plan = plan_read(slide.info, mpp=case.mpp, tile_px=case.tile_px)
        width, height = slide.info.dimensions
    step = round(plan.tile_l0)
    ys, xs = np.mgrid[0 : height - step + 1 : step, 0 : width - step + 1 : step]
    xy = np.stack([xs.ravel(), ys.ravel()], axis=1)[:n_tiles]
    return xy, plan


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def rate(n_tiles: int, fn: Callable[[], None]) -> float:
    start = clock()
    fn()
    return n_tiles / (clock() - start)


def time_read_tile(path: Path, xy: np.ndarray, plan, *, fast: bool) -> float:
    with open_slide(path, fast=fast) as slide:
        if slide.uses_fast_path != fast:
            raise SystemExit(f"{path}: fast path expected {fast}, got {slide.uses_fast_path}")

        if RESERVE:
            slide.reserve_raster(plan)

        def run() -> None:
            for x, y in xy:
                slide.read_tile((int(x), int(y)), plan)

        return rate(len(xy), run)


def time_openslide_raw(path: Path, xy: np.ndarray, plan) -> float:
    osr = openslide.OpenSlide(str(path))
    size = (plan.read_px, plan.read_px)

    def run() -> None:
        for x, y in xy:
            osr.read_region((int(x), int(y)), plan.level, size)

    try:
        return rate(len(xy), run)
    finally:
        osr.close()


DECODERS = {  # libjpeg-turbo bindings the limit tries: (name, decode(stream, buffer))
    "simplejpeg": lambda stream, buf: simplejpeg.decode_jpeg(stream, colorspace="RGB"),
    "simplejpeg into a buffer": lambda stream, buf: simplejpeg.decode_jpeg(
        stream, colorspace="RGB", buffer=buf
    ),
    "imagecodecs.jpeg8 into a buffer": lambda stream, buf: imagecodecs.jpeg8_decode(
        stream, out=buf
    ),
}


def first_touches(path: Path, xy: np.ndarray, plan, chunks: list[slice]):
    """Per chunk of the grid, the complete JPEG streams (shared tables spliced in) of the
    stored tiles it is the first to touch, and the stored tile shape (h, w): decoding
    them all is decoding every stored tile the grid touches exactly once."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[plan.level]
        lvl = stored_level(page, plan.level)
        if lvl is None:
            raise SystemExit(f"{path}: level {plan.level} is not JPEG tiles; no decode limit")
        side = plan.read_px  # level pixels; the bench slide's levels are whole-number
        seen: set[int] = set()
        per_chunk = []
        for chunk in chunks:
            new = []
            for x, y in (xy[chunk] / plan.downsample).astype(int):
                for row in range(y // lvl.tile_h, (y + side - 1) // lvl.tile_h + 1):
                    for col in range(x // lvl.tile_w, (x + side - 1) // lvl.tile_w + 1):
                        index = row * lvl.tiles_across + col
                        if index not in seen:
                            seen.add(index)
                            new.append(index)
            streams = []
            for index in new:
                tif.filehandle.seek(int(lvl.offsets[index]))
                stream = tif.filehandle.read(int(lvl.bytecounts[index]))
                streams.append(full_stream(stream, lvl.header))
            per_chunk.append(streams)
    return per_chunk, (lvl.tile_h, lvl.tile_w)


def interleaved_round(
    path: Path, xy: np.ndarray, plan, chunks: list[slice], streams: list[list[bytes]], shape
) -> tuple[float, dict[str, float]]:
    """One pass over the grid with the fast path and, chunk by chunk, the limit: each
    chunk (a grid row) is read by ``Slide.read_tile`` and its first-touched stored tiles
    are decoded by each binding, in an order that rotates per chunk. A machine whose speed
    drifts (a shared core, a busy neighbour) then slows both alike. Returns seconds of the
    fast path and of each binding, summed over chunks."""
    buf = np.empty((*shape, 3), np.uint8)
    factor = plan.read_px // plan.tile_px if plan.read_px % plan.tile_px == 0 else 1
    spent = {"a": 0.0, **{name: 0.0 for name in DECODERS}}
    with open_slide(path) as slide:
        if not slide.uses_fast_path:
            raise SystemExit(f"{path}: the fast path does not serve this slide")
        if RESERVE:
            slide.reserve_raster(plan)
        read_tile = slide.read_tile

        batch = np.empty((256, plan.tile_px, plan.tile_px, 3), np.uint8)

        def read(chunk: slice) -> None:
            if INTO_BATCH:
                for k, (x, y) in enumerate(xy[chunk]):
                    read_tile((int(x), int(y)), plan, out=batch[k % len(batch)])
                return
            for x, y in xy[chunk]:
                read_tile((int(x), int(y)), plan)

        def decoder(decode: Callable) -> Callable[[int], None]:
            def run(k: int) -> None:
                for stream in streams[k]:
                    decode(stream, buf)

            return run

        def reduce_floor(k: int) -> None:
            for stream in streams[k]:
                reduce_tile(simplejpeg.decode_jpeg(stream, colorspace="RGB", buffer=buf), factor)

        jobs = [("a", read)] + [(name, decoder(decode)) for name, decode in DECODERS.items()]
        if factor >= 2:
            jobs.append(("d", reduce_floor))
            spent["d"] = 0.0
        for k, chunk in enumerate(chunks):
            turn = k % len(jobs)
            for name, job in jobs[turn:] + jobs[:turn]:
                start = clock()
                job(chunk if name == "a" else k)
                spent[name] += clock() - start
    return spent.pop("a"), spent


def bench_case(path: Path, case: Case, n_tiles: int, rounds: int) -> dict[str, float]:
    """Tiles/s of each path. (a) and (c) run interleaved grid row by grid row in each of
    ``rounds`` rounds (a fresh slide each round); the ratio is the median of the rounds'
    ratios. (c) is the binding with the best median over the rounds: the best of each
    round would be the maximum of three noisy samples, a limit the noise raises."""
    xy, plan = grid_xy(path, case, n_tiles)
    print(
        f"\n{case.name}: {len(xy)} tiles, level {plan.level}, read {plan.read_px} px"
        f" -> {plan.tile_px} px",
        flush=True,
    )
    row_len = int(np.count_nonzero(xy[:, 1] == xy[0, 1]))
    chunks = [slice(i, i + row_len) for i in range(0, len(xy), row_len)]
    streams, shape = first_touches(path, xy, plan, chunks)
    limits: dict[str, list[float]] = {name: [] for name in DECODERS}
    fasts, floors = [], []
    for _ in range(rounds):
        seconds, limit_seconds = interleaved_round(path, xy, plan, chunks, streams, shape)
        fasts.append(len(xy) / seconds)
        floor = limit_seconds.pop("d", None)
        for name, value in limit_seconds.items():
            limits[name].append(len(xy) / value)
        each = ", ".join(f"{name} {v[-1]:,.0f}" for name, v in limits.items())
        if floor is not None:
            floors.append(len(xy) / floor)
            each += f"; (d) decode + reduce {floors[-1]:,.0f}"
        print(f"  round: (a) {fasts[-1]:,.0f}  limit: {each}", flush=True)
    best = max(limits, key=lambda name: statistics.median(limits[name]))
    rates = {"c": statistics.median(limits[best]), "a": statistics.median(fasts)}
    rates["a/c"] = statistics.median(a / c for a, c in zip(fasts, limits[best], strict=True))
    ratios = " ".join(f"{a / c:.2f}" for a, c in zip(fasts, limits[best], strict=True))
    print(f"  (c) = {best} (best median); a/c per round: {ratios}", flush=True)
    if floors:
        rates["d"] = statistics.median(floors)
        rates["a/d"] = statistics.median(a / d for a, d in zip(fasts, floors, strict=True))
        rates["d/c"] = statistics.median(d / c for d, c in zip(floors, limits[best], strict=True))
    rates["b"] = time_read_tile(path, xy, plan, fast=False)
    rates["b0"] = time_openslide_raw(path, xy, plan)
    return rates


def print_table(rows: list[tuple[Case, dict[str, float]]]) -> None:
    labels = {
        "a": "(a) cscvision Slide.read_tile, fast path",
        "b": "(b) Slide.read_tile via OpenSlide read_region",
        "b0": "(b0) bare OpenSlide read_region (RGBA)",
        "c": "(c) limit: decode touched stored tiles once",
        "d": "(d) floor: (c) plus box-reducing each once",
    }
    print(f"\n{'case':<30} {'path':<48} {'tiles/s':>9} {'of (c)':>7}")
    for case, rates in rows:
        for key in ("a", "b", "b0", "c", "d"):
            if key not in rates:
                continue
            share = rates[key] / rates["c"]
            print(f"{case.name:<30} {labels[key]:<48} {rates[key]:>9,.0f} {share:>7.0%}")
        print(
            f"{'':<30} ratios: a/c = {rates['a/c']:.2f} (median of rounds), a/b = "
            f"{rates['a'] / rates['b']:.1f}, a/b0 = {rates['a'] / rates['b0']:.1f}"
        )
        if "d" in rates:
            print(
                f"{'':<30} reducing readers: d/c = {rates['d/c']:.2f} (no reader can pass it),"
                f" a/d = {rates['a/d']:.2f}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slide", type=Path, help="reuse (or write once to) this TIFF")
    parser.add_argument("--tiles", type=int, default=3000, help="tiles per case (raster order)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of (a), (c)")
    parser.add_argument("--all-cores", action="store_true", help="do not pin to one core")
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("W", "H"),
        default=(SLIDE_PX, SLIDE_PX),
        help="level-0 size of the slide written when --slide is missing (e.g. 81920 8192: as "
        "wide as a real slide, where a raster grid's stored rows outgrow a fixed cache)",
    )
    parser.add_argument(
        "--into-batch",
        action="store_true",
        help="(a) writes each tile into a slot of a batch (read_tile out=), as infer does",
    )
    parser.add_argument(
        "--no-reserve",
        action="store_true",
        help="read without Slide.reserve_raster (the cache stays at its 48 MB floor)",
    )
    parser.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="wall time, or this process's CPU time (robust where other jobs share the core)",
    )
    args = parser.parse_args(argv)
    global clock, RESERVE, INTO_BATCH
    clock = CLOCKS[args.clock]
    RESERVE, INTO_BATCH = not args.no_reserve, args.into_batch
    if not args.all_cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    with tempfile.TemporaryDirectory(prefix="cscvision-bench-") as tmp:
        path = args.slide or Path(tmp) / "bench_20k.tif"
        if not path.exists():
            write_bench_slide(path, tuple(args.size))
        path.read_bytes()  # into the page cache, so no path pays for the disk
        rows = [(case, bench_case(path, case, args.tiles, args.rounds)) for case in CASES]
    print_table(rows)
    print(f"\nclock: {args.clock}; openslide {openslide.__library_version__}, "
          f"simplejpeg {simplejpeg.__version__}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

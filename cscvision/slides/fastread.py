"""Fast path: decode the stored JPEG tiles of TIFF-family slides directly.

For a tiled JPEG TIFF (Aperio SVS, generic tiled TIFF) OpenSlide's ``read_region`` is the
stored tiles decoded, cropped and pasted, but it spends most of its time compositing
through cairo. Here tile offsets are read once with tifffile, tile bytes with
``os.pread`` (positionless, so threads share one descriptor) and decoded with
libjpeg-turbo using OpenSlide's own settings (accurate DCT, fancy upsampling, and no
colour transform for RGB-photometric tiles), so the pixels are identical. Whatever this
path cannot reproduce exactly returns ``None`` and the caller falls back to OpenSlide.
The file layout, decoding and paste geometry are in :mod:`cscvision.slides.storedtiles`.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import numpy as np

from cscvision.core.errors import CscvisionError
from cscvision.slides.info import CorruptTileError, SlideInfo
from cscvision.slides.storedtiles import (
    StoredLevel,
    decode_stream,
    decodes_like_openslide,
    level_rect,
    map_levels,
    mark_aperio_missing,
    paste_plan,
    reduce_tile,
    touched_tiles,
)

# OpenSlide drivers whose levels are plain TIFF pages read tile by tile.
FAST_VENDORS = frozenset({"aperio", "generic-tiff"})

# Decoded stored tiles kept per reader, in bytes: 256 tiles of 256 px. A grid read in
# raster order reuses a stored tile across grid rows only while the stored rows a grid row
# spans fit (2 x 80 tiles for a 20k px wide level); within a grid row, 4 tiles suffice.
# Raster readers call reserve_raster, which grows it for wider levels up to the cap.
CACHE_BYTES = 48 * 2**20
CACHE_MAX_BYTES = 512 * 2**20  # 2 rows of 256 px tiles across a 330k px wide level
MIN_CACHE_TILES = 8  # of the largest stored tile, whatever cache_bytes says


def _fits(out: np.ndarray, size: tuple[int, int]) -> bool:
    return (
        isinstance(out, np.ndarray)
        and out.dtype == np.uint8
        and out.shape == (size[1], size[0], 3)
        and out.flags.c_contiguous
        and out.flags.writeable
    )


class StoredTileError(CscvisionError):
    """A stored tile's bytes cannot be read or decoded (the message names the tile)."""


# Serialises reopening after a fork; replaced in the child, where it may be held.
_reopen_lock = threading.Lock()


def _new_reopen_lock() -> None:
    global _reopen_lock
    _reopen_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_reopen_lock)


class StoredTileReader:
    """Reads regions of one slide from its stored JPEG tiles; thread-safe and fork-safe."""

    def __init__(
        self,
        path: str,
        levels: list[StoredLevel | None],
        downsamples: tuple[float, ...],
        *,
        cache_bytes: int = CACHE_BYTES,
    ):
        self.path = path
        self.levels = levels
        self.downsamples = downsamples
        largest = max(lvl.tile_w * lvl.tile_h * 3 for lvl in levels if lvl is not None)
        self.cache_bytes = max(cache_bytes, MIN_CACHE_TILES * largest)
        self._pid = -1
        self._fd = -1
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self._scratch = threading.local()  # per thread: one stored tile decoded, then reduced
        self._ensure_process()

    @classmethod
    def open(cls, path: str, info: SlideInfo) -> StoredTileReader | None:
        """A reader when OpenSlide's levels are JPEG-tiled TIFF pages we decode exactly."""
        if info.vendor not in FAST_VENDORS:
            return None
        try:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                levels = map_levels(info.level_dimensions, list(tif.pages))
                if info.vendor == "aperio":
                    levels = mark_aperio_missing(levels)
                levels = [
                    lvl if lvl and decodes_like_openslide(tif, lvl) else None for lvl in levels
                ]
        except Exception:  # unreadable by tifffile: OpenSlide still reads it
            return None
        if not any(levels):
            return None
        return cls(path, levels, info.level_downsamples)

    # process and thread state ----------------------------------------------------------
    def _ensure_process(self) -> None:
        """Open the descriptor here; after a fork, reopen it and drop the inherited state."""
        pid = os.getpid()
        if pid == self._pid:
            return
        with _reopen_lock:
            if pid == self._pid:
                return
            inherited = self._fd
            self._lock = threading.Lock()  # one held by another thread at fork stays held
            self._cache, self._cached_bytes = OrderedDict(), 0
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self._pid = pid
        if inherited >= 0:
            os.close(inherited)  # the child's copy; the parent's stays open

    def close(self) -> None:
        if self._fd >= 0 and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = -1
        self._pid = -2  # never a real pid: a read after close reopens nothing
        self._cache, self._cached_bytes = OrderedDict(), 0

    def reserve_raster(self, level: int, region_h: int, factor: int = 1) -> None:
        """Grow the cache to what a raster-order grid of ``region_h`` level pixels high
        regions on ``level`` revisits (read reduced by ``factor`` where whole), so each
        stored tile is decoded once: every stored row such a region can span, across the
        level, since the next grid row reuses the last of them. On a 100k px wide level
        that is ~150 MB (up to :data:`CACHE_MAX_BYTES`); without it a 48 MB cache decodes
        each stored tile about twice there. Never shrinks; random reads should not call it.
        """
        lvl = self.levels[level] if 0 <= level < len(self.levels) else None
        if lvl is None or region_h <= 0 or factor < 1:
            return
        rows = (int(region_h) - 1) // lvl.tile_h + 2
        tile_bytes = (lvl.tile_w // factor) * (lvl.tile_h // factor) * 3
        need = min(rows * (lvl.tiles_across + 2) * tile_bytes, CACHE_MAX_BYTES)
        with self._lock:
            self.cache_bytes = max(self.cache_bytes, need)

    # reading ---------------------------------------------------------------------------
    def read_region(
        self,
        xy_l0: tuple[int, int],
        level: int,
        size: tuple[int, int],
        out: np.ndarray | None = None,
    ) -> np.ndarray | None:
        """RGB uint8 ``[h, w, 3]`` equal to OpenSlide's region on white, or None.

        With ``out`` (C-contiguous uint8 ``[h, w, 3]``, e.g. a slot of a batch) the region
        is written there and ``out`` returned: a region that is one stored tile is decoded
        straight into it. Untouched where None is returned. Raises
        :class:`~cscvision.slides.info.CorruptTileError` (slide, level, ``xy_l0``) where a
        stored tile it needs cannot be decoded."""
        if out is not None and not _fits(out, size):
            raise ValueError(f"out must be C-contiguous uint8 {size[1]} x {size[0]} x 3")
        try:
            return self._read_region(xy_l0, level, size, out)
        except StoredTileError as e:
            raise CorruptTileError(self.path, level, xy_l0, str(e)) from None

    def _read_region(
        self, xy_l0: tuple[int, int], level: int, size: tuple[int, int], out: np.ndarray | None
    ) -> np.ndarray | None:
        found = self._locate(xy_l0, level, size)
        if found is None:
            return None
        lvl, (x, y, w, h) = found
        if x % lvl.tile_w == 0 and y % lvl.tile_h == 0 and (w, h) == (lvl.tile_w, lvl.tile_h):
            if x + w <= lvl.width and y + h <= lvl.height:
                return self._whole_tile(level, lvl, x // w, y // h, out)
        return self._assemble(level, lvl, x, y, w, h, out)

    def read_reduced(
        self, xy_l0: tuple[int, int], level: int, size: tuple[int, int], factor: int
    ) -> np.ndarray | None:
        """OpenSlide's region on white box-reduced by the whole ``factor`` as ``Image.reduce``
        does it, ``[h / factor, w / factor, 3]``, or None; raises ``CorruptTileError`` as
        :meth:`read_region` does.

        Each stored tile is reduced once and cached. Exact where the region and the stored
        tiles start on multiples of ``factor``: no box then straddles two stored tiles, and
        boxes past the level's edge mix in white as before.
        """
        try:
            return self._read_reduced(xy_l0, level, size, factor)
        except StoredTileError as e:
            raise CorruptTileError(self.path, level, xy_l0, str(e)) from None

    def _read_reduced(
        self, xy_l0: tuple[int, int], level: int, size: tuple[int, int], factor: int
    ) -> np.ndarray | None:
        found = self._locate(xy_l0, level, size)
        if found is None or factor < 2:
            return None
        lvl, (x, y, w, h) = found
        if any(v % factor for v in (x, y, w, h, lvl.tile_w, lvl.tile_h)):
            return None
        tw, th = lvl.tile_w // factor, lvl.tile_h // factor
        return self._paste(
            (x // factor, y // factor, w // factor, h // factor),
            (lvl.tiles_across * tw, lvl.tiles_down * th),
            (tw, th, lvl.tiles_across),
            lambda index: self._cached(
                (level, index, factor), lambda: self._reduce(lvl, index, factor)
            ),
        )

    def _locate(
        self, xy_l0: tuple[int, int], level: int, size: tuple[int, int]
    ) -> tuple[StoredLevel, tuple[int, int, int, int]] | None:
        """The stored level and the region in its pixels, where this reader can serve it."""
        if self._pid == -2 or not 0 <= level < len(self.levels):
            return None
        lvl = self.levels[level]
        rect = level_rect(xy_l0, self.downsamples[level], size) if lvl else None
        if lvl is None or rect is None:
            return None
        if lvl.resampled and touched_tiles(lvl, *rect) & lvl.resampled:
            return None
        self._ensure_process()
        return lvl, rect

    def _whole_tile(
        self, level: int, lvl: StoredLevel, col: int, row: int, out: np.ndarray | None
    ) -> np.ndarray:
        """A region that is exactly one stored tile: decode it straight for the caller,
        into ``out`` where given."""
        index = row * lvl.tiles_across + col
        with self._lock:
            cached = self._cache.get((level, index))
        if cached is not None:
            if out is None:
                return cached.copy()
            out[...] = cached
            return out
        if out is None:
            return self._decode(lvl, index)
        self._decode(lvl, index, out=out)
        return out

    def _assemble(
        self, level: int, lvl: StoredLevel, x: int, y: int, w: int, h: int, out=None
    ) -> np.ndarray:
        return self._paste(
            (x, y, w, h),
            (lvl.width, lvl.height),
            (lvl.tile_w, lvl.tile_h, lvl.tiles_across),
            lambda index: self._cached((level, index), lambda: self._decode(lvl, index)),
            out,
        )

    @staticmethod
    def _paste(rect, extent, tiling, tile_at, out=None) -> np.ndarray:
        """Region ``rect`` (x, y, w, h) of an image of ``extent`` (w, h) cut in tiles
        ``tiling`` (tile w, tile h, tiles across) that ``tile_at(index)`` returns; white
        outside the image. Written into ``out`` where given."""
        x, y, w, h = rect
        tw, th, across = tiling
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, extent[0]), min(y + h, extent[1])
        inside = (x0, y0, x1, y1) == (x, y, x + w, y + h)
        if out is None:
            out = np.empty((h, w, 3), np.uint8) if inside else np.full((h, w, 3), 255, np.uint8)
        elif not inside:
            out.fill(255)
        if x0 >= x1 or y0 >= y1:
            return out
        col0, row0 = x0 // tw, y0 // th
        base = row0 * across + col0
        plan = paste_plan(x0 - col0 * tw, y0 - row0 * th, x1 - x0, y1 - y0, tw, th)
        dy0, dx0 = y0 - y, x0 - x
        for drow, dcol, dst_y, dst_x, src_y, src_x in plan:
            tile = tile_at(base + drow * across + dcol)
            if dy0 or dx0:
                dst_y = slice(dst_y.start + dy0, dst_y.stop + dy0)
                dst_x = slice(dst_x.start + dx0, dst_x.stop + dx0)
            out[dst_y, dst_x] = tile[src_y, src_x]
        return out

    def _cached(self, key: tuple[int, ...], make) -> np.ndarray:
        """The tile cached under ``key``, made by ``make()`` on a miss. Holds tiles up to
        :attr:`cache_bytes` by their real size, least recently used first out."""
        with self._lock:
            tile = self._cache.get(key)
            if tile is not None:
                self._cache.move_to_end(key)
                return tile
        tile = make()
        tile.flags.writeable = False  # shared by later reads: nobody may change it
        with self._lock:
            replaced = self._cache.pop(key, None)  # another thread made it meanwhile
            self._cached_bytes += tile.nbytes - (0 if replaced is None else replaced.nbytes)
            self._cache[key] = tile
            while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
                self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return tile

    def _reduce(self, lvl: StoredLevel, index: int, factor: int) -> np.ndarray:
        """Stored tile ``index`` with the part past the level's edge white, box-reduced.
        Decoded into this thread's scratch tile: only the reduced tile is new memory."""
        tile = self._decode(lvl, index, out=self._scratch_tile(lvl))
        row, col = divmod(index, lvl.tiles_across)
        if (row + 1) * lvl.tile_h > lvl.height:
            tile[lvl.height - row * lvl.tile_h :] = 255
        if (col + 1) * lvl.tile_w > lvl.width:
            tile[:, lvl.width - col * lvl.tile_w :] = 255
        return reduce_tile(tile, factor)

    def _scratch_tile(self, lvl: StoredLevel) -> np.ndarray:
        """This thread's buffer for one decoded stored tile of ``lvl``'s size (reused: a
        fresh 192 KB array per decode costs ~10 % in page faults and cache misses)."""
        buf = getattr(self._scratch, "tile", None)
        if buf is None or buf.shape != (lvl.tile_h, lvl.tile_w, 3):
            buf = self._scratch.tile = np.empty((lvl.tile_h, lvl.tile_w, 3), np.uint8)
        return buf

    def _decode(self, lvl: StoredLevel, index: int, out: np.ndarray | None = None) -> np.ndarray:
        """Stored tile ``index`` as RGB, decoded into ``out`` where given."""
        count = int(lvl.bytecounts[index])
        if count == 0:  # a missing tile is transparent in OpenSlide: white here
            if out is None:
                return np.full((lvl.tile_h, lvl.tile_w, 3), 255, np.uint8)
            out.fill(255)
            return out
        row, col = divmod(index, lvl.tiles_across)
        try:
            stream = os.pread(self._fd, count, int(lvl.offsets[index]))
            rgb = decode_stream(stream, lvl.header, out)
        except (OSError, ValueError, RuntimeError) as e:
            raise StoredTileError(f"stored tile column {col}, row {row}: {e}") from None
        if rgb.shape != (lvl.tile_h, lvl.tile_w, 3):
            raise StoredTileError(
                f"stored tile column {col}, row {row} decodes to {rgb.shape[1]} x "
                f"{rgb.shape[0]} px, not {lvl.tile_w} x {lvl.tile_h}"
            )
        return rgb

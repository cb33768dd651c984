"""Fast path: decode the stored JPEG tiles of TIFF-family slides directly.

For a tiled JPEG TIFF (Aperio SVS, generic tiled TIFF) OpenSlide's ``read_region`` is the
stored tiles decoded, cropped and pasted, but it spends most of its time compositing
through cairo. Here tile offsets are read once with tifffile, tile bytes with
``os.pread`` (positionless, so threads share one descriptor) and decoded with
libjpeg-turbo using OpenSlide's own settings (accurate DCT, fancy upsampling, and no
colour transform for RGB-photometric tiles), so the pixels are identical. Whatever this
path cannot reproduce exactly returns ``None`` and the caller falls back to OpenSlide.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace

import imagecodecs
import numpy as np
import simplejpeg
from PIL import Image

from cscvision.slides.info import CorruptTileError, SlideInfo

# OpenSlide drivers whose levels are plain TIFF pages read tile by tile.
FAST_VENDORS = frozenset({"aperio", "generic-tiff"})

# Decoded stored tiles kept per reader, in bytes: 256 tiles of 256 px. A grid read in
# raster order reuses a stored tile across grid rows only while a whole row of stored
# tiles fits (80 tiles for a 20k px wide level); within a grid row, 4 tiles suffice.
CACHE_BYTES = 48 * 2**20
MIN_CACHE_TILES = 8  # of the largest stored tile, whatever cache_bytes says

_COMPRESSION_JPEG = 7
_PHOTOMETRIC_COLORSPACE = {2: "RGB", 6: "YCBCR"}
_SOI = b"\xff\xd8"
# APP14 "Adobe" segment with transform 0: tells libjpeg the three components are R, G, B,
# which is how OpenSlide decodes RGB-photometric JPEG tiles.
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


class StoredTileError(Exception):
    """A stored tile's bytes cannot be read or decoded (the message names the tile)."""


# Serialises reopening after a fork; replaced in the child, where it may be held.
_reopen_lock = threading.Lock()


def _new_reopen_lock() -> None:
    global _reopen_lock
    _reopen_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_reopen_lock)


@dataclass(frozen=True)
class StoredLevel:
    """Where one pyramid level's JPEG tiles are in the file, and how to decode them."""

    page: int
    width: int
    height: int
    tile_w: int
    tile_h: int
    offsets: np.ndarray  # int64 [tiles_down * tiles_across], raster order
    bytecounts: np.ndarray  # int64, 0 = tile missing (transparent)
    header: bytes  # prepended to each stream minus its SOI; b"" = streams are complete
    colorspace: str  # "RGB" or "YCBCR": what the stored components are
    resampled: frozenset[int] = frozenset()  # tiles OpenSlide paints from the finer level

    @property
    def tiles_across(self) -> int:
        return -(-self.width // self.tile_w)

    @property
    def tiles_down(self) -> int:
        return -(-self.height // self.tile_h)


def jpeg_header(tables: bytes | None, colorspace: str) -> bytes:
    """Bytes to put before a tile stream (minus its SOI) so libjpeg decodes it as OpenSlide.

    Shared JPEGTables (SOI, DQT/DHT, EOI) are merged in; RGB-photometric tiles get an
    Adobe marker so no YCbCr->RGB transform is applied.
    """
    body = tables[2:-2] if tables else b""
    if colorspace == "RGB":
        return _SOI + _ADOBE_RGB + body
    return _SOI + body if body else b""


def full_stream(stream: bytes, header: bytes) -> bytes:
    """A stored tile's stream as a complete JPEG: ``header`` (see :func:`jpeg_header`)
    in place of its SOI, so any decoder reads it as OpenSlide does."""
    return header + stream[2:] if header else stream


def decode_stream(stream: bytes, header: bytes, out: np.ndarray | None = None) -> np.ndarray:
    """Decode one stored tile stream to RGB uint8 ``[tile_h, tile_w, 3]``, into ``out``
    where given (a view of it is returned)."""
    return simplejpeg.decode_jpeg(full_stream(stream, header), colorspace="RGB", buffer=out)


def stored_level(page: object, index: int) -> StoredLevel | None:
    """The JPEG layout of a tifffile page, or None where it is not 8-bit 3-sample JPEG tiles."""
    colorspace = _PHOTOMETRIC_COLORSPACE.get(int(page.photometric))
    if (
        not page.is_tiled
        or int(page.compression) != _COMPRESSION_JPEG
        or colorspace is None
        or page.samplesperpixel != 3
        or page.bitspersample != 8
        or int(page.planarconfig) != 1
        or page.imagedepth != 1
        or page.extrasamples
    ):
        return None
    return StoredLevel(
        page=index,
        width=int(page.imagewidth),
        height=int(page.imagelength),
        tile_w=int(page.tilewidth),
        tile_h=int(page.tilelength),
        offsets=np.asarray(page.dataoffsets, dtype=np.int64),
        bytecounts=np.asarray(page.databytecounts, dtype=np.int64),
        header=jpeg_header(page.jpegtables, colorspace),
        colorspace=colorspace,
    )


def map_levels(
    level_dimensions: tuple[tuple[int, int], ...], pages: list[object]
) -> list[StoredLevel | None]:
    """For each OpenSlide level, the first TIFF page of the same size, if it is JPEG tiles."""
    levels: list[StoredLevel | None] = []
    for width, height in level_dimensions:
        found = None
        for index, page in enumerate(pages):
            if (page.imagewidth, page.imagelength) == (width, height) and page.is_tiled:
                found = stored_level(page, index)
                break
        levels.append(found)
    return levels


def mark_aperio_missing(levels: list[StoredLevel | None]) -> list[StoredLevel | None]:
    """Mark the tiles OpenSlide's Aperio driver does not decode but paints by resampling.

    It takes zero-length tiles as missing, marks the coarser tile concatenating a missing
    one as missing too, level by level, and paints a missing tile of level k > 0 by
    scaling level k - 1 (level 0's are transparent). Regions touching those go to
    OpenSlide. A level we cannot follow hides what is missing above it: those go too.
    """
    out: list[StoredLevel | None] = []
    missing: frozenset[int] = frozenset()
    prev: StoredLevel | None = None
    for lvl in levels:
        if lvl is None or (prev is None and missing):
            out.append(None)
            prev = None
            missing = missing or frozenset({-1})  # unknown from here on
            continue
        own = frozenset(np.flatnonzero(lvl.bytecounts == 0).tolist())
        inherited: set[int] = set()
        if prev is not None and missing:
            concat_x = max(1, math.floor(prev.tiles_across / lvl.tiles_across + 0.5))
            concat_y = max(1, math.floor(prev.tiles_down / lvl.tiles_down + 0.5))
            for tile in missing:
                row, col = divmod(tile, prev.tiles_across)
                inherited.add(row // concat_y * lvl.tiles_across + col // concat_x)
        missing = own | inherited
        out.append(replace(lvl, resampled=missing) if prev is not None else lvl)
        prev = lvl
    return out


def level_rect(
    xy_l0: tuple[int, int], downsample: float, size: tuple[int, int]
) -> tuple[int, int, int, int] | None:
    """The region in level pixels ``(x, y, w, h)``, or None where OpenSlide would resample.

    OpenSlide divides level-0 coordinates by the downsample; a fractional result is
    painted with a sub-pixel shift, which only OpenSlide reproduces.
    """
    x, y = xy_l0[0] / downsample, xy_l0[1] / downsample
    w, h = size
    if not (float(x).is_integer() and float(y).is_integer()):
        return None
    if int(w) != w or int(h) != h or w <= 0 or h <= 0:
        return None
    return int(x), int(y), int(w), int(h)


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
                    lvl if lvl and _decodes_like_openslide(tif, lvl) else None for lvl in levels
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

    # reading ---------------------------------------------------------------------------
    def read_region(
        self, xy_l0: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray | None:
        """RGB uint8 ``[h, w, 3]`` equal to OpenSlide's region on white, or None.

        Raises :class:`~cscvision.slides.info.CorruptTileError` (slide, level, ``xy_l0``)
        where a stored tile it needs cannot be decoded."""
        try:
            return self._read_region(xy_l0, level, size)
        except StoredTileError as e:
            raise CorruptTileError(self.path, level, xy_l0, str(e)) from None

    def _read_region(
        self, xy_l0: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray | None:
        found = self._locate(xy_l0, level, size)
        if found is None:
            return None
        lvl, (x, y, w, h) = found
        if x % lvl.tile_w == 0 and y % lvl.tile_h == 0 and (w, h) == (lvl.tile_w, lvl.tile_h):
            if x + w <= lvl.width and y + h <= lvl.height:
                return self._whole_tile(level, lvl, x // w, y // h)
        return self._assemble(level, lvl, x, y, w, h)

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
        if lvl.resampled and _touched_tiles(lvl, *rect) & lvl.resampled:
            return None
        self._ensure_process()
        return lvl, rect

    def _whole_tile(self, level: int, lvl: StoredLevel, col: int, row: int) -> np.ndarray:
        """A region that is exactly one stored tile: decode it straight for the caller."""
        index = row * lvl.tiles_across + col
        with self._lock:
            cached = self._cache.get((level, index))
        if cached is not None:
            return cached.copy()
        return self._decode(lvl, index)

    def _assemble(self, level: int, lvl: StoredLevel, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self._paste(
            (x, y, w, h),
            (lvl.width, lvl.height),
            (lvl.tile_w, lvl.tile_h, lvl.tiles_across),
            lambda index: self._cached((level, index), lambda: self._decode(lvl, index)),
        )

    @staticmethod
    def _paste(rect, extent, tiling, tile_at) -> np.ndarray:
        """Region ``rect`` (x, y, w, h) of an image of ``extent`` (w, h) cut in tiles
        ``tiling`` (tile w, tile h, tiles across) that ``tile_at(index)`` returns; white
        outside the image."""
        x, y, w, h = rect
        tw, th, across = tiling
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, extent[0]), min(y + h, extent[1])
        inside = (x0, y0, x1, y1) == (x, y, x + w, y + h)
        out = np.empty((h, w, 3), np.uint8) if inside else np.full((h, w, 3), 255, np.uint8)
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


@functools.lru_cache(maxsize=4096)
def paste_plan(
    x: int, y: int, w: int, h: int, tw: int, th: int
) -> tuple[tuple[int, int, slice, slice, slice, slice], ...]:
    """How a ``w`` x ``h`` region starting at ``(x, y)`` within tile (0, 0) of a grid of
    ``tw`` x ``th`` tiles is pasted: per tile it touches, (row, column) from that tile and
    the destination and source slices (y, x). Grids read at a fixed step repeat a few
    offsets, so plans are cached."""
    cells = []
    for drow in range((y + h - 1) // th + 1):
        ay, by = max(y, drow * th), min(y + h, (drow + 1) * th)
        for dcol in range((x + w - 1) // tw + 1):
            ax, bx = max(x, dcol * tw), min(x + w, (dcol + 1) * tw)
            dst = (slice(ay - y, by - y), slice(ax - x, bx - x))
            src = (slice(ay - drow * th, by - drow * th), slice(ax - dcol * tw, bx - dcol * tw))
            cells.append((drow, dcol, *dst, *src))
    return tuple(cells)


def _touched_tiles(lvl: StoredLevel, x: int, y: int, w: int, h: int) -> set[int]:
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, lvl.width), min(y + h, lvl.height)
    if x0 >= x1 or y0 >= y1:
        return set()
    cols = range(x0 // lvl.tile_w, (x1 - 1) // lvl.tile_w + 1)
    rows = range(y0 // lvl.tile_h, (y1 - 1) // lvl.tile_h + 1)
    return {row * lvl.tiles_across + col for row in rows for col in cols}


def _decodes_like_openslide(tif: object, lvl: StoredLevel) -> bool:
    """Check one tile: our decode must equal libjpeg told the colour space, as OpenSlide does.

    Catches streams whose own markers (JFIF, Adobe, component ids) would make libjpeg
    guess a different colour space than the TIFF photometric tag says.
    """
    present = np.flatnonzero(lvl.bytecounts)
    if present.size == 0:
        return False
    index = int(present[0])
    fh = tif.filehandle
    fh.seek(int(lvl.offsets[index]))
    stream = fh.read(int(lvl.bytecounts[index]))
    tables = tif.pages[lvl.page].jpegtables
    try:
        ours = decode_stream(stream, lvl.header)
        told = imagecodecs.jpeg8_decode(
            stream, tables=tables, colorspace=lvl.colorspace, outcolorspace="RGB"
        )
    except Exception:  # not decodable by libjpeg-turbo (12-bit, lossless...): OpenSlide
        return False
    return ours.shape == (lvl.tile_h, lvl.tile_w, 3) and np.array_equal(ours, told)


def reduce_tile(rgb: np.ndarray, factor: int) -> np.ndarray:
    """``Image.reduce(factor)`` of an RGB uint8 array whose sides are multiples of ``factor``.

    For 2, OpenCV's ``INTER_AREA`` (``(a + b + c + d + 2) >> 2``, PIL's own rounding: equal
    bit for bit, tested) where the ``speed`` extra installed it: 3x faster than PIL, which
    is what lets a 2x-reduced grid run near the decoding limit.
    """
    if factor == 2 and _cv2() is not None:
        h, w = rgb.shape[:2]
        return _cv2().resize(rgb, (w // 2, h // 2), interpolation=_cv2().INTER_AREA)
    return np.asarray(Image.fromarray(rgb).reduce(factor))


@functools.cache
def _cv2():
    try:
        import cv2
    except ImportError:
        return None
    cv2.setNumThreads(1)  # called from reader threads: no pool of its own inside each
    return cv2

"""Stored JPEG tiles of TIFF pages: where they are, how to decode them as OpenSlide does,
and the pure geometry of pasting and reducing them (used by :mod:`cscvision.slides.fastread`
on the CPU and :mod:`cscvision.slides.gpudecode` on a device)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import imagecodecs
import numpy as np
import simplejpeg
from PIL import Image

_COMPRESSION_JPEG = 7
_PHOTOMETRIC_COLORSPACE = {2: "RGB", 6: "YCBCR"}
_SOI = b"\xff\xd8"
# APP14 "Adobe" segment with transform 0: tells libjpeg the three components are R, G, B,
# which is how OpenSlide decodes RGB-photometric JPEG tiles.
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


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


def touched_tiles(lvl: StoredLevel, x: int, y: int, w: int, h: int) -> set[int]:
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, lvl.width), min(y + h, lvl.height)
    if x0 >= x1 or y0 >= y1:
        return set()
    cols = range(x0 // lvl.tile_w, (x1 - 1) // lvl.tile_w + 1)
    rows = range(y0 // lvl.tile_h, (y1 - 1) // lvl.tile_h + 1)
    return {row * lvl.tiles_across + col for row in rows for col in cols}


def decodes_like_openslide(tif: object, lvl: StoredLevel) -> bool:
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

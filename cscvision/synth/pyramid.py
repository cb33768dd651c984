"""Stream a rendered slide into a tiled, JPEG-compressed, pyramidal TIFF (OpenSlide generic-tiff).

Level 0 is rendered a row of tiles at a time, in column blocks, and handed to tifffile
tile by tile; each block is box-reduced by 4 into a level-1 canvas (1/16 of the level-0
pixels), and the smaller levels are reduced from that. Resolution tags are in pixels
per centimetre, so OpenSlide reports ``openslide.mpp-x``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

LEVEL_FACTOR = 4  # each pyramid level is 4x smaller than the one above
MIN_LEVELS = 3
BLOCK_PX = 4096  # columns rendered at once
PAD_VALUE = 255


@dataclass(frozen=True)
class PyramidSpec:
    width_px: int
    height_px: int
    mpp: float
    tile_px: int = 256
    quality: int = 85

    def level_shapes(self) -> list[tuple[int, int]]:
        """(height, width) per level: /4 each, at least MIN_LEVELS, down to one tile."""
        shapes = [(self.height_px, self.width_px)]
        while len(shapes) < MIN_LEVELS or max(shapes[-1]) > self.tile_px:
            h, w = shapes[-1]
            if h == 1 and w == 1:
                break
            shapes.append((-(-h // LEVEL_FACTOR), -(-w // LEVEL_FACTOR)))
        return shapes


def _tiles(block: np.ndarray, tile_px: int) -> Iterator[np.ndarray]:
    """Full tiles across a block one tile high, padded at the right and bottom edges."""
    for x in range(0, block.shape[1], tile_px):
        tile = block[:, x : x + tile_px]
        if tile.shape[0] != tile_px or tile.shape[1] != tile_px:
            padded = np.full((tile_px, tile_px, 3), PAD_VALUE, np.uint8)
            padded[: tile.shape[0], : tile.shape[1]] = tile
            tile = padded
        yield tile


def _reduce(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).reduce(LEVEL_FACTOR))


def level0_tiles(
    spec: PyramidSpec,
    render: Callable[[int, int, int, int], np.ndarray],
    level1: np.ndarray,
    on_row: Callable[[], None] | None = None,
) -> Iterator[np.ndarray]:
    """Level-0 tiles in row-major order; fills ``level1`` (the /4 canvas) on the way."""
    t = spec.tile_px
    block_px = max(t, BLOCK_PX // t * t)
    for y in range(0, spec.height_px, t):
        h = min(t, spec.height_px - y)
        for x in range(0, spec.width_px, block_px):
            w = min(block_px, spec.width_px - x)
            block = render(x, y, w, h)
            small = _reduce(block)
            ly, lx = y // LEVEL_FACTOR, x // LEVEL_FACTOR
            level1[ly : ly + small.shape[0], lx : lx + small.shape[1]] = small
            yield from _tiles(block, t)
        if on_row is not None:
            on_row()


def write_pyramid(
    path: Path,
    spec: PyramidSpec,
    render: Callable[[int, int, int, int], np.ndarray],
    *,
    description: str,
    on_row: Callable[[], None] | None = None,
) -> list[np.ndarray]:
    """Write the TIFF at ``path``; return the reduced levels (1, 2, ...) kept in memory."""
    shapes = spec.level_shapes()
    level1 = np.full((*shapes[1], 3), PAD_VALUE, np.uint8)
    bigtiff = spec.width_px * spec.height_px * 3 > 2**31
    common = {
        "dtype": np.uint8,
        "photometric": "rgb",
        "tile": (spec.tile_px, spec.tile_px),
        "compression": "jpeg",
        "compressionargs": {"level": int(spec.quality)},
        "resolutionunit": "CENTIMETER",
        "metadata": None,
        "maxworkers": 1,
    }
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        tif.write(
            level0_tiles(spec, render, level1, on_row),
            shape=(spec.height_px, spec.width_px, 3),
            resolution=_px_per_cm(spec.mpp, 1),
            description=description,
            software="cscvision synth",
            **common,
        )
        levels = [level1]
        for i in range(1, len(shapes)):
            if i > 1:
                levels.append(_reduce(levels[-1]))
            tif.write(
                levels[-1],
                subfiletype=1,
                resolution=_px_per_cm(spec.mpp, LEVEL_FACTOR**i),
                **common,
            )
    return levels


def _px_per_cm(mpp: float, downsample: int) -> tuple[float, float]:
    ppcm = 1e4 / (mpp * downsample)
    return (ppcm, ppcm)

"""``<slide_id>_likelihood_map_<target>.tif``: a pyramidal probability map for ASAP/QuPath.

One file per target, each a tiled pyramidal TIFF with its levels as successive pages
of the main IFD chain (finest first; coarser pages marked reduced-resolution): the layout
OpenSlide's generic-tiff driver, ASAP's reader and QuPath's all open. One multi-page
file holding several page pyramids, or SubIFD pyramids, is not read the same way by all
three (OpenSlide takes every tiled main-chain page as a level and ignores SubIFDs), so
each target gets its own file.

Level 0 is ``floor(W / factor) × floor(H / factor)`` (default factor 16): ASAP takes the
overlay scale as the integer quotient of the base sizes and shows the overlay only when
``W // w == H // h``, which rounding up breaks whenever one side divides exactly and the
other does not; with floor both quotients are ``factor`` (for sides ≥ factor²). Pixel
``(i, j)`` covers level-0 ``[i * factor, (i + 1) * factor)``; a last partial strip of the
slide is not drawn. Pixels are uint8, probability × 255; 0 also where no tile was scored.
Compression is LZW: ASAP's TIFF reader takes only none, LZW, JPEG, JPEG 2000 (33003/33005)
and 32946 (not Adobe deflate, 8). Resolution tags give µm/px (slide µm/px × factor) in
pixels per centimetre. Tiles are drawn one at a time from the stitched map: the file
never sits in memory.

:func:`asap_name` is the file name ASAP opens by itself beside a slide
(``<slide file stem>_likelihood_map.tif``). In ASAP choose the colour table
``Traffic Light (0 - 255)`` (its uint8 default, ``Label``, is for class-label maps).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

from cscvision.core.geometry import MapTransform, sample_map
from cscvision.core.io import atomic_path

DEFAULT_FACTOR = 16
TIFF_TILE_PX = 256


def likelihood_map_name(slide_id: str, target: str) -> str:
    return f"{slide_id}_likelihood_map_{target}.tif"


def asap_name(slide_path: str | Path) -> str:
    """The likelihood map ASAP loads with the slide: ``<slide stem>_likelihood_map.tif``."""
    return f"{Path(slide_path).stem}_likelihood_map.tif"


def level_sizes(
    dimensions: tuple[int, int], factor: int, tile_px: int = TIFF_TILE_PX
) -> list[tuple[int, int, int]]:
    """(level-0 px per map px, width, height) of each level, down to one tile."""
    levels = []
    step = factor
    while True:
        w, h = max(1, dimensions[0] // step), max(1, dimensions[1] // step)
        levels.append((step, w, h))
        if max(w, h) <= tile_px:
            return levels
        step *= 2


def _tiles(
    prob_map: np.ndarray, transform: MapTransform, step_l0: int, size: tuple[int, int], tile: int
) -> Iterator[np.ndarray]:
    """uint8 tiles of one level in raster order (edge tiles padded with 0)."""
    width, height = size
    for ty in range(0, height, tile):
        for tx in range(0, width, tile):
            x_l0 = (tx + np.arange(tile) + 0.5) * step_l0
            y_l0 = (ty + np.arange(tile) + 0.5) * step_l0
            p = sample_map(prob_map[None], transform, x_l0, y_l0)[0]
            out = np.round(np.clip(np.nan_to_num(p, nan=0.0), 0, 1) * 255).astype(np.uint8)
            out[max(0, height - ty) :, :] = 0
            out[:, max(0, width - tx) :] = 0
            yield out


def write_likelihood_map(
    path: str | Path,
    prob_map: np.ndarray,
    transform: MapTransform,
    *,
    dimensions: tuple[int, int],
    slide_mpp: float,
    factor: int = DEFAULT_FACTOR,
    tile_px: int = TIFF_TILE_PX,
) -> Path:
    """Write one target's map [rows, cols] (see module doc) atomically; returns ``path``."""
    if factor < 1 or int(factor) != factor:
        raise ValueError(f"likelihood map factor must be a whole number ≥ 1, got {factor}")
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp) as tif:
        for level, (step, w, h) in enumerate(level_sizes(dimensions, factor, tile_px)):
            px_per_cm = 10_000.0 / (slide_mpp * step)
            tif.write(
                _tiles(prob_map, transform, step, (w, h), tile_px),
                shape=(h, w),
                dtype=np.uint8,
                tile=(tile_px, tile_px),
                photometric="minisblack",
                compression="lzw",
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=1 if level else 0,
                metadata=None,
                software="cscvision",
            )
    return Path(path)

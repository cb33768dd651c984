"""Tissue detection on a low-resolution thumbnail: pure functions on RGB arrays.

Tissue is stained (saturated, optically dense) and H&E-coloured; glass is bright and grey;
pen ink is green, teal, blue or black. The mask is computed at ``mask_mpp`` µm/px
(default 8, about 1/16 of a 20x slide), never from level 0.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage import filters, morphology
from skimage.util import img_as_float64

from cscvision.core.geometry import tile_box_counts

DEFAULT_MASK_MPP = 8.0
MAX_GLASS_OD = 0.3  # summed OD of the brightest tinted glass seen (255, 236, 219: 0.23)


@dataclass(frozen=True)
class TissueParams:
    """Thresholds for :func:`tissue_mask`; areas in mm² so they hold at any mask resolution."""

    min_saturation: float = 0.07  # floor under Otsu's threshold, for near-empty slides
    min_od: float = 0.12  # summed optical density below which a pixel is glass
    min_object_mm2: float = 0.01  # specks smaller than this are dropped
    balance_glass: bool = True  # glass that passes the thresholds is made grey first
    max_hole_mm2: float = 0.05  # holes smaller than this are filled
    reject_ink: bool = True
    ink_dilate_um: float = 16.0  # margin removed around pen ink


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Summed optical density per pixel (0 for white glass)."""
    if rgb.dtype != np.uint8:
        rgb = np.clip(rgb.astype(np.float32), 1.0, 255.0)
        return -np.log(rgb / 255.0).sum(axis=-1)
    table = _density_table()
    density = table[rgb[..., 0]]
    density += table[rgb[..., 1]]  # in place: same sums, one float image fewer
    density += table[rgb[..., 2]]
    return density


@functools.cache
def _density_table() -> np.ndarray:
    """Optical density of one channel value, float32[256]: ``-log(max(v, 1) / 255)``."""
    levels = np.clip(np.arange(256, dtype=np.float32), 1.0, 255.0)
    return -np.log(levels / 255.0)


@functools.cache
def _saturation_table() -> np.ndarray:
    """HSV saturation by ``max * 256 + min`` of a pixel's channels, float64[65536], with
    ``skimage.color.rgb2hsv``'s own operations (``img_as_float``, ``ptp / max``, 0 where
    ``ptp`` is), so thresholds compare exactly as on its output (tested), without its hue."""
    levels = img_as_float64(np.arange(256, dtype=np.uint8))
    top, low = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    value = levels[top]
    delta = value - levels[low]
    with np.errstate(invalid="ignore", divide="ignore"):
        table = delta / value
    table[delta == 0.0] = 0.0
    table[low > top] = 0.0  # not a (max, min) pair
    return table.ravel()


def _channels(rgb: np.ndarray) -> tuple[np.ndarray, ...]:
    """The three channels of ``rgb`` and their per-pixel max and min, uint8."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return r, g, b, np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)


def ink_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels of green, teal, blue or black pen ink.

    H&E pixels have green as their weakest channel (eosin pink, haematoxylin purple:
    red ≥ green); ink of green, teal and blue breaks that, and black ink is dark and grey.
    """
    return _ink(*_channels(rgb))


def _ink(r, g, b, top: np.ndarray, low: np.ndarray) -> np.ndarray:
    g_r, b_r, b_g = (np.subtract(u, v, dtype=np.int16) for u, v in ((g, r), (b, r), (b, g)))
    green_teal = (g_r > 12) & ((g_r > 25) | (b_r > 25))  # g > r + 12, max(g, b) > r + 25
    blue = (b_r > 45) & (b_g > 25) & (g_r >= -10)  # haematoxylin has red > green
    black = (top < 50) & (top - low < 18)  # top >= low: no uint8 wrap-around
    return green_teal | blue | black


def _area_px(mm2: float, mask_mpp: float) -> int:
    return max(1, round(mm2 * 1e6 / (mask_mpp * mask_mpp)))


def _saturation_threshold(code: np.ndarray, stained: np.ndarray, params: TissueParams) -> float:
    """Half of Otsu's threshold on the saturation of stained pixels, floored.

    The histogram is built from the counts of each (max, min) pair: the same values, bins
    and counts as ``threshold_otsu(saturation[stained])``, without a float image.
    """
    if stained.sum() <= 16:
        return params.min_saturation
    counts = np.bincount(code[stained], minlength=65536)
    present = np.flatnonzero(counts)
    values = _saturation_table()[present]
    if values.max() <= values.min():
        return params.min_saturation
    hist, edges = np.histogram(values, bins=256, weights=counts[present])
    centres = (edges[:-1] + edges[1:]) / 2.0
    otsu = float(filters.threshold_otsu(hist=(hist, centres)))
    return max(params.min_saturation, otsu * 0.5)


def _close_cross(mask: np.ndarray) -> np.ndarray:
    """Binary closing by a 3 x 3 cross, the image edge extended (no erosion at the border):
    ``ndimage.binary_closing(np.pad(mask, 1, mode="edge"), disk(1))[1:-1, 1:-1]``."""
    p = np.pad(mask, 1, mode="edge")
    d = p.copy()
    d[1:] |= p[:-1]
    d[:-1] |= p[1:]
    d[:, 1:] |= p[:, :-1]
    d[:, :-1] |= p[:, 1:]
    return d[1:-1, 1:-1] & d[:-2, 1:-1] & d[2:, 1:-1] & d[1:-1, :-2] & d[1:-1, 2:]


def _dilate_sparse(mask: np.ndarray, radius: int) -> np.ndarray:
    """``ndimage.binary_dilation(mask, disk(radius))``, computed around the pixels set
    only; small disks by OR-ing shifted copies (what scipy does, without its overhead)."""
    out = np.zeros_like(mask)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return out
    y0, y1 = max(rows[0] - radius, 0), rows[-1] + radius + 1
    x0, x1 = max(cols[0] - radius, 0), cols[-1] + radius + 1
    part, disk = mask[y0:y1, x0:x1], morphology.disk(radius)
    if radius > 3:
        out[y0:y1, x0:x1] = ndimage.binary_dilation(part, disk)
        return out
    grown = out[y0:y1, x0:x1]
    h, w = part.shape
    for dy, dx in np.argwhere(disk) - radius:
        grown[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] |= part[
            max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
        ]
    return out


def glass_white(rgb: np.ndarray) -> np.ndarray | None:
    """The slide's glass colour: the median RGB of the pixels under Otsu's threshold on
    summed optical density, whatever its tint. ``None`` when under 2 % of the image is glass
    or what Otsu leaves is too dense to be glass (summed OD over ``MAX_GLASS_OD``: a
    thumbnail that is all tissue). float64[3]."""
    rgb = np.asarray(rgb, dtype=np.uint8)
    density = optical_density(rgb)
    if density.max() <= density.min():
        return None
    glass = rgb[density < filters.threshold_otsu(density)]
    if len(glass) < 0.02 * density.size:
        return None
    white = np.maximum(np.median(glass.reshape(-1, 3).astype(np.float64), axis=0), 1.0)
    return None if -np.log(white / 255.0).sum() > MAX_GLASS_OD else white


def neutral_glass(rgb: np.ndarray, params: TissueParams | None = None) -> np.ndarray:
    """``rgb`` colour-balanced (gains ``max(white) / white``) so that its glass is grey, when
    the glass itself would pass the tissue thresholds (optical density over ``min_od`` and
    saturation over ``min_saturation``: a tinted slide or mounting medium); unchanged
    otherwise, so slides whose glass the thresholds already reject keep their pixels."""
    params = params or TissueParams()
    rgb = np.asarray(rgb, dtype=np.uint8)
    white = glass_white(rgb)
    if white is None:
        return rgb
    density = -np.log(white / 255.0).sum()
    saturation = (white.max() - white.min()) / white.max()
    if density <= params.min_od or saturation <= params.min_saturation:
        return rgb
    balanced = rgb.astype(np.float32) * (white.max() / white).astype(np.float32)
    return np.clip(np.round(balanced), 0, 255).astype(np.uint8)


def tissue_mask(rgb: np.ndarray, mask_mpp: float, params: TissueParams | None = None) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail at ``mask_mpp`` µm/px.

    Glass tinted enough to pass the thresholds below (scanner white balance, a coloured slide
    or mounting medium) is first made grey (:func:`neutral_glass`). Tissue: optical density
    above ``min_od`` and HSV saturation above half of Otsu's threshold on the stained pixels
    (saturation from the channels' max and min, no HSV image), minus pen ink and a margin,
    small holes filled and specks dropped.
    """
    params = params or TissueParams()
    rgb = neutral_glass(rgb, params) if params.balance_glass else np.asarray(rgb, np.uint8)
    r, g, b, top, low = _channels(rgb)
    stained = optical_density(rgb) > params.min_od
    code = (top.astype(np.uint16) << 8) | low
    above = _saturation_table() > _saturation_threshold(code, stained, params)
    mask = stained & above[code]
    ink = np.zeros_like(mask)
    if params.reject_ink:
        ink = _ink(r, g, b, top, low)
        ink = _dilate_sparse(ink, max(1, round(params.ink_dilate_um / mask_mpp)))
        mask &= ~ink
    mask = _close_cross(mask)
    mask = morphology.remove_small_holes(mask, max_size=_area_px(params.max_hole_mm2, mask_mpp))
    mask &= ~ink  # filling holes must not bring ink back
    mask = morphology.remove_small_objects(mask, max_size=_area_px(params.min_object_mm2, mask_mpp))
    return mask


def tissue_fraction(
    mask: np.ndarray, scale: float, xy_l0: np.ndarray, tile_l0: float
) -> np.ndarray:
    """Fraction of each tile's area that is tissue; parts outside the mask count as glass.

    ``scale`` maps level-0 pixels to mask pixels (mask_px = l0_px * scale). Uses an integral
    image, so the cost is O(N) whatever the tile size.
    """
    inside, side = tile_box_counts(mask, scale, xy_l0, tile_l0)
    return (inside / float(side * side)).astype(np.float32)

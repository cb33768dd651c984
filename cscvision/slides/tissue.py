"""Tissue detection on a low-resolution thumbnail: pure functions on RGB arrays.

Tissue is stained (saturated, optically dense) and H&E-coloured; glass is bright and grey;
pen ink is green, teal, blue or black. The mask is computed at ``mask_mpp`` µm/px
(default 8, about 1/16 of a 20x slide), never from level 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage import color, filters, morphology

from cscvision.core.geometry import tile_box_counts

DEFAULT_MASK_MPP = 8.0


@dataclass(frozen=True)
class TissueParams:
    """Thresholds for :func:`tissue_mask`; areas in mm² so they hold at any mask resolution."""

    min_saturation: float = 0.07  # floor under Otsu's threshold, for near-empty slides
    min_od: float = 0.12  # summed optical density below which a pixel is glass
    min_object_mm2: float = 0.01  # specks smaller than this are dropped
    max_hole_mm2: float = 0.05  # holes smaller than this are filled
    reject_ink: bool = True
    ink_dilate_um: float = 16.0  # margin removed around pen ink


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Summed optical density per pixel (0 for white glass)."""
    rgb = np.clip(rgb.astype(np.float32), 1.0, 255.0)
    return -np.log(rgb / 255.0).sum(axis=-1)


def ink_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels of green, teal, blue or black pen ink.

    H&E pixels have green as their weakest channel (eosin pink, haematoxylin purple:
    red ≥ green); ink of green, teal and blue breaks that, and black ink is dark and grey.
    """
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    green_teal = (g > r + 12) & (np.maximum(g, b) > r + 25)
    blue = (b > r + 45) & (b > g + 25) & (g >= r - 10)  # haematoxylin has red > green
    black = (np.maximum(np.maximum(r, g), b) < 50) & (np.ptp(rgb, axis=-1) < 18)
    return green_teal | blue | black


def _area_px(mm2: float, mask_mpp: float) -> int:
    return max(1, round(mm2 * 1e6 / (mask_mpp * mask_mpp)))


def tissue_mask(rgb: np.ndarray, mask_mpp: float, params: TissueParams | None = None) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail at ``mask_mpp`` µm/px."""
    params = params or TissueParams()
    hsv = color.rgb2hsv(rgb)
    sat = hsv[..., 1]
    od = optical_density(rgb)
    stained = od > params.min_od
    if stained.sum() > 16 and np.ptp(sat[stained]) > 0:
        threshold = max(params.min_saturation, float(filters.threshold_otsu(sat[stained])) * 0.5)
    else:
        threshold = params.min_saturation
    mask = stained & (sat > threshold)
    ink = np.zeros_like(mask)
    if params.reject_ink:
        ink = ink_mask(rgb)
        radius = max(1, round(params.ink_dilate_um / mask_mpp))
        ink = ndimage.binary_dilation(ink, morphology.disk(radius)) if ink.any() else ink
        mask &= ~ink
    # Pad so that closing does not erode the border (scipy treats outside as background).
    mask = ndimage.binary_closing(np.pad(mask, 1, mode="edge"), morphology.disk(1))[1:-1, 1:-1]
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

"""The one definition of a target's region, shared by the summary, GeoJSON and overlay.

A map pixel is **scored** when a tile covered it (its blended probability is finite) and
some of it is tissue. A target's **region** is the scored map pixels whose probability is
at or above the target's threshold; its area is **tissue-weighted**: each pixel counts with
the fraction of it that is tissue. The niche is the pixels in both of the first two
targets' regions. Class names are plain ASCII (QuPath's class names are).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NICHE_PREFIX = "Niche"


def niche_name(targets: Sequence[str]) -> str:
    """QuPath class of the co-located region, e.g. ``Niche (stemness + immunosuppressive)``."""
    return f"{NICHE_PREFIX} ({' + '.join(targets)})"


def scored_pixels(maps: np.ndarray, tissue_map: np.ndarray) -> np.ndarray:
    """bool[rows, cols]: map pixels a tile scored that hold some tissue."""
    return np.isfinite(maps[0]) & (np.nan_to_num(tissue_map, nan=0.0) > 0)


def tissue_weights(maps: np.ndarray, tissue_map: np.ndarray) -> np.ndarray:
    """float64[rows, cols]: each scored pixel's tissue fraction, 0 elsewhere."""
    scored = scored_pixels(maps, tissue_map)
    return np.where(scored, np.nan_to_num(tissue_map, nan=0.0), 0.0).astype(np.float64)


def region_masks(
    maps: np.ndarray,
    tissue_map: np.ndarray,
    targets: Sequence[str],
    thresholds: Sequence[float],
) -> dict[str, np.ndarray]:
    """Each target's region, and the niche: the one definition every output uses.

    A map pixel is in a target's region when it was scored, holds tissue and its probability
    is at or above the target's threshold; the niche is where the first two targets' regions
    overlap.

    Parameters
    ----------
    maps
        Blended maps float[T, rows, cols], NaN where no tile was scored.
    tissue_map
        Tissue fraction of each map pixel, float[rows, cols].
    targets
        Target names, in map order.
    thresholds
        One threshold per target.

    Returns
    -------
    dict[str, numpy.ndarray]
        Target name → bool[rows, cols], plus the niche's mask under its class name.

    Examples
    --------
    >>> one = cscvision.read_outputs("results")["S01"]
    >>> maps = np.stack([one.maps[t] for t in one.targets])
    >>> masks = cscvision.region_masks(maps, one.tissue_map, one.targets, [0.5, 0.5])
    """
    scored = scored_pixels(maps, tissue_map)
    filled = np.nan_to_num(maps, nan=-np.inf)
    out = {
        name: scored & (filled[t] >= thr)
        for t, (name, thr) in enumerate(zip(targets, thresholds, strict=True))
    }
    if len(targets) >= 2:
        out[niche_name(targets[:2])] = out[targets[0]] & out[targets[1]]
    return out

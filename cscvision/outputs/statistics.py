"""Per-slide co-localisation statistics of two targets, each with a permutation null.

Inputs are one slide's stitched maps at map resolution: the two probability maps, the
tissue weight of every scored map pixel, and the two targets' regions (one definition:
:mod:`cscvision.outputs.regions`). Every figure is ``None`` when undefined (see
:func:`colocalisation` and the README's "Statistics" section). The null is
:mod:`cscvision.outputs.nulls`: rigid moves of the second target's map.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage

from cscvision.outputs.nulls import RigidNull, rigid_null, summarize_null

WITHIN_STEPS = 8  # distances are measured on a raster of at most radius / 8
MIN_WITHIN_STEPS = 4  # ... and never coarser than radius / 4 (the raster size cap)
MAX_WITHIN_PX = 16_000_000
HOTSPOT_ALPHA = 0.05  # Getis-Ord Gi* hot spots: FDR (Benjamini-Hochberg) at this level


# --- distances edge to edge --------------------------------------------------------------


def within_fraction(
    a: np.ndarray, b: np.ndarray, weight: np.ndarray, cell_um: float, within_um: float
) -> float | None:
    """Share of region ``a``'s tissue-weighted area within ``within_um`` of region ``b``.

    Distance runs from each part of ``a`` to the nearest edge of ``b``'s pixels (inside ``b``
    is distance 0), measured on a raster of ``cell_um / sub`` ≤ ``within_um / 8``, each raster
    cell counted at its centre.

    Parameters
    ----------
    a, b
        The two regions, bool[h, w].
    weight
        Tissue weight of each map pixel.
    cell_um
        Side of a map pixel in µm.
    within_um
        The radius in µm; 0 gives the share of ``a`` inside ``b``.

    Returns
    -------
    float or None
        The share in [0, 1]; None when ``a`` or ``b`` is empty.

    Examples
    --------
    >>> cscvision.within_fraction(masks["stemness"], masks["immunosuppressive"],
    ...     one.tissue_map, cell_um=16.0, within_um=100.0)
    """
    total = float((weight * a).sum())
    if not b.any() or total <= 0:
        return None
    pad = math.ceil(within_um / cell_um) + 1
    window = _bounding_window(a | b, pad)
    a, b, weight = a[window], b[window], weight[window]
    sub = _subdivision(cell_um, within_um, a.size)
    step_um = cell_um / sub
    fine_b = np.kron(b, np.ones((sub, sub), bool))
    _, (iy, ix) = ndimage.distance_transform_edt(~fine_b, return_indices=True)
    rows, cols = np.indices(fine_b.shape)
    gap_y = np.maximum(np.abs(rows - iy) - 0.5, 0)
    gap_x = np.maximum(np.abs(cols - ix) - 0.5, 0)
    near = step_um * np.hypot(gap_y, gap_x) <= within_um
    near_share = near.reshape(a.shape[0], sub, a.shape[1], sub).mean(axis=(1, 3))
    return float((weight * a * near_share).sum() / total)


def _subdivision(cell_um: float, within_um: float, n_cells: int) -> int:
    if within_um <= 0:
        return 1  # only overlap is within 0 µm: no raster needed
    sub = math.ceil(WITHIN_STEPS * cell_um / within_um)
    cap = max(1, math.isqrt(MAX_WITHIN_PX // max(1, n_cells)))
    floor = math.ceil(MIN_WITHIN_STEPS * cell_um / within_um)
    if cap < floor:
        raise ValueError(
            f"--within-um {within_um:g} is too small for {cell_um:g} µm map pixels on this "
            "slide (the distance raster would not fit in memory); use a larger radius"
        )
    return max(1, min(sub, cap))


def _bounding_window(mask: np.ndarray, pad: int) -> tuple[slice, slice]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    h, w = mask.shape
    return (
        slice(max(0, rows[0] - pad), min(h, rows[-1] + 1 + pad)),
        slice(max(0, cols[0] - pad), min(w, cols[-1] + 1 + pad)),
    )


# --- statistics on stacks: x fixed [h, w], y moved [p, h, w] ---------------------------------


def gap_kernel(cell_um: float, within_um: float) -> np.ndarray:
    """1 for map-pixel offsets whose squares are at most ``within_um`` apart edge to edge
    (so touching pixels, and the pixel itself, are always in)."""
    k = int(within_um // cell_um) + 1
    gap = np.maximum(np.abs(np.arange(-k, k + 1)) - 1, 0)
    return (cell_um * np.hypot(gap[:, None], gap[None, :]) <= within_um).astype(np.float64)


def colocation_quotient(
    a: np.ndarray, b: np.ndarray, weight: np.ndarray, kernel: np.ndarray
) -> np.ndarray:
    """Area colocation quotient of ``a`` → ``b`` (tissue-weighted region masks; ``b``
    stacked [p, h, w]): the share of ``b`` in the tissue within the radius of ``a``,
    over the share of ``b`` in all tissue. 1 = independent, > 1 attraction, 0 = none
    near. NaN where ``a`` or ``b`` is empty."""
    near_b, near_w = _kernel_sum(b, kernel), _kernel_sum(weight[None], kernel)[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        local = (a * near_b).sum((1, 2)) / (a * near_w).sum()
        return local / (b.sum((1, 2)) / weight.sum())


def _kernel_sum(stack: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Sum of ``stack`` [p, h, w] over the 0/1 ``kernel`` centred on each pixel."""
    k = kernel.shape[0] // 2
    h, w = stack.shape[1:]
    padded = np.pad(stack, [(0, 0), (k, k), (k, k)])
    out = np.zeros(stack.shape, np.float64)
    for dy, dx in zip(*np.nonzero(kernel), strict=True):
        out += padded[:, dy : dy + h, dx : dx + w]
    return out


def morisita_horn(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Morisita–Horn overlap of the tissue-weighted region masks ``a`` and each ``b``
    [p, h, w]: 1 = same regions, 0 = disjoint; NaN where either is empty."""
    sa, sb = a.sum(), b.sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        pa, pb = a / sa, b / sb[:, None, None]
        return 2 * (pa * pb).sum((1, 2)) / ((pa * pa).sum() + (pb * pb).sum((1, 2)))


def _window_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over each pixel's 3 × 3 neighbourhood (itself included) of ``values`` where
    ``mask``: the row-standardised queen weights with self, applied to a stack."""
    pad = [(0, 0), (1, 1), (1, 1)]
    v, m = np.pad(values * mask, pad), np.pad(mask.astype(np.float64), pad)
    h, w = values.shape[1:]
    total = sum(v[:, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))
    count = sum(m[:, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mask, total / count, 0.0)


def lee_l(x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Lee's L (Lee 2001; esda's ``Spatial_Pearson`` with row-standardised queen weights
    plus self) of ``x`` and each ``y`` [p, h, w] over each ``mask`` [p, h, w]: the
    correlation of the two maps after local averaging, in [-1, 1]. NaN where either map
    is constant or fewer than 3 pixels remain."""
    n = mask.sum((1, 2))
    zx, zy = _standardise(np.broadcast_to(x, y.shape), mask), _standardise(y, mask)
    sx, sy = _window_mean(zx, mask), _window_mean(zy, mask)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (sx * sy * mask).sum((1, 2)) / n
    return np.where(n >= 3, out, np.nan)


def _standardise(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    n = mask.sum((1, 2), keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (values * mask).sum((1, 2), keepdims=True) / n
        sd = np.sqrt((((values - mean) * mask) ** 2).sum((1, 2), keepdims=True) / n)
        return np.where(mask, (values - mean) / np.where(sd > 1e-12, sd, np.nan), 0.0)


def jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a ∩ b| / |a ∪ b| for ``a`` [h, w] and each ``b`` [p, h, w]; NaN where both empty."""
    union = (a | b).sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, (a & b).sum((1, 2)) / union, np.nan)


# --- hot spots (esda) ----------------------------------------------------------------------


def lattice_adjacency(mask: np.ndarray):
    """Sparse queen contiguity with self-loops between the ``True`` pixels of ``mask``
    (row-major order): the 3 × 3 neighbourhood of every pixel, itself included."""
    import libpysal
    from scipy import sparse

    h, w = mask.shape
    adjacency = libpysal.weights.lat2SW(h, w, criterion="queen").tocsr()
    index = np.flatnonzero(mask.ravel())
    return (adjacency[index][:, index] + sparse.eye(len(index), format="csr")).tocsr()


def hotspots(values: np.ndarray, mask: np.ndarray, adjacency=None) -> np.ndarray:
    """Getis–Ord Gi* hot spots of ``values`` over ``mask`` (esda ``G_Local``, binary queen
    weights with self, analytical z): pixels with z > 0 whose two-sided p passes
    Benjamini–Hochberg FDR at ``HOTSPOT_ALPHA``. bool[h, w]."""
    import libpysal
    from esda import G_Local
    from statsmodels.stats.multitest import multipletests

    out = np.zeros(mask.shape, bool)
    y = values[mask].astype(np.float64)
    if len(y) < 3 or np.ptp(y) <= 0:
        return out
    adjacency = lattice_adjacency(mask) if adjacency is None else adjacency
    weights = libpysal.weights.WSP(adjacency).to_W(silence_warnings=True)
    with np.errstate(invalid="ignore", divide="ignore"):  # a constant neighbourhood: z = 0
        gi = G_Local(y, weights, transform="B", star=None, permutations=0)
    z = np.nan_to_num(np.asarray(gi.Zs, np.float64))
    p_two_sided = np.minimum(1.0, 2 * gi.p_norm)
    reject = multipletests(p_two_sided, alpha=HOTSPOT_ALPHA, method="fdr_bh")[0]
    out[mask] = reject & (z > 0)
    return out


def _box3(stack: np.ndarray) -> np.ndarray:
    """The 3 × 3 neighbourhood sum of each pixel of stacked maps [p, h, w] (zero outside)."""
    padded = np.pad(stack, ((0, 0), (1, 1), (1, 1)))
    rows = padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]
    return rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:]


def gi_star_z(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Getis–Ord Gi* z of stacked maps [p, h, w], each over its own ``mask``: binary queen
    weights with self and analytical moments, as esda's ``G_Local(star=True)`` computes them
    (``hotspots`` runs esda itself; a test holds the two equal). 0 outside the mask and
    where a neighbourhood covers the whole mask."""
    mask = mask.astype(bool)
    y = np.where(mask, values, 0.0).astype(np.float64)
    n = mask.sum((1, 2), keepdims=True).astype(np.float64)
    y_sum = y.sum((1, 2), keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = y_sum / n
        variance = (y**2).sum((1, 2), keepdims=True) / n - mean**2
        cardinality = _box3(mask.astype(np.float64))
        expected = cardinality / n
        var_g = cardinality * (n - cardinality) / (n - 1) / n**2 * variance / mean**2
        z = (_box3(y) / y_sum - expected) / np.sqrt(var_g)
    return np.where(mask, np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0), 0.0)


def hotspots_stack(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """:func:`hotspots` of stacked maps [p, h, w] over their own masks, vectorised (the
    permutation null recomputes Gi* on every moved map). bool[p, h, w]."""
    from scipy.stats import norm

    mask = mask.astype(bool)
    z = gi_star_z(values, mask)
    p_two = np.where(mask, np.minimum(1.0, 2 * norm.sf(np.abs(z))), np.inf)
    flat = p_two.reshape(len(p_two), -1)
    n = mask.reshape(len(mask), -1).sum(1)
    ordered = np.sort(flat, axis=1)
    rank = np.arange(1, flat.shape[1] + 1)[None, :]
    passes = ordered <= HOTSPOT_ALPHA * rank / np.maximum(n, 1)[:, None]  # Benjamini-Hochberg
    k = np.where(passes.any(1), flat.shape[1] - np.argmax(passes[:, ::-1], axis=1), 0)
    threshold = np.where(k > 0, ordered[np.arange(len(flat)), np.maximum(k - 1, 0)], -1.0)
    reject = flat <= threshold[:, None]
    top = np.where(mask, values, -np.inf).reshape(len(flat), -1).max(1)
    low = np.where(mask, values, np.inf).reshape(len(flat), -1).min(1)
    varies = (n >= 3) & (top > low)  # as hotspots(): fewer than 3 pixels or no variation
    return (reject & varies[:, None]).reshape(mask.shape) & (z > 0) & mask


def lee_l_esda(x: np.ndarray, y: np.ndarray, mask: np.ndarray, adjacency=None) -> float | None:
    """Lee's L of two maps over ``mask`` by esda (the observed value; :func:`lee_l`
    computes the same on permutation stacks)."""
    from esda.lee import Spatial_Pearson
    from scipy import sparse

    xs, ys = x[mask].astype(np.float64), y[mask].astype(np.float64)
    if len(xs) < 3 or np.ptp(xs) <= 0 or np.ptp(ys) <= 0:
        return None
    adjacency = lattice_adjacency(mask) if adjacency is None else adjacency
    connectivity = sparse.diags(1.0 / np.asarray(adjacency.sum(1)).ravel()) @ adjacency
    fit = Spatial_Pearson(connectivity=connectivity, permutations=0).fit(xs[:, None], ys[:, None])
    return float(fit.association_[0, 1])


# --- one slide ---------------------------------------------------------------------------


def colocalisation(
    maps: np.ndarray,
    weight: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    *,
    cell_um: float,
    within_um: float,
    permutations: int,
    seed: int,
) -> dict[str, Any]:
    """Every co-localisation figure of two targets of one slide, each with its null.

    The colocation quotient, Lee's L, the hot-spot Jaccard and Morisita–Horn, each as
    ``observed``, ``null_mean``, ``null_sd``, ``z`` and ``p``; the null moves target 1's map,
    regions and hot spots rigidly (toroidal shifts and symmetries), keeping each map's own
    spatial structure.

    Parameters
    ----------
    maps
        The two targets' maps, float[2, h, w], NaN where unscored.
    weight
        Tissue weight of each scored pixel.
    a, b
        The two regions, bool[h, w] (``region_masks``).
    cell_um
        Side of a map pixel in µm.
    within_um
        Radius of the within-distance share and the colocation quotient.
    permutations
        Rigid moves in the null; 0 reports the figures without p-values.
    seed
        Seed of the null (the CLI uses a CRC32 of the slide id).

    Returns
    -------
    dict
        Figure name → its observed value and null; ``None`` where a figure is undefined.

    Raises
    ------
    ValueError
        ``maps`` is not float[2, h, w] or the masks' shapes differ from it.

    Examples
    --------
    >>> figures = cscvision.colocalisation(maps, weight, masks["stemness"],
    ...     masks["immunosuppressive"], cell_um=16.0, within_um=100.0, permutations=199, seed=0)
    >>> figures["colocation_quotient"]["p"]
    """
    scored = weight > 0
    null = rigid_null(scored, permutations, seed)
    crop = null.crop
    x, y = (np.where(scored, np.nan_to_num(m), 0.0)[null.window] for m in maps)
    s, w = crop(scored), crop(weight)
    wa, wb = w * crop(a), w * crop(b)
    adjacency = lattice_adjacency(s) if s.sum() >= 3 else None
    hot_x, hot_y = hotspots(x, s, adjacency), hotspots(y, s, adjacency)
    kernel = gap_kernel(cell_um, within_um)
    observed = {
        "colocation_quotient": _first(colocation_quotient(wa, wb[None], w, kernel)),
        "lee_l": lee_l_esda(x, y, s, adjacency),
        "hotspot_jaccard": _first(jaccard(hot_x, hot_y[None])),
        "morisita_horn": _first(morisita_horn(wa, wb[None])),
    }
    nulls = _null_values(null, x, y, s, w, wa, crop(b), hot_x, kernel)
    out: dict[str, Any] = {k: summarize_null(v, nulls[k]) for k, v in observed.items()}
    out["hotspot_fraction"] = [_share(h, s) for h in (hot_x, hot_y)]
    return out


def _null_values(null: RigidNull, x, y, s, w, wa, b, hot_x, kernel) -> dict:
    parts: dict[str, list[np.ndarray]] = {
        k: [] for k in ("colocation_quotient", "lee_l", "hotspot_jaccard", "morisita_horn")
    }
    moves = zip(null.moved(y), null.moved(s), null.moved(b), strict=True)
    for y_p, s_p, b_p in moves:
        wb_p = w * b_p
        both = s[None] & s_p
        parts["colocation_quotient"].append(colocation_quotient(wa, wb_p, w, kernel))
        parts["lee_l"].append(lee_l(x, y_p, both))
        # Gi* recomputed on each moved map over the pixels it lands on (the moved hot-spot
        # set of the observed map is not the same: edges and holes change neighbourhoods)
        parts["hotspot_jaccard"].append(jaccard(hot_x, hotspots_stack(y_p, both)))
        parts["morisita_horn"].append(morisita_horn(wa, wb_p))
    return {k: np.concatenate(v) if v else np.empty(0) for k, v in parts.items()}


def _first(values: np.ndarray) -> float | None:
    value = float(values[0])
    return value if np.isfinite(value) else None


def _share(mask: np.ndarray, of: np.ndarray) -> float | None:
    total = int(of.sum())
    return float((mask & of).sum() / total) if total else None

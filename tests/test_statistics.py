"""Co-localisation statistics: hand-computed answers, the null, and p-values under H0.

Each known answer is one a plausible mistake would break (centre-to-centre distances,
cosine similarity for Morisita-Horn, a pixel-shuffling null, ...).
"""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from scipy import ndimage, stats
from shapely.geometry import box

from cscvision.outputs.nulls import rigid_null, summarize_null
from cscvision.outputs.statistics import (
    colocalisation,
    colocation_quotient,
    gap_kernel,
    hotspots,
    jaccard,
    lee_l,
    lee_l_esda,
    morisita_horn,
    within_fraction,
)

STATS = ("colocation_quotient", "lee_l", "hotspot_jaccard", "morisita_horn")


# --- within a radius, edge to edge -------------------------------------------------------


def test_within_at_production_geometry_is_edge_to_edge():
    """112 µm map pixels (224 px tiles at 0.5 µm/px), 100 µm: a 3-pixel-wide stemness strip
    beside an immunosuppressive strip. By hand: the first column lies 0–112 µm from the
    other region's edge, so 100/112 of it is within; the others lie beyond 112 µm. Share =
    (100/112)/3 = 0.2976. Centre to centre (the old figure) gave 0, the niche share."""
    a, b = np.zeros((5, 6), bool), np.zeros((5, 6), bool)
    b[:, 0:2], a[:, 2:5] = True, True
    share = within_fraction(a, b, np.ones(a.shape), cell_um=112, within_um=100)
    assert share == pytest.approx(100 / 112 / 3, abs=0.005)
    assert share == pytest.approx(8 / 27)  # raster of 112/9 µm counted at cell centres
    assert within_fraction(b, a, np.ones(a.shape), 112, 100) == pytest.approx(
        100 / 112 / 2, abs=0.01
    )


def test_within_counts_overlap_and_is_undefined_without_regions():
    a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    a[1:3, 1:3] = True
    b[0:4, 0:4] = True
    weight = np.ones(a.shape)
    assert within_fraction(a, b, weight, 112, 0) == 1.0
    assert within_fraction(a, b, weight, 112, 100) == 1.0
    assert within_fraction(a, np.zeros_like(b), weight, 112, 100) is None
    assert within_fraction(np.zeros_like(a), b, weight, 112, 100) is None


def _square(row: int, col: int, cell: float):
    return box(col * cell, row * cell, (col + 1) * cell, (row + 1) * cell)


@pytest.mark.parametrize("seed", range(3))
def test_within_matches_exact_geometry(seed):
    """Against shapely: area of a's pixels inside the 100 µm buffer of b's pixel squares,
    tissue-weighted (the independent, exact answer)."""
    rng = np.random.default_rng(seed)
    a, b = (ndimage.gaussian_filter(rng.normal(size=(20, 20)), 2) for _ in range(2))
    a, b = a > 0.5 * a.std(), b > 0.5 * b.std()
    weight = rng.uniform(0.3, 1.0, a.shape)
    cell = 56.0
    zone = shapely.union_all([_square(r, c, cell) for r, c in zip(*np.nonzero(b), strict=True)])
    zone = zone.buffer(100, quad_segs=64)
    near = sum(
        weight[r, c] * _square(r, c, cell).intersection(zone).area / cell**2
        for r, c in zip(*np.nonzero(a), strict=True)
    )
    exact = near / (weight * a).sum()
    assert within_fraction(a, b, weight, cell, 100) == pytest.approx(exact, abs=0.01)


# --- each statistic on hand-made maps ----------------------------------------------------


def test_colocation_quotient_by_hand():
    """1 × 4 row, 112 µm pixels, 100 µm: within = the pixel and its neighbours. a at 0, b at
    1: tissue near a is pixels 0-1, half of it b; b is 1/4 of all tissue: CLQ = 0.5/0.25."""
    w = np.ones((1, 4))
    a, b = np.array([[1.0, 0, 0, 0]]), np.array([[0, 1.0, 0, 0]])
    kernel = gap_kernel(112, 100)
    assert kernel.shape == (3, 3) and kernel.all()
    assert colocation_quotient(a, b[None], w, kernel)[0] == pytest.approx(2.0)
    far = np.array([[0, 0, 0, 1.0]])
    assert colocation_quotient(a, far[None], w, kernel)[0] == 0.0


def test_morisita_horn_by_hand_is_not_cosine():
    """p = (1, 0, 0, 0), q = (¼, ¼, ¼, ¼): MH = 2·¼ / (1 + ¼) = 0.4; cosine would be 0.5."""
    a, b = np.array([[1.0, 0, 0, 0]]), np.ones((1, 4))
    assert morisita_horn(a, b[None])[0] == pytest.approx(0.4)
    assert morisita_horn(a, a[None])[0] == pytest.approx(1.0)
    assert morisita_horn(a, np.array([[[0, 0, 1.0, 1]]]))[0] == 0.0
    assert np.isnan(morisita_horn(a, np.zeros((1, 1, 4)))[0])


def test_lee_l_by_hand_and_as_esda():
    """x = (0, 0, 1, 1) on a row: z = (-1, -1, 1, 1); local means over each pixel and its
    neighbours (-1, -1/3, 1/3, 1); L(x, x) = mean of their squares = 5/9, L(x, -x) = -5/9."""
    x = np.array([[0.0, 0, 1, 1]])
    mask = np.ones(x.shape, bool)
    assert lee_l(x, x[None], mask[None])[0] == pytest.approx(5 / 9)
    assert lee_l(x, -x[None], mask[None])[0] == pytest.approx(-5 / 9)
    assert lee_l_esda(x, x, mask) == pytest.approx(5 / 9)
    rng = np.random.default_rng(0)
    u, v = rng.random((9, 11)), rng.random((9, 11))
    m = rng.random((9, 11)) > 0.2
    assert lee_l(u, v[None], m[None])[0] == pytest.approx(lee_l_esda(u, v, m))
    assert lee_l_esda(u, np.zeros_like(v), m) is None  # constant map: undefined


def test_hotspots_find_the_bright_patch_with_fdr():
    rng = np.random.default_rng(1)
    values = rng.normal(0.3, 0.02, (30, 30))
    values[5:11, 5:11] = 0.9
    mask = np.ones(values.shape, bool)
    hot = hotspots(values, mask)
    assert hot[6:10, 6:10].all() and hot.sum() < 100
    assert not hotspots(np.full((30, 30), 0.5), mask).any()  # no variation: none
    assert jaccard(hot, hot[None])[0] == 1.0
    assert jaccard(hot, np.zeros((1, 30, 30), bool))[0] == 0.0


def _map_with_holes_and_edges(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth map with two hot patches over tissue with a hole, a ragged edge and a notch."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    values = ndi.gaussian_filter(rng.random((28, 34)), 2.0)
    values[4:10, 6:12] += 0.3
    values[18:24, 22:30] += 0.25
    mask = np.ones(values.shape, bool)
    mask[11:16, 14:20] = False  # a hole
    mask[:, :3] = rng.random((28, 3)) > 0.5  # a ragged edge
    mask[20:, :8] = False  # a notch
    return values, mask


def test_vectorised_gi_star_equals_esda_per_map_on_holes_and_edges():
    """The null's Gi* (hotspots_stack) against esda's G_Local, map by map: z within 1e-9 and
    the same hot-spot pixels, on maps whose domains have holes and edges."""
    import libpysal
    from esda import G_Local

    from cscvision.outputs.statistics import gi_star_z, hotspots_stack, lattice_adjacency

    values, mask = _map_with_holes_and_edges(0)
    null = rigid_null(mask, 12, seed=4)
    ys = next(null.moved(null.crop(values)))
    ms = next(null.moved(null.crop(mask))) & null.crop(mask)[None]
    z_stack, hot_stack = gi_star_z(ys, ms), hotspots_stack(ys, ms)
    for y, m, z, hot in zip(ys, ms, z_stack, hot_stack, strict=True):
        weights = libpysal.weights.WSP(lattice_adjacency(m)).to_W(silence_warnings=True)
        gi = G_Local(y[m], weights, transform="B", star=None, permutations=0)
        np.testing.assert_allclose(z[m], np.nan_to_num(gi.Zs), atol=1e-9)
        np.testing.assert_array_equal(hot, hotspots(y, m))
    assert hot_stack.any() and not hot_stack.all()
    flat = np.full((1, *mask.shape), 0.4)
    assert not hotspots_stack(flat, mask[None]).any()  # no variation: none, as hotspots()


def test_the_hotspot_null_recomputes_gi_star_on_every_move():
    """Each null value is the Jaccard index of the observed hot spots of target 0 and the
    hot spots that esda finds on the moved map of target 1 over the pixels it lands on;
    moving the observed hot-spot set instead (the old shortcut) gives other values here."""
    from cscvision.outputs.statistics import _null_values, gap_kernel

    x, s = _map_with_holes_and_edges(1)
    y, _ = _map_with_holes_and_edges(2)
    null = rigid_null(s, 16, seed=9)
    x, y, s = (null.crop(a) for a in (x, y, s))
    w = s.astype(float)
    hot_x, hot_y = hotspots(x, s), hotspots(y, s)
    kernel = gap_kernel(1.0, 2.0)
    nulls = _null_values(null, x, y, s, w, w * 0, w * 0, hot_x, kernel)["hotspot_jaccard"]
    ys, ss, hs = (next(null.moved(a)) for a in (y, s, hot_y))
    reference = [
        jaccard(hot_x, hotspots(y_p, s & s_p)[None])[0] for y_p, s_p in zip(ys, ss, strict=True)
    ]
    shortcut = jaccard(hot_x, hs & s[None])
    np.testing.assert_allclose(nulls, reference, atol=1e-12)
    assert not np.allclose(np.nan_to_num(shortcut), np.nan_to_num(reference))


# --- the null ----------------------------------------------------------------------------


def test_rigid_null_moves_whole_maps_and_is_seeded():
    mask = np.zeros((10, 14), bool)
    mask[2:8, 3:12] = True
    null = rigid_null(mask, 50, seed=3)
    assert null.window == (slice(2, 8), slice(3, 12))
    assert not ((null.symmetry == 0) & (null.shift == 0).all(1)).any()  # never the identity
    np.testing.assert_array_equal(rigid_null(mask, 50, seed=3).shift, null.shift)
    image = np.arange(54.0).reshape(6, 9)
    moved = np.concatenate(list(null.moved(image)))
    assert moved.shape == (50, 6, 9)
    assert all(sorted(m.ravel()) == sorted(image.ravel()) for m in moved)  # same values
    # a rigid move keeps neighbours neighbours (a pixel shuffle would not)
    steps = {abs(m[0, 1] - m[0, 0]) % 9 for m in moved} | {abs(m[1, 0] - m[0, 0]) for m in moved}
    assert steps <= {1, 8, 9, 45}


def test_summarize_null_counts_ties_and_handles_undefined():
    null = np.array([0.0, 1.0, 2.0, 3.0, np.nan])
    out = summarize_null(2.0, null)
    assert out["p"] == pytest.approx((1 + 2) / (1 + 4))
    assert out["null_mean"] == 1.5 and out["z"] == pytest.approx(0.5 / np.std(null[:4], ddof=1))
    assert summarize_null(None, null)["p"] is None


def _smooth_maps(seed: int, n: int = 24, tissue_cut: float = -0.1):
    """Two independent smooth probability fields inside one irregular tissue mask."""
    rng = np.random.default_rng(seed)
    big = n + 16
    tissue = ndimage.gaussian_filter(rng.normal(size=(big, big)), 5)[8:-8, 8:-8] > tissue_cut
    fields = []
    for _ in range(2):
        f = ndimage.gaussian_filter(rng.normal(size=(big, big)), 2.5)[8:-8, 8:-8]
        fields.append(np.where(tissue, 1 / (1 + np.exp(-2 * (f - f.mean()) / f.std())), np.nan))
    return np.stack(fields), tissue.astype(np.float64)


def _figures(maps, weight, y=None, permutations=49, seed=0):
    if y is not None:
        maps = np.stack([maps[0], y])
    filled = np.nan_to_num(maps, nan=0.0)
    a, b = (weight > 0) & (filled[0] >= 0.6), (weight > 0) & (filled[1] >= 0.6)
    return colocalisation(maps, weight, a, b, cell_um=112, within_um=100,
                          permutations=permutations, seed=seed)  # fmt: skip


def test_independent_maps_give_uniform_p_values():
    """200 seeds of two independent smooth fields in an irregular tissue mask: each
    figure's p-values are consistent with uniform (Kolmogorov–Smirnov at α = 0.01)."""
    p = {k: [] for k in STATS}
    for seed in range(200):
        figures = _figures(*_smooth_maps(seed), seed=seed)
        for k in STATS:
            if figures[k]["p"] is not None:
                p[k].append(figures[k]["p"])
    for k, values in p.items():
        assert len(values) >= 190, k
        assert stats.kstest(values, "uniform").pvalue > 0.01, k


def test_identical_maps_are_colocalised_and_disjoint_maps_are_not():
    maps, weight = _smooth_maps(7, n=32)
    same = _figures(maps, weight, y=maps[0], permutations=99)
    assert same["morisita_horn"]["observed"] == pytest.approx(1.0)
    assert same["hotspot_jaccard"]["observed"] == pytest.approx(1.0)
    assert same["colocation_quotient"]["observed"] > 1.5
    assert same["lee_l"]["observed"] > 0.8
    for k in STATS:
        assert same[k]["p"] <= 0.05 and same[k]["z"] > 2, k
    left = np.where(np.arange(32)[None, :] < 16, 0.9, 0.1) * np.ones((32, 1))
    split = np.stack([left, left[:, ::-1]]).astype(np.float32)
    apart = _figures(split, np.ones((32, 32)), permutations=99)
    assert apart["morisita_horn"]["observed"] == 0.0
    assert apart["hotspot_jaccard"]["observed"] == 0.0
    assert apart["lee_l"]["observed"] < -0.8
    assert apart["colocation_quotient"]["observed"] < 0.1

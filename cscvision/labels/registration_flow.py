"""Non-rigid refinement and the held-out error of a registration, at its finest level.

**Held-out error.** The finest level's last dense matches, made against the moving image
under the full transform, are split into 5 folds by blocks of the slide (2 x
``flow_smooth_um`` squares); each fold is predicted by the transform fitted on the other
four (the affine by least squares, the field in the rounds of :data:`ROUND_SMOOTHING`,
as :func:`match_field` builds the real one). Their residuals are
the transform's error plus the matches' own scatter, which is taken out in quadrature
(:func:`less_scatter`): median, 90th percentile and per region of the slide, so a fold or
a bubble shows up where it is.

**Non-rigid field.** :func:`match_field`: template matches
(:mod:`cscvision.labels.registration_match`) against the moving image under the transform
so far, two rounds at twice the finest µm/px (``--fine-um``, 2) with a wide search, then
three at the finest;
each round adds what its consistent matches (:func:`consistent`: folds, bubbles, torn
edges dropped) still say, smoothed by a normalised Gaussian convolution over
``flow_smooth_um`` (160 µm), which falls back to a four times wider smoothing and then to
nothing where matches are sparse. The smoothing is fixed: chosen by held-out matches
(:func:`choose_smoothing`, still available) it picked the narrowest candidate where the
generator's truth favoured 160 µm, as the matches of two serial sections disagree with the
true warp in ~100 µm patches that held-out blocks do not break.
Matches were chosen over TV-L1 optical flow (``skimage.registration.optical_flow_tvl1``),
which on these stain-independent images correlated at -0.14 / 0.32 (x / y) with the
displacement the truth needed, and made the true error worse.

The grid (``Registration.flow_um``): ``flow_um[k, r, c]`` is component ``k`` (0 = x, 1 = y)
of a displacement in moving (IHC) level-0 µm, added to the affine's output, at the fixed
(H&E) level-0 point (c * step_um, r * step_um) µm; bilinear between nodes, nearest-node
beyond the last row or column.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MIN_MATCHES = 30  # held-out matches needed for the estimate
# candidate smoothings of the field, times ``flow_smooth_um``: the one with the lowest
# held-out error on the first round's matches is used (matches between serial sections are
# noisy, ~4 µm sd per axis, and a smooth warp is best followed with a wide smoothing)
SMOOTH_FACTORS = (1.0, 2.0, 4.0, 8.0)
# how far (µm) a patch is searched for around where the transform so far puts it: wide on
# the first round (the affine leaves up to ~40 µm under a 20-40 µm sd warp), then narrow
SEARCH_UM = (48.0, 24.0, 16.0)  # per round at the finest level (the first skipped after coarse)
COARSE_SEARCH_UM = (100.0, 40.0)  # the two rounds at twice the finest µm/px: a 3x warp
# the held-out field is fitted in rounds as match_field's (two at twice the smoothing, then
# three at it), each on what the previous left: one pass smoothed a 15-30 µm affine residual
# into a field that missed its curvature, and the estimate read 1.4-3x the true error
ROUND_SMOOTHING = (2.0, 2.0, 1.0, 1.0, 1.0)


def error_summary(src_um: np.ndarray, lengths: np.ndarray, shape, mpp: float,
                  regions: int = 4) -> dict:  # fmt: skip
    """Median and p90 of held-out residual lengths (µm), and per region of a regions x
    regions split of the finest image (fixed µm bounds) its count and median."""
    ok = np.isfinite(lengths)
    out = {
        "median": round(float(np.median(lengths[ok])), 2) if ok.any() else None,
        "p90": round(float(np.percentile(lengths[ok], 90)), 2) if ok.any() else None,
        "measured": int(ok.sum()),
        "method": "5-fold spatially blocked held-out matches after the full transform",
    }
    h, w = shape
    cw, rh = w / regions * mpp, h / regions * mpp
    per = []
    for r in range(regions):
        for c in range(regions):
            inside = ok & (src_um[:, 0] // cw == c) & (src_um[:, 1] // rh == r)
            if inside.sum() >= 3:
                per.append({
                    "x_um": [round(c * cw, 1), round((c + 1) * cw, 1)],
                    "y_um": [round(r * rh, 1), round((r + 1) * rh, 1)],
                    "matches": int(inside.sum()),
                    "median": round(float(np.median(lengths[inside])), 2),
                })  # fmt: skip
    out["regions"] = per
    return out


def blocked_folds(src_um: np.ndarray, block_um: float, folds: int = 5) -> np.ndarray:
    bx, by = (src_um // block_um).astype(int).T
    return (bx + 2 * by) % folds


def _field_from(src_um, resid_um, shape, f, smooth_um) -> np.ndarray:
    h, w = shape
    px = np.clip((src_um / f).astype(int), 0, [w - 1, h - 1])
    weight = np.zeros((h, w))
    total = np.zeros((2, h, w))
    np.add.at(weight, (px[:, 1], px[:, 0]), 1.0)
    for k in (0, 1):
        np.add.at(total[k], (px[:, 1], px[:, 0]), resid_um[:, k])
    stride = 16.0  # patch_matches tries a patch every 16 px: weight ~1 per px where dense
    return _smooth(total / np.maximum(weight, 1), weight * stride**2, smooth_um / f)


def _sample(field: np.ndarray, xy_um: np.ndarray, f: float) -> np.ndarray:
    g = [xy_um[:, 1] / f - 0.5, xy_um[:, 0] / f - 0.5]
    return np.stack([ndimage.map_coordinates(field[k], g, order=1, mode="nearest")
                     for k in (0, 1)], 1)  # fmt: skip


def held_out_lengths(src, dst, m, good, shape, f, smooth_um, nonrigid: bool,
                     block_um: float | None = None) -> np.ndarray:  # fmt: skip
    """Residual (µm) of each match predicted by the transform fitted without its fold
    (blocks of ``block_um``, default 2 x ``smooth_um``): the affine refitted by least
    squares, plus (``nonrigid``) a field fitted in the rounds of :data:`ROUND_SMOOTHING`."""
    from skimage import transform

    folds = blocked_folds(src, block_um or 2 * smooth_um)
    out = np.full(len(src), np.nan)
    for k in range(folds.max() + 1 if len(folds) else 0):
        test, train = folds == k, (folds != k) & good
        if train.sum() < 12 or not test.any():
            continue
        fit = transform.AffineTransform.from_estimate(src[train], dst[train])
        a = np.asarray(fit.params)
        pred = src[test] @ a[:2, :2].T + a[:2, 2]
        if nonrigid:
            fitted = src[train] @ a[:2, :2].T + a[:2, 2]
            for scale in ROUND_SMOOTHING:
                step = _field_from(src[train], dst[train] - fitted, shape, f, scale * smooth_um)
                fitted = fitted + _sample(step, src[train], f)
                pred = pred + _sample(step, src[test], f)
        out[test] = np.linalg.norm(pred - dst[test], axis=1)
    return out


def _block_means(a: np.ndarray, k: int) -> np.ndarray:
    h, w = a.shape[-2:]
    pad = [(0, 0)] * (a.ndim - 2) + [(0, -h % k), (0, -w % k)]
    p = np.pad(a, pad, mode="edge")
    return p.reshape(*p.shape[:-2], p.shape[-2] // k, k, p.shape[-1] // k, k).mean(axis=(-3, -1))


def _smooth(field: np.ndarray, weight: np.ndarray, sigma: float) -> np.ndarray:
    """Normalised convolution of ``field`` [2, h, w] with a fallback to 4x the scale, then
    to 0, where the local weight is small (``weight`` about 1 per pixel where matches are
    dense). For a wide ``sigma`` (px), done on block means of ~sigma / 4 px and the result
    interpolated back once (a full-resolution kernel hundreds of px wide takes minutes)."""
    k = int(sigma // 4)
    if k < 2:
        near, far = (ndimage.gaussian_filter(weight, s) for s in (sigma, 4 * sigma))
        fine = np.stack([ndimage.gaussian_filter(c * weight, sigma) for c in field])
        wide = np.stack([ndimage.gaussian_filter(c * weight, 4 * sigma) for c in field])
    else:
        wb, fb = _block_means(weight, k), _block_means(field * weight, k)
        near, far = (ndimage.gaussian_filter(wb, s / k) for s in (sigma, 4 * sigma))
        fine = np.stack([ndimage.gaussian_filter(c, sigma / k) for c in fb])
        wide = np.stack([ndimage.gaussian_filter(c, 4 * sigma / k) for c in fb])
    alpha = np.clip(near / 0.3, 0, 1)
    beta = np.clip(far / 0.05, 0, 1)
    out = alpha * fine / np.maximum(near, 1e-6) + (1 - alpha) * beta * wide / np.maximum(far, 1e-6)
    if k < 2:
        return out
    h, w = weight.shape
    rows, cols = np.mgrid[0:h, 0:w]
    g = [(rows + 0.5) / k - 0.5, (cols + 0.5) / k - 0.5]
    return np.stack([ndimage.map_coordinates(c, g, order=1, mode="nearest") for c in out])


def consistent(src_um: np.ndarray, resid_um: np.ndarray, radius_um: float) -> np.ndarray:
    """Matches whose residual agrees with the median of their neighbours' (within
    ``radius_um``) to within max(6 µm, 3 robust sd of all departures): a fold, a bubble or a
    torn edge gives matches that disagree with their surroundings, and they are dropped."""
    from scipy.spatial import cKDTree

    tree = cKDTree(src_um)
    departure = np.zeros(len(src_um))
    for i, nb in enumerate(tree.query_ball_point(src_um, radius_um)):
        nb = [j for j in nb if j != i]
        if len(nb) >= 3:
            departure[i] = np.linalg.norm(resid_um[i] - np.median(resid_um[nb], axis=0))
    mad = 1.4826 * np.median(departure) if len(departure) else 0.0
    return departure <= max(6.0, 3.0 * mad)


def choose_smoothing(src, dst, m, shape, f, base_um: float) -> tuple[float, dict]:
    """The smoothing (``base_um`` x one of :data:`SMOOTH_FACTORS`) whose field, fitted
    without each fold (blocks of 2 x ``base_um``, the same for every candidate), predicts
    the held-out matches best (median residual); and each candidate's median."""
    resid = dst - (src @ m[:2, :2].T + m[:2, 2])
    scores = {}
    for k in SMOOTH_FACTORS:
        sm = base_um * k
        good = consistent(src, resid, 2 * sm)
        held = held_out_lengths(src, dst, m, good, shape, f, sm, True, block_um=2 * base_um)
        held = held[np.isfinite(held)]
        scores[sm] = float(np.median(held)) if len(held) >= MIN_MATCHES else np.inf
    best = min(scores, key=lambda k: (scores[k], k))
    return (best if np.isfinite(scores[best]) else base_um), {
        f"{k:g}": round(v, 2) for k, v in scores.items() if np.isfinite(v)
    }


def _upsample(coarse_field: np.ndarray, coarse_mpp: float, shape, f: float) -> np.ndarray:
    """A field on a coarser level, sampled at every pixel of a level of ``f`` µm/px."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    xy = (np.stack([cols.ravel(), rows.ravel()], 1) + 0.5) * f
    return _sample(coarse_field, xy, coarse_mpp).T.reshape(2, *shape)


def match_field(fixed, moving, m: np.ndarray, smooth_um: float, matcher, iterations: int = 3,
                choose: bool = False, coarse=None):  # fmt: skip
    """The displacement beyond the affine ``m`` (moving µm at every fixed pixel of the
    finest level, [2, h, w]) from dense patch matches (``matcher``:
    :func:`cscvision.labels.registration_match.template_matches`), coarse to fine: with
    ``coarse`` (the fixed and moving levels at twice the µm/px), first two rounds there
    (searched :data:`COARSE_SEARCH_UM`, smoothed over 2 x ``smooth_um``), then
    ``iterations`` rounds at the finest level (:data:`SEARCH_UM`). Each round matches
    against the moving image under the field so far and adds to the field what its
    consistent matches (:func:`consistent`) still say, smoothed by normalised convolution,
    so a place without matches keeps what coarser rounds found. With ``choose``, the
    smoothing :func:`choose_smoothing` picks on the first fine round's matches. Returns the
    field, the last matches (src, dst µm, consistent flags), the smoothing used, the
    candidates' held-out medians and the number of patches the last round tried."""
    f = fixed.mpp
    scores: dict = {}
    shape = fixed.image.shape
    field = np.zeros((2, *shape))
    src = dst = np.zeros((0, 2))
    good = np.zeros(0, bool)

    def through(xy: np.ndarray) -> np.ndarray:
        return xy @ m[:2, :2].T + m[:2, 2] + _sample(field, xy, f)

    for search in COARSE_SEARCH_UM if coarse is not None else ():
        fc, mc = coarse
        s, d = matcher(fc, mc, through, max_patches=4000, search_um=search)
        if len(s) < 12:
            break
        resid = d - through(s)
        keep = consistent(s, resid, 4 * smooth_um)
        step = _field_from(s[keep], resid[keep], fc.image.shape, fc.mpp, 2 * smooth_um)
        field = field + _upsample(step, fc.mpp, shape, f)
    searches = SEARCH_UM[1:] if coarse is not None else SEARCH_UM
    tried = [0]
    for i in range(iterations):
        tried[0] = 0
        s, d = matcher(fixed, moving, through, max_patches=4000, tested=tried,
                       search_um=searches[min(i, len(searches) - 1)])  # fmt: skip
        if len(s) < 12:
            break
        src, dst = s, d
        if choose and not scores:
            smooth_um, scores = choose_smoothing(src, dst, m, shape, f, smooth_um)
        resid = dst - through(src)
        good = consistent(src, resid, 2 * smooth_um)
        field = field + _field_from(src[good], resid[good], shape, f, smooth_um)
    return field, src, dst, good, smooth_um, scores, tried[0]


def matcher_scatter(src, dst, m, field, good, f: float) -> dict[str, float]:
    """Median and p90 (µm) of the consistent matches' distances from the final transform
    (affine ``m`` + ``field``) they were fitted to: the matches' own scatter. The field is
    smoothed over ~``flow_smooth_um`` and averages tens of matches per node, so it follows
    the warp but hardly this scatter."""
    if not good.any():
        return {"median": 0.0, "p90": 0.0}
    pred = src[good] @ m[:2, :2].T + m[:2, 2] + _sample(field, src[good], f)
    lengths = np.linalg.norm(dst[good] - pred, axis=1)
    return {"median": round(float(np.median(lengths)), 2),
            "p90": round(float(np.percentile(lengths, 90)), 2)}  # fmt: skip


def less_scatter(summary: dict, scatter: dict[str, float]) -> dict:
    """A held-out summary with the matches' own scatter taken out in quadrature
    (held-out² = transform error² + scatter², for independent errors): median, p90 and each
    region's median; the held-out figures themselves are kept as ``held_out_*``."""

    def less(value, noise):
        return None if value is None else round(float(np.sqrt(max(value**2 - noise**2, 0))), 2)

    out = {**summary, "held_out_median": summary["median"], "held_out_p90": summary["p90"]}
    out["median"] = less(summary["median"], scatter["median"])
    out["p90"] = less(summary["p90"], scatter["p90"])
    out["regions"] = [{**r, "median": less(r["median"], scatter["median"])}
                      for r in summary.get("regions", [])]  # fmt: skip
    out["method"] = (summary.get("method", "") + ", less the matches' scatter around the final "
                     "transform in quadrature")  # fmt: skip
    return out


def flow_grid(field: np.ndarray, f: float, step_um: float) -> np.ndarray:
    """A dense field (moving µm at each fixed pixel of ``f`` µm/px) as the documented grid:
    nodes at fixed µm (c * step_um, r * step_um)."""
    h, w = field.shape[1:]
    rows, cols = int(np.ceil(h * f / step_um)) + 1, int(np.ceil(w * f / step_um)) + 1
    rr, cc = np.mgrid[0:rows, 0:cols]
    g = [rr * step_um / f - 0.5, cc * step_um / f - 0.5]
    return np.stack([ndimage.map_coordinates(field[k], g, order=1, mode="nearest")
                     for k in (0, 1)]).astype(np.float32)  # fmt: skip

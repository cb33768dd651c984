"""Slide-to-slide registration on thumbnails: an IHC section onto its H&E section.

Coarse to fine, in level-0 µm of both slides:

1. thumbnails at a coarse µm/px, tissue masks, and a stain-independent image (the
   haematoxylin optical density, which both H&E and IHC counterstain carry, inside the
   tissue, plus the tissue edge);
2. ORB features (rotation-invariant) on the fixed image and on the moving image in each of
   the 8 flips/quarter turns, cross-checked matches, RANSAC rigid fit: the orientation
   with the most inliers wins, so any rotation and mirroring is handled;
3. RANSAC affine on the matches, then again at a finer µm/px with matches gated to lie
   near where the coarse transform puts them;
4. non-rigid refinement (on by default, kept where it lowers the held-out error): dense
   template matches (:mod:`cscvision.labels.registration_match`) on the field's own levels
   (``fine_um`` and twice it, :func:`field_mpps`), coarse to fine and incremental,
   outliers dropped, smoothed over ``flow_smooth_um``, kept as a displacement grid
   (:mod:`cscvision.labels.registration_flow` documents the grid);
5. the error: patches on a lattice held out of every fit, measured after the full
   transform, less the matches' own scatter (median, 90th percentile and per region, µm);
   failure when too few patches
   agree on one transform, the error is above a limit, or the tissue masks do not overlap
   once registered.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from skimage import color, filters, measure, transform

from cscvision.core.errors import CscvisionError
from cscvision.labels.registration_figure import qc_figure
from cscvision.labels.registration_match import patch_centres, warp_to_fixed
from cscvision.labels.registration_qc import (
    LOCAL_STEP_UM,
    deformation,
    extrapolated_error,
    local_error_grid,
    local_to_json,
    verdict,
)
from cscvision.slides.slide import SlideReader
from cscvision.slides.tissue import optical_density

MAX_SIDE_PX = 4096  # the finest level's longest side
MIN_TISSUE_OD = 0.08  # summed OD over the glass under which a pixel is glass, whatever Otsu says
MAX_TISSUE_OD = 0.15  # ... and over which it is tissue (pale IHC stroma: 0.1-0.3)


class RegistrationError(CscvisionError, ValueError):
    """Two slides could not be registered; the message says why and what to check."""


@dataclass(frozen=True)
class RegistrationParams:
    coarse_um: float = 0.0  # µm/px of the coarse level; 0 = longest side ~256 px, ≥ 8
    fine_um: float = 2.0  # the field's µm/px (and twice it); the affine's levels halve to 1-2x it
    min_inliers: int = 12
    min_inlier_ratio: float = 0.0  # of the finest level's patch matches (0: not checked)
    min_agreement: float = 0.15  # agreeing matches per patch tried, all levels
    # ... or, when under it, patches of the last field round within ransac_um of the final
    # transform per patch tried (a true pair under a warp no affine follows)
    min_final_agreement: float = 0.08
    max_error_um: float = 50.0  # p90 of the held-out error above this fails
    qc_p90_um: float = 10.0  # an accepted pair whose estimated p90 is above this warns
    qc_unmeasured_share: float = 0.03  # ... or whose tissue is this far extrapolated beyond it
    max_local_error_um: float = 20.0  # tiles where the local error is above it: valid = 0
    min_dice: float = 0.5  # tissue overlap once registered
    max_stretch: float = 1.25  # the affine may scale or shear by at most this factor
    nonrigid: bool = True  # kept only where it lowers the held-out error
    flow_smooth_um: float = 160.0  # Gaussian sigma of the field's smoothing
    choose_smoothing: bool = False  # pick 1, 2, 4 or 8 x flow_smooth_um by held-out matches
    ransac_um: float = 8.0  # RANSAC residual floor, µm: the affine follows the whole section
    # under a warp, not the largest patch that fits within 1.5 px


@dataclass(frozen=True)
class Registration:
    """Fixed (H&E) level-0 µm -> moving (IHC) level-0 µm."""

    fixed_path: str
    moving_path: str
    fixed_mpp: float
    moving_mpp: float
    matrix_um: np.ndarray  # float64[3, 3]
    flip: bool
    rotation_deg: float
    n_matches: int
    n_inliers: int
    error_um: dict[str, float]  # median, p90 of held-out matches
    tissue_dice: float
    ok: bool
    agreement: float = 0.0  # agreeing matches per patch tried
    reason: str = ""
    flow_um: np.ndarray | None = None  # float32[2, rows, cols]: (dx, dy) added in moving µm
    flow_step_um: float = 0.0  # grid spacing of flow_um in fixed µm
    params: dict = field(default_factory=dict)
    error_detail: dict = field(default_factory=dict)  # sites, per-region errors, affine's
    qc: str = ""  # "pass" | "warn" for an accepted pair (registration_qc); "" when refused
    qc_reason: str = ""
    deformation_um: dict = field(default_factory=dict)  # the field's own size, not an error

    def map_um(self, xy_um: np.ndarray) -> np.ndarray:
        """Fixed level-0 µm [N, 2] -> moving level-0 µm [N, 2]."""
        return map_points_um(self.matrix_um, self.flow_um, self.flow_step_um, xy_um)

    def map_l0(self, xy_l0: np.ndarray) -> np.ndarray:
        """Fixed level-0 px -> moving level-0 px (continuous coordinates)."""
        return self.map_um(np.asarray(xy_l0, np.float64) * self.fixed_mpp) / self.moving_mpp

    def to_dict(self) -> dict:
        record = {
            "direction": "fixed (H&E) level-0 µm -> moving (IHC) level-0 µm",
            "fixed": {"path": self.fixed_path, "mpp": self.fixed_mpp},
            "moving": {"path": self.moving_path, "mpp": self.moving_mpp},
            "matrix_um": self.matrix_um.tolist(),
            "flip": self.flip,
            "rotation_deg": round(self.rotation_deg, 3),
            "n_matches": self.n_matches,
            "n_inliers": self.n_inliers,
            "error_um": self.error_um,
            "tissue_dice": round(self.tissue_dice, 4),
            "agreement": self.agreement,
            "ok": self.ok,
            "reason": self.reason,
            "qc": self.qc,
            "qc_reason": self.qc_reason,
            "deformation_um": self.deformation_um,
            "params": self.params,
        }
        record["error_detail"] = self.error_detail
        if self.flow_um is not None:
            record["nonrigid"] = {
                "grid": "displacement_um[k, r, c]: component k (0 = x, 1 = y) in moving "
                "level-0 µm, added to matrix_um's output, at fixed level-0 µm "
                "(c * step_um, r * step_um); bilinear, nearest node beyond the edge",
                "step_um": self.flow_step_um,
                "displacement_um": np.round(self.flow_um, 2).tolist(),
            }
        return record

    @classmethod
    def from_dict(cls, d: dict) -> Registration:
        rigid = d.get("nonrigid")
        return cls(
            fixed_path=d["fixed"]["path"],
            moving_path=d["moving"]["path"],
            fixed_mpp=float(d["fixed"]["mpp"]),
            moving_mpp=float(d["moving"]["mpp"]),
            matrix_um=np.asarray(d["matrix_um"], np.float64),
            flip=bool(d["flip"]),
            rotation_deg=float(d["rotation_deg"]),
            n_matches=int(d["n_matches"]),
            n_inliers=int(d["n_inliers"]),
            error_um=dict(d["error_um"]),
            tissue_dice=float(d["tissue_dice"]),
            agreement=float(d.get("agreement", 0.0)),
            ok=bool(d["ok"]),
            reason=str(d.get("reason", "")),
            flow_um=None if not rigid else np.asarray(rigid["displacement_um"], np.float32),
            flow_step_um=0.0 if not rigid else float(rigid["step_um"]),
            params=dict(d.get("params", {})),
            error_detail=dict(d.get("error_detail", {})),
            qc=str(d.get("qc", "")),
            qc_reason=str(d.get("qc_reason", "")),
            deformation_um=dict(d.get("deformation_um", {})),
        )


# --- images -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    image: np.ndarray  # float32 feature image, 0 outside tissue
    mask: np.ndarray  # bool tissue
    rgb: np.ndarray
    mpp: float


def feature_image(rgb: np.ndarray, mask: np.ndarray, sigma_px: float) -> np.ndarray:
    """Stain-independent image: haematoxylin OD (both stainings have it) in the tissue,
    scaled by its own percentiles, plus the tissue edge; 0 on glass."""
    h = color.rgb2hed(rgb)[..., 0]
    inside = h[mask]
    lo, hi = np.percentile(inside, (2, 98)) if inside.size else (0.0, 1.0)
    scaled = np.clip((h - lo) / max(hi - lo, 1e-6), 0, 1)
    regional = ndimage.gaussian_filter(scaled * mask, sigma_px)  # regions, not single nuclei
    soft = ndimage.gaussian_filter(mask.astype(np.float32), 1.0)
    return (0.6 * regional + 0.4 * soft).astype(np.float32)


def glass_white(thumb: np.ndarray) -> tuple[tuple[float, float, float], str]:
    """The slide's white point: the median RGB of its glass, the pixels under Otsu's
    threshold on the summed optical density of a thumbnail (any tint). Falls back to 255
    (and says so) when under 2 % of the thumbnail is glass."""
    density = optical_density(np.ascontiguousarray(thumb, np.uint8))
    cut = filters.threshold_otsu(density) if density.max() > density.min() else np.inf
    glass = thumb[density < cut]
    if len(glass) < 0.02 * density.size:
        return (255.0, 255.0, 255.0), "255 (too little glass on the slide to measure it)"
    white = np.median(glass.reshape(-1, 3).astype(np.float64), axis=0)
    return tuple(float(round(v, 1)) for v in white), "median of the slide's glass (Otsu on OD)"


def stain_mask(rgb: np.ndarray) -> np.ndarray:
    """Tissue: the smoothed optical density over the slide's own glass (any stain, glass of
    any tint) above Otsu's threshold, capped at ``MAX_TISSUE_OD`` so that pale stroma next to
    dark nuclei stays tissue, and floored at ``MIN_TISSUE_OD``."""
    white, _ = glass_white(rgb)
    rel = np.clip(rgb.astype(np.float32), 1, 255) / np.asarray(white, np.float32)
    od = ndimage.gaussian_filter(np.maximum(-np.log(rel), 0).sum(axis=-1), 1.0)
    threshold = filters.threshold_otsu(od) if od.max() > od.min() else np.inf
    return od > max(min(threshold, MAX_TISSUE_OD), MIN_TISSUE_OD)


def level(slide: SlideReader, mpp: float) -> Level:
    rgb = slide.thumbnail(mpp)
    mask = ndimage.binary_fill_holes(ndimage.binary_opening(stain_mask(rgb), iterations=1))
    return Level(feature_image(rgb, mask, max(1.0, 8.0 / mpp)), mask, rgb, mpp)


def _apply(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ m[:2, :2].T + m[:2, 2]


def map_points_um(m: np.ndarray, flow_um: np.ndarray | None, flow_step_um: float,
                  xy_um: np.ndarray) -> np.ndarray:  # fmt: skip
    """Fixed level-0 µm [N, 2] -> moving level-0 µm [N, 2] by the affine ``m`` (µm) plus the
    field ``flow_um`` (documented grid, ``flow_step_um`` apart), when there is one."""
    xy = np.asarray(xy_um, np.float64).reshape(-1, 2)
    out = _apply(m, xy)
    if flow_um is not None:
        g = (xy / flow_step_um).T[::-1]  # (row, col): node (r, c) at (c, r) * step
        for k in range(2):
            out[:, k] += ndimage.map_coordinates(flow_um[k], g, order=1, mode="nearest")
    return out


def _ransac(src, dst, model, threshold: float, seed: int) -> tuple[np.ndarray | None, np.ndarray]:
    if len(src) < 6:
        return None, np.zeros(len(src), bool)
    fitted, inliers = measure.ransac(
        (src, dst), model, min_samples=3, residual_threshold=threshold, max_trials=2000, rng=seed
    )
    if fitted is None or inliers is None:
        return None, np.zeros(len(src), bool)
    return np.asarray(fitted.params, np.float64), np.asarray(inliers, bool)


def _shift(dx: float, dy: float) -> np.ndarray:
    return np.array([[1, 0, dx], [0, 1, dy], [0, 0, 1]], np.float64)


def _rotation(deg: float, centre: tuple[float, float]) -> np.ndarray:
    a = np.deg2rad(deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    return _shift(*centre) @ rot @ _shift(-centre[0], -centre[1])


def _warp(img: np.ndarray, out_to_in: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``out[y, x] = img[out_to_in @ (x, y, 1)]`` (pixel indices), bilinear, 0 outside."""
    m = out_to_in
    matrix = np.array([[m[1, 1], m[1, 0]], [m[0, 1], m[0, 0]]])
    return ndimage.affine_transform(
        img, matrix, offset=(m[1, 2], m[0, 2]), output_shape=shape, order=1, cval=0.0
    )


def _idx_to_um(mpp: float) -> np.ndarray:
    return np.diag([mpp, mpp, 1.0]) @ _shift(0.5, 0.5)


def _um_to_idx(mpp: float) -> np.ndarray:
    return _shift(-0.5, -0.5) @ np.diag([1 / mpp, 1 / mpp, 1.0])


def rotation_search(fixed: Level, moving: Level, step_deg: float = 3.0):
    """Rigid fixed µm -> moving µm by exhaustive search over both mirrorings and all
    rotations (FFT cross-correlation gives the translation of each): (matrix, score, flip)."""
    side = 1 << int(np.ceil(np.log2(1.5 * max(*fixed.image.shape, *moving.image.shape))))
    centre = ((side - 1) / 2, (side - 1) / 2)
    f_off = _shift((side - fixed.image.shape[1]) // 2, (side - fixed.image.shape[0]) // 2)
    canvas_f = _warp(fixed.image, np.linalg.inv(f_off), (side, side))
    canvas_f -= canvas_f.mean()
    spec_f = np.fft.rfft2(canvas_f)
    norm_f = np.linalg.norm(canvas_f)
    m_off = _shift((side - moving.image.shape[1]) // 2, (side - moving.image.shape[0]) // 2)
    w = moving.image.shape[1]
    best = (-np.inf, None, False)

    def trial(flip: bool, deg: float):
        unflip = np.array([[-1, 0, w - 1], [0, 1, 0], [0, 0, 1]]) if flip else np.eye(3)
        # rotated canvas q -> moving index
        q_to_m = unflip @ np.linalg.inv(m_off) @ _rotation(deg, centre)
        canvas_m = _warp(moving.image, q_to_m, (side, side))
        canvas_m -= canvas_m.mean()
        corr = np.fft.irfft2(spec_f * np.conj(np.fft.rfft2(canvas_m)), s=(side, side))
        dy, dx = np.unravel_index(int(np.argmax(corr)), corr.shape)
        score = corr[dy, dx] / (norm_f * np.linalg.norm(canvas_m) + 1e-9)
        dy, dx = (dy + side // 2) % side - side // 2, (dx + side // 2) % side - side // 2
        # fixed index -> canvas p -> q = p - d -> moving index
        idx = q_to_m @ _shift(-dx, -dy) @ f_off
        return score, _idx_to_um(moving.mpp) @ idx @ _um_to_idx(fixed.mpp)

    for flip in (False, True):
        for deg in np.arange(0, 360, step_deg):
            score, m = trial(flip, deg)
            if score > best[0]:
                best = (score, m, flip, deg)
    _, _, flip, deg0 = best
    for deg in deg0 + np.arange(-step_deg, step_deg + 1e-9, step_deg / 6):
        score, m = trial(flip, deg)
        if score > best[0]:
            best = (score, m, flip, deg)
    return best[1], float(best[0]), bool(best[2])


def patch_matches(
    fixed: Level,
    moving: Level,
    guess,
    patch_px: int = 32,
    max_patches: int = 400,
    tested: list[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Point pairs (fixed µm, moving µm) from phase correlation of patches of the fixed image
    against the moving image warped by ``guess`` (a 3 x 3 matrix, or a function fixed µm [N, 2]
    -> moving µm [N, 2]); patches that do not correlate are dropped.
    ``tested[0]`` is increased by the number of patches tried."""
    tested = [0] if tested is None else tested
    from skimage.registration import phase_cross_correlation

    fn = guess if callable(guess) else (lambda xy: _apply(guess, xy))
    half = patch_px // 2
    warped, ys, xs = patch_centres(fixed, moving, fn, half, half, max_patches, tested)
    src, dst = [], []
    # without the mean and a window, the patch's edges and its mean tissue level pull the
    # correlation peak towards no shift: matches then confirm whatever the guess was
    window = np.outer(np.hanning(patch_px), np.hanning(patch_px))
    for y, x in zip(ys.tolist(), xs.tolist(), strict=True):
        a = fixed.image[y - half : y + half, x - half : x + half]
        b = warped[y - half : y + half, x - half : x + half]
        if a.std() < 1e-3 or b.std() < 1e-3:
            continue
        shift, _, _ = phase_cross_correlation(
            (a - a.mean()) * window, (b - b.mean()) * window, upsample_factor=4,
            normalization=None,
        )  # fmt: skip
        if np.abs(shift).max() > half / 2:
            continue
        moved = ndimage.shift(b, shift, order=1, mode="nearest")
        if np.corrcoef(a.ravel(), moved.ravel())[0, 1] < 0.5:
            continue
        src.append((x + 0.5, y + 0.5))
        dst.append((x + 0.5 - shift[1], y + 0.5 - shift[0]))
    if not src:
        return np.zeros((0, 2)), np.zeros((0, 2))
    src_um = np.asarray(src) * fixed.mpp
    return src_um, fn(np.asarray(dst) * fixed.mpp)


def held_out_error(src: np.ndarray, dst: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Residuals (µm) of matches held out of a least-squares affine fit, ``folds``-fold."""
    n = len(src)
    if n < 2 * folds:
        return np.full(max(n, 1), np.inf)
    fold = np.random.default_rng(seed).permutation(n) % folds
    out = np.empty(n)
    for i in range(folds):
        fit = transform.AffineTransform.from_estimate(src[fold != i], dst[fold != i])
        out[fold == i] = np.linalg.norm(fit(src[fold == i]) - dst[fold == i], axis=1)
    return out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 0.0


def _refine(levels_f, levels_m, m: np.ndarray, p: RegistrationParams, seed: int):
    """Affine RANSAC on patch matches, level by level from coarse to fine."""
    src = dst = np.zeros((0, 2))
    tested, agreeing, n_matches = [0], 0, 0
    for lf, lm in zip(levels_f, levels_m, strict=True):
        s, d = patch_matches(lf, lm, m, tested=tested)
        threshold = max(1.5 * lf.mpp, p.ransac_um)
        fit, inliers = _ransac(s, d, transform.AffineTransform, threshold, seed)
        agreeing += int(inliers.sum())
        if fit is None or inliers.sum() < p.min_inliers:
            continue
        m, src, dst = fit, s[inliers], d[inliers]
        n_matches = len(s)
    return m, src, dst, n_matches, agreeing / max(tested[0], 1)


def register_levels(fixed: list[Level], moving: list[Level], p: RegistrationParams, seed=0,
                    field: tuple | None = None) -> dict:  # fmt: skip
    """Fields of a :class:`Registration` from the levels (coarse first) of both slides; the
    non-rigid field and the error on ``field`` = ((fixed, moving) at twice the finest µm/px
    or None, (fixed, moving) at the finest), by default the last two levels."""
    rigid, _, flip = rotation_search(fixed[0], moving[0])
    m, src, dst, n_matches, agreement = _refine(fixed, moving, rigid, p, seed)
    out = {"n_matches": n_matches, "flip": flip, "n_inliers": len(src), "matrix_um": m}
    out["agreement"] = round(agreement, 4)
    out["rotation_deg"] = float(np.degrees(np.arctan2(m[1, 0], m[0, 0])) * (-1 if flip else 1))
    if field is None:
        field = ((fixed[-2], moving[-2]) if len(fixed) > 1 else None, (fixed[-1], moving[-1]))
    coarse, (ff, mf) = (field[0] if p.nonrigid else None), field[1]
    out.update(_errors_and_flow(ff, mf, m, p, src, dst, seed, coarse))
    c0, m0 = fixed[0], moving[0]
    warped = warp_to_fixed(m0.mask.astype(np.float32), m0.mpp, c0.mask.shape, c0.mpp,
                           lambda xy: _apply(m, xy)) > 0.5  # fmt: skip
    out["tissue_dice"] = _dice(c0.mask, warped)
    out["ok"], out["reason"] = True, ""
    stretch = np.linalg.svd(m[:2, :2], compute_uv=False)
    kept = out.get("flow_um") is not None  # the final transform has a field
    final = out["error_detail"].get("final_agreement", 0.0) if kept else 0.0
    if len(src) < p.min_inliers:
        out["ok"], out["reason"] = (
            False,
            (f"too few matching features agree ({len(src)}, {p.min_inliers} needed)"),
        )
    elif agreement < p.min_agreement and final < p.min_final_agreement:
        out["ok"], out["reason"] = (
            False,
            (
                f"only {agreement:.1%} of the patches tried agree on one transform "
                f"(< {p.min_agreement:.0%}) and "
                + (
                    f"{final:.1%} on the final non-rigid one (< {p.min_final_agreement:.0%})"
                    if kept
                    else "no non-rigid field improved on it"
                )
                + ": probably not the same tissue"
            ),
        )
    elif len(src) < p.min_inlier_ratio * n_matches:
        out["ok"], out["reason"] = (
            False,
            (
                f"only {len(src)} of {n_matches} patch matches agree on one transform "
                f"(< {p.min_inlier_ratio:.0%}): probably not the same tissue"
            ),
        )
    elif stretch.max() > p.max_stretch or stretch.min() < 1 / p.max_stretch:
        out["ok"], out["reason"] = (
            False,
            (
                f"implausible affine (stretches {stretch.min():.2f}, {stretch.max():.2f}; sections "
                f"of one block differ by at most x{p.max_stretch}): probably not the same tissue"
            ),
        )
    elif out["error_um"]["p90"] is None or out["error_um"]["p90"] > p.max_error_um:
        p90 = out["error_um"]["p90"]
        out["ok"], out["reason"] = False, f"held-out error p90 {p90:.1f} µm > {p.max_error_um} µm"
    elif out["tissue_dice"] < p.min_dice:
        dice = out["tissue_dice"]
        out["ok"], out["reason"] = (
            False,
            f"tissue overlap once registered Dice {dice:.2f} < {p.min_dice}",
        )
    if not out["ok"]:
        out["flow_um"], out["flow_step_um"] = None, 0.0
    else:
        local = out["error_detail"].get("local")
        tissue = shared_tissue_um(ff, mf, m, out["flow_um"], out["flow_step_um"],
                                  float(local["step_um"]) if local else LOCAL_STEP_UM)  # fmt: skip
        far = extrapolated_error(local, out["flow_um"], out["flow_step_um"], tissue, p.qc_p90_um)
        out["error_detail"]["extrapolated"] = far
        out["qc"], out["qc_reason"] = verdict(out["error_um"]["p90"], p.qc_p90_um, far,
                                              p.qc_unmeasured_share)  # fmt: skip
    return out


def shared_tissue_um(fixed: Level, moving: Level, m: np.ndarray, flow_um: np.ndarray | None,
                     flow_step_um: float, step_um: float) -> np.ndarray:  # fmt: skip
    """Fixed level-0 µm points on a ``step_um`` grid over tissue of ``fixed`` that the
    transform (affine ``m`` in µm, plus the field) puts on or within two grid steps of
    tissue of ``moving`` (a section's pale edge, which its mask misses and a warp the field
    does not follow moves by tens of µm, still counts; a missing piece does not)."""
    h, w = fixed.mask.shape
    rr, cc = np.mgrid[0 : int(h * fixed.mpp / step_um) + 1, 0 : int(w * fixed.mpp / step_um) + 1]
    xy = np.stack([cc.ravel(), rr.ravel()], 1) * step_um
    xy = xy[_on(fixed, xy)]
    moved = map_points_um(m, flow_um, flow_step_um, xy)
    near = ndimage.distance_transform_edt(~moving.mask) * moving.mpp <= 2 * step_um
    return xy[_on(dataclasses.replace(moving, mask=near), moved)]


def _on(lv: Level, xy_um: np.ndarray) -> np.ndarray:
    """Whether each level-0 µm point lies on the level's tissue mask."""
    idx = np.round(xy_um / lv.mpp - 0.5).astype(int)
    h, w = lv.mask.shape
    inside = (idx[:, 0] >= 0) & (idx[:, 0] < w) & (idx[:, 1] >= 0) & (idx[:, 1] < h)
    out = np.zeros(len(xy_um), bool)
    out[inside] = lv.mask[idx[inside, 1], idx[inside, 0]]
    return out


def _errors_and_flow(fixed: Level, moving: Level, m, p: RegistrationParams, src, dst,
                     seed: int, coarse=None) -> dict:  # fmt: skip
    """The held-out error of the affine, and of the affine + field when ``p.nonrigid``
    (:mod:`cscvision.labels.registration_flow`), each less the matches' own scatter; the
    field is kept when it lowers the held-out median. Without enough dense matches, the
    5-fold error of the affine's own matches."""
    from cscvision.labels.registration_flow import (
        MIN_MATCHES,
        _sample,
        error_summary,
        flow_grid,
        held_out_lengths,
        less_scatter,
        match_field,
        matcher_scatter,
    )  # fmt: skip
    from cscvision.labels.registration_match import template_matches

    f, shape = fixed.mpp, fixed.image.shape
    rounds = 3 if p.nonrigid else 1
    field, s, d, good, smooth, scores, tried = match_field(
        fixed, moving, m, p.flow_smooth_um, template_matches, iterations=rounds,
        choose=p.nonrigid and p.choose_smoothing, coarse=coarse,
    )  # fmt: skip
    out = {"flow_um": None, "flow_step_um": 0.0}
    lengths = held_out_lengths(s, d, m, good, shape, f, smooth, False)
    affine = error_summary(s, lengths, shape, f)
    if affine["measured"] < MIN_MATCHES:
        errors = held_out_error(src, dst, seed=seed)
        finite = np.isfinite(errors).all()
        out["error_um"] = {
            "median": round(float(np.median(errors)), 2) if finite else None,
            "p90": round(float(np.percentile(errors, 90)), 2) if finite else None,
        }
        method = f"5-fold affine residuals of matches (dense matches: {affine['measured']})"
        out["error_detail"] = {"method": method, "affine": affine}
        return out
    scatter = matcher_scatter(s, d, m, field, good, f)
    chosen, detail = affine, {"matcher_scatter_um": scatter}
    near = np.linalg.norm(d - (s @ m[:2, :2].T + m[:2, 2] + _sample(field, s, f)), axis=1)
    detail["final_agreement"] = round(float((near < p.ransac_um).sum() / max(tried, 1)), 4)
    if p.nonrigid:
        flowed_lengths = held_out_lengths(s, d, m, good, shape, f, smooth, True)
        flowed = error_summary(s, flowed_lengths, shape, f)
        detail["nonrigid"] = {k: flowed[k] for k in ("median", "p90", "measured")}
        detail["consistent_matches"] = int(good.sum())
        detail["flow_smooth_um"] = {"chosen": smooth, "held_out_median_by_smoothing": scores}
        if flowed["median"] is not None and flowed["median"] < affine["median"]:
            step_um = max(f, smooth / 4)
            chosen, out["flow_um"] = flowed, flow_grid(field, f, step_um)
            out["flow_step_um"], lengths = step_um, flowed_lengths
            out["deformation_um"] = deformation(field, s[good], f)
    detail["affine"] = {k: affine[k] for k in ("median", "p90")}
    chosen = less_scatter(chosen, scatter)
    extent = (shape[1] * f, shape[0] * f)
    detail["local"] = local_to_json(local_error_grid(s, lengths, extent, scatter["median"],
                                                     smooth))  # fmt: skip
    out["error_um"] = {"median": chosen["median"], "p90": chosen["p90"]}
    out["error_detail"] = {**chosen, **detail}
    return out


def _finest_um(fixed: SlideReader, moving: SlideReader, p: RegistrationParams) -> float:
    side_um = max(max(s.info.dimensions) * s.info.mpp for s in (fixed, moving))
    return max(p.fine_um, side_um / MAX_SIDE_PX, max(s.info.mpp for s in (fixed, moving)))


def level_mpps(fixed: SlideReader, moving: SlideReader, p: RegistrationParams) -> list[float]:
    """µm/px of the affine's levels, coarse to fine: halving while not under ``p.fine_um``
    (never more than ``MAX_SIDE_PX`` on a side), so the finest is 1-2 x ``p.fine_um``."""
    side_um = max(max(s.info.dimensions) * s.info.mpp for s in (fixed, moving))
    coarse = p.coarse_um or max(8.0, side_um / 256)
    finest = _finest_um(fixed, moving, p)
    mpps = [coarse]
    while mpps[-1] / 2 >= finest * 0.99:
        mpps.append(mpps[-1] / 2)
    return mpps


def field_mpps(fixed: SlideReader, moving: SlideReader, p: RegistrationParams) -> list[float]:
    """µm/px of the non-rigid field's levels: twice ``p.fine_um`` and ``p.fine_um`` itself
    (or coarser where ``MAX_SIDE_PX`` or the slides' own µm/px demand), whatever the affine's
    levels: where the affine's finest was 3.2-3.9 µm/px, a field there missed 5 µm median on
    2 of 4 pairs of the 2024 cohort, and met it at 2 µm/px."""
    finest = _finest_um(fixed, moving, p)
    return [2 * finest, finest]


def register_slides(
    fixed: SlideReader,
    moving: SlideReader,
    params: RegistrationParams | None = None,
    seed: int = 0,
    title: str = "",
) -> tuple[Registration, np.ndarray]:
    """Register an IHC slide (``moving``) onto its H&E slide (``fixed``).

    Coarse to fine on thumbnails, in level-0 µm of both slides: a rigid search over both
    mirrorings and every rotation, then affine fits of patch matches (RANSAC), optionally a
    smooth non-rigid field.

    Parameters
    ----------
    fixed, moving
        The open H&E and IHC slides.
    params
        Registration settings; the defaults when not given.
    seed
        Seed of the random parts (RANSAC, the held-out folds).
    title
        The pair's name in the QC picture's header (default: the two file names).

    Returns
    -------
    tuple[Registration, numpy.ndarray]
        The result (transform ``matrix_um`` H&E µm → IHC µm, mirroring, rotation, matches,
        held-out error, tissue Dice, ``ok`` and ``reason``, the QC verdict) and its QC
        picture (uint8 RGB, :mod:`cscvision.labels.registration_figure`): verdict, checkerboard,
        local error per region.

    Notes
    -----
    Never raises for a failed registration: ``ok`` is False and ``reason`` says why.

    Examples
    --------
    >>> with cscvision.open_slide("he.svs") as he, cscvision.open_slide("cd44.svs") as ihc:
    ...     reg, qc = cscvision.register_slides(he, ihc)
    >>> reg.ok, reg.reason
    """
    p = params or RegistrationParams()
    mpps, flow_mpps = level_mpps(fixed, moving, p), field_mpps(fixed, moving, p)
    made: dict[float, tuple[Level, Level]] = {}

    def pair(c: float) -> tuple[Level, Level]:
        near = [k for k in made if abs(k - c) <= 0.01 * c]
        if not near:
            made[c] = (level(fixed, c), level(moving, c))
        return made[near[0] if near else c]

    levels_f, levels_m = zip(*[pair(c) for c in mpps], strict=True)
    flow_levels = (pair(flow_mpps[0]) if p.nonrigid else None, pair(flow_mpps[1]))
    fields = register_levels(list(levels_f), list(levels_m), p, seed, flow_levels)
    reg = Registration(
        fixed_path=str(fixed.info.path),
        moving_path=str(moving.info.path),
        fixed_mpp=fixed.info.mpp,
        moving_mpp=moving.info.mpp,
        params={**dataclasses.asdict(p), "level_mpps": mpps, "field_mpps": flow_mpps},
        **fields,
    )
    qc = min(len(mpps) - 1, 1)
    return reg, qc_figure(levels_f[qc], levels_m[qc], reg, title)

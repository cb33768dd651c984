"""Stain vectors and stain normalisation of H&E (Macenko, Vahadane, Reinhard).

Fitting is numpy on a sample of tissue pixels (a reference tile or region, or pixels drawn from
a cohort's tiles); applying is torch on whole tile batches ``[B, 3, H, W]`` (uint8 or float in
0–255), so it runs where the model runs. A :class:`StainReference` is plain numbers and travels
in the model card: the template a model was trained with is applied at inference without
being named again.

Optical density (OD) per channel is ``-log(max(I, 1) / 255)`` (Beer–Lambert, white = 255).
Stain matrices hold one unit OD vector per row, haematoxylin first: ``[[Hr, Hg, Hb], [Er, Eg,
Eb]]``; haematoxylin absorbs more red than eosin, which orders them (as Macenko's reference
code does).

- Macenko et al. 2009 (ISBI): the plane through the origin of the two main singular
  directions of the tissue ODs; the stains are its robust extreme angles (percentiles
  ``alpha`` and ``100 - alpha``). Stain vectors are fitted on pixels no channel of which is
  darker than OD :data:`OD_FIT_MAX`; the amounts on every stained pixel.
- Vahadane et al. 2016 (IEEE TMI): sparse non-negative factorisation of the tissue ODs into
  two unit stains with L1-sparse concentrations (``lam``).
- Reinhard et al. 2001: each channel of CIE L*a*b* shifted and scaled to the reference's mean
  and standard deviation.

Macenko and Vahadane normalise alike once the stains are known: a tile's concentrations
(least squares on its ODs) are scaled so their 99th percentile matches the reference's, then
recomposed with the reference stains.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cscvision.core.errors import CscvisionError

if TYPE_CHECKING:
    import torch

    from cscvision.slides.slide import Slide

METHODS = ("macenko", "vahadane", "reinhard")
# a pixel is stained when the length of its OD vector exceeds this (Macenko's beta). Not "every
# channel above beta" as Macenko's reference code: eosin absorbs little red, so that rule drops
# pure-eosin pixels and biases the eosin vector towards haematoxylin (7° in tests/test_stain.py)
OD_BETA = 0.15
# stain vectors are fitted on stained pixels whose every channel's OD is at most this (8-bit
# value >= 35): darker channels are clipped or a few 8-bit levels above 0, where one level (or
# a JPEG error) moves the OD by 0.03-0.3 (1/value); with haematoxylin x 2.2 those nuclei set
# the Macenko plane (scripts/stain_fit_ablation.py: eosin 38.6 degrees off on one slide, 7.8
# without them)
OD_FIT_MAX = 2.0
MAX_CONC_PERCENTILE = 99.0
# which fit made a Macenko or Vahadane reference, kept in its details as "fit": 2 = stain
# vectors on ODs <= OD_FIT_MAX, Macenko's plane through the origin (2026-12-07). References
# without it were fitted before versions were kept, mostly by version 1 (covariance plane,
# every OD; a few hours of 2026-12-07 fitted version 2 unrecorded); the two can sit 1-2°
# apart on clean slides, more on faint or clipped ones (docs/explanation/trust-measured.md)
FIT_VERSION = 2
FIT_VERSIONS = {
    1: "covariance plane, every stained OD; or unrecorded: fitted before versions were kept",
    2: f"Macenko plane through the origin, ODs <= {OD_FIT_MAX:g}",
}
# Macenko's published reference (rows H, E) and its 99th-percentile concentrations
# Ruifrok & Johnston 2001's standard H&E OD vectors (rows H, E), for comparison only
RUIFROK_HE = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]])
RUIFROK_HE = RUIFROK_HE / np.linalg.norm(RUIFROK_HE, axis=1, keepdims=True)
HE_REFERENCE = np.array([[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]])
HE_REFERENCE_MAX_CONC = np.array([1.9705, 1.0308])


class StainError(CscvisionError, ValueError):
    """Pixels a stain model cannot be fitted on; the message says what to give instead."""


@dataclass(frozen=True)
class StainReference:
    """A fitted normalisation template: stains and concentration scale, or L*a*b* statistics."""

    method: str  # one of METHODS
    stain_matrix: tuple[tuple[float, ...], ...] | None = None  # 2 × 3, rows H, E (unit OD)
    max_concentration: tuple[float, ...] | None = None  # 99th percentile of H, E
    lab_mean: tuple[float, ...] | None = None  # L*, a*, b*
    lab_std: tuple[float, ...] | None = None
    source: str = ""  # what it was fitted on
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise StainError(f"stain method {self.method!r}: choose one of {', '.join(METHODS)}")
        needs = ("lab_mean", "lab_std") if self.method == "reinhard" else (
            "stain_matrix", "max_concentration")  # fmt: skip
        missing = [k for k in needs if getattr(self, k) is None]
        if missing:
            raise StainError(f"{self.method} stain reference lacks {', '.join(missing)}")

    def to_dict(self) -> dict[str, Any]:
        out = {"method": self.method, "source": self.source, "details": dict(self.details)}
        for key in ("stain_matrix", "max_concentration", "lab_mean", "lab_std"):
            value = getattr(self, key)
            if value is not None:
                out[key] = np.asarray(value, np.float64).round(6).tolist()
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StainReference:
        def tup(v):
            return None if v is None else tuple(tuple(r) if isinstance(r, list) else r for r in v)

        return cls(
            method=d["method"],
            stain_matrix=tup(d.get("stain_matrix")),
            max_concentration=tup(d.get("max_concentration")),
            lab_mean=tup(d.get("lab_mean")),
            lab_std=tup(d.get("lab_std")),
            source=str(d.get("source", "")),
            details=dict(d.get("details") or {}),
        )


def read_stain_reference(path: str | Path) -> StainReference:
    """A reference written by ``cscvision stain fit`` (JSON); :class:`StainError` naming the
    file when it cannot be read or is not a reference."""
    import json

    try:
        return StainReference.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
    except OSError as e:
        raise StainError(f"{path}: cannot read the stain reference ({e.strerror or e})") from None
    except KeyError as e:
        raise StainError(
            f"{path}: not a readable stain reference (no {e} key); make one with cscvision "
            "stain fit"
        ) from None
    except (ValueError, TypeError, AttributeError) as e:
        raise StainError(
            f"{path}: not a readable stain reference ({e}); make one with cscvision stain fit"
        ) from None


# --- fitting (numpy) ------------------------------------------------------------------------


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Per-channel OD of RGB values (any shape ending in 3), float64."""
    return -np.log(np.clip(np.asarray(rgb, np.float64), 1.0, 255.0) / 255.0)


def tissue_od(rgb: np.ndarray, beta: float = OD_BETA, min_pixels: int = 100) -> np.ndarray:
    """The ODs [N, 3] of the pixels of ``rgb`` whose OD vector is longer than ``beta``."""
    od = optical_density(np.asarray(rgb).reshape(-1, 3))
    od = od[np.linalg.norm(od, axis=1) > beta]
    if len(od) < min_pixels:
        raise StainError(
            f"{len(od)} stained pixels (|OD| > {beta}; need {min_pixels}): "
            "fit on a tissue region, not glass"
        )
    return od


def order_he(vectors: np.ndarray) -> np.ndarray:
    """Two unit OD vectors as rows, haematoxylin (the larger red OD) first."""
    v = np.asarray(vectors, np.float64)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    return v if v[0, 0] >= v[1, 0] else v[::-1].copy()


def fitting_od(od: np.ndarray, min_pixels: int = 100) -> np.ndarray:
    """The tissue ODs [N, 3] stain vectors are fitted on: those no channel of which is above
    :data:`OD_FIT_MAX` (all of them when fewer than ``min_pixels`` are)."""
    keep = od.max(axis=1) <= OD_FIT_MAX
    return od[keep] if keep.sum() >= min_pixels else od


def macenko_stains(od: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """The two stains (rows, unit length, not ordered) of tissue ODs [N, 3] by Macenko's
    method: extreme angles in the plane of the two main singular directions of the ODs.

    The plane is the SVD of the ODs themselves, as in Macenko et al. 2009 and HistomicsTK (a
    plane through the origin, which Beer-Lambert puts every pixel on), not of their covariance
    (the reference Matlab code and its ports): centred, a faint eosin's variance lies near the
    noise floor and the plane's second direction was noise (``scripts/stain_fit_ablation.py``:
    eosin 26.2 degrees off on one shifted slide, 7.5 through the origin)."""
    _, vecs = np.linalg.eigh(od.T @ od)
    plane = vecs[:, 1:3]
    proj = od @ plane
    angle = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(angle, (alpha, 100 - alpha))
    stains = np.stack([plane @ np.array([np.cos(a), np.sin(a)]) for a in (lo, hi)])
    stains *= np.where(stains.sum(1, keepdims=True) < 0, -1.0, 1.0)  # OD is positive
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    if float(stains[0] @ stains[1]) > 0.98:
        raise StainError("Macenko stain vectors are not distinct: is this a two-stain image?")
    return stains


def vahadane_stains(
    od: np.ndarray,
    lam: float = 0.01,
    iterations: int = 300,
    max_pixels: int = 20_000,
    seed: int = 0,
) -> np.ndarray:
    """The two stains (rows, unit length, not ordered) of tissue ODs [N, 3] by Vahadane's
    sparse non-negative factorisation: ``min |OD - C·S|² + lam·|C|₁`` with ``C ≥ 0``, ``S ≥ 0``
    and unit rows of ``S``, by alternating projected gradient steps from Macenko's stains.

    Written here, not scikit-learn's ``DictionaryLearning`` (the same problem): that found the
    same stains on the synthetic images of ``tests/test_stain.py`` but took 60-90 s on 20,000
    real tissue pixels (per-pixel lasso); this takes about a second. ``lam`` 0.01, not the
    paper's 0.1: on images whose pixels mix the stains, 0.1 moved both stains 2-5° off the
    truth on those images (0.01: under 1.3°).
    """
    rng = np.random.default_rng(seed)
    if len(od) > max_pixels:
        od = od[rng.choice(len(od), max_pixels, replace=False)]
    stains = np.abs(macenko_stains(od))
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    conc = np.maximum(concentrations(od, stains), 0.0)
    for _ in range(iterations):
        gram = stains @ stains.T
        step = 1.0 / np.linalg.eigvalsh(gram).max()
        for _ in range(5):  # non-negative lasso on the concentrations
            conc = np.maximum(conc - step * (conc @ gram - od @ stains.T + lam), 0.0)
        inner = conc.T @ conc
        step = 1.0 / max(float(np.linalg.eigvalsh(inner).max()), 1e-12)
        stains = np.maximum(stains - step * (inner @ stains - conc.T @ od), 0.0)
        norm = np.maximum(np.linalg.norm(stains, axis=1, keepdims=True), 1e-12)
        stains, conc = stains / norm, conc * norm.T
    if float(stains[0] @ stains[1]) > 0.98:
        raise StainError("Vahadane stain vectors are not distinct: is this a two-stain image?")
    return stains


def concentrations(od: np.ndarray, stain_matrix: np.ndarray) -> np.ndarray:
    """Least-squares stain concentrations [N, 2] of ODs [N, 3] for stains [2, 3]."""
    return np.linalg.lstsq(np.asarray(stain_matrix).T, od.T, rcond=None)[0].T


def fit_stain(
    rgb: np.ndarray, method: str = "macenko", *, source: str = "", **kwargs: Any
) -> StainReference:
    """Fit a normalisation template on RGB pixels (an image or [N, 3] uint8 values).

    ``method`` is one of :data:`METHODS`; ``kwargs`` go to the method (``alpha`` for Macenko,
    ``lam`` for Vahadane). Raises :class:`StainError` when there is too little tissue.
    """
    if method == "reinhard":
        lab = rgb_to_lab_np(np.asarray(rgb).reshape(-1, 3))
        tissue = np.linalg.norm(optical_density(np.asarray(rgb).reshape(-1, 3)), axis=1) > OD_BETA
        lab = lab[tissue] if tissue.sum() >= 100 else lab
        return StainReference(
            method="reinhard",
            lab_mean=tuple(lab.mean(0).tolist()),
            lab_std=tuple(lab.std(0).tolist()),
            source=source,
        )
    od = tissue_od(rgb)
    fit = {"macenko": macenko_stains, "vahadane": vahadane_stains}.get(method)
    if fit is None:
        raise StainError(f"stain method {method!r}: choose one of {', '.join(METHODS)}")
    stains = order_he(fit(fitting_od(od), **kwargs))
    conc = concentrations(od, stains)  # every tissue pixel, as normalise_batch scales a tile
    return StainReference(
        method=method,
        stain_matrix=tuple(map(tuple, stains.tolist())),
        max_concentration=tuple(np.percentile(conc, MAX_CONC_PERCENTILE, axis=0).tolist()),
        source=source,
        details={
            "pixels": len(od),
            "fit": FIT_VERSION,
            **{k: v for k, v in kwargs.items() if np.isscalar(v)},
        },
    )


def angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """The angle between two vectors, in degrees."""
    cos = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


# --- CIE L*a*b* (sRGB, D65) ------------------------------------------------------------------

_RGB_TO_XYZ = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_WHITE = np.array([0.95047, 1.0, 1.08883])  # D65, as scikit-image


def rgb_to_lab_np(rgb: np.ndarray) -> np.ndarray:
    """sRGB values 0–255 [..., 3] to CIE L*a*b* (D65), float64; scikit-image's formulas."""
    from skimage.color import rgb2lab

    return rgb2lab(np.asarray(rgb, np.float64).reshape(-1, 1, 3) / 255.0).reshape(np.shape(rgb))


def _lab_f(t: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.where(t > 0.008856, t.clamp_min(1e-12) ** (1 / 3), 7.787 * t + 16 / 116)


def _lab_f_inv(f: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.where(f > 0.206893, f**3, (f - 16 / 116) / 7.787)


def rgb_to_lab(batch: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] sRGB 0–255 → L*a*b* (float32), the same formulas as scikit-image."""
    import torch

    x = batch.float() / 255.0
    linear = torch.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    m = torch.as_tensor(_RGB_TO_XYZ, dtype=x.dtype, device=x.device)
    xyz = torch.einsum("ij,bjhw->bihw", m, linear)
    f = _lab_f(xyz / torch.as_tensor(_WHITE, dtype=x.dtype, device=x.device)[None, :, None, None])
    return torch.stack(
        [116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1
    )


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] L*a*b* → sRGB 0–255 float32 (clipped), inverse of :func:`rgb_to_lab`."""
    import torch

    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], 1)
    white = torch.as_tensor(_WHITE, dtype=lab.dtype, device=lab.device)[None, :, None, None]
    xyz = _lab_f_inv(f) * white
    m = torch.as_tensor(np.linalg.inv(_RGB_TO_XYZ), dtype=lab.dtype, device=lab.device)
    linear = torch.einsum("ij,bjhw->bihw", m, xyz).clamp(0, 1)
    x = torch.where(linear > 0.0031308, 1.055 * linear ** (1 / 2.4) - 0.055, 12.92 * linear)
    return (x * 255).clamp(0, 255)


# --- applying (torch, whole batches) ---------------------------------------------------------


def normalise_batch(
    batch: torch.Tensor,
    reference: StainReference,
    *,
    source: StainReference | Sequence[StainReference] | None = None,
) -> torch.Tensor:
    """Stain-normalise tiles ``[B, 3, H, W]`` (0–255) to ``reference``; float32 0–255 out.

    Macenko/Vahadane: each tile's concentrations under ``source``'s stains (the slide's own,
    fitted once per slide: :func:`cscvision.slides.slide_stains.slide_stains`; one for the
    batch or one per tile; default: the reference's stains, which corrects amounts only) are
    scaled per tile so their 99th percentile over its tissue (estimated on every 4th pixel)
    matches the reference's, then recomposed with the reference stains. Reinhard: each
    tile's L*a*b* channels take the reference's mean and sd.
    """
    if reference.method == "reinhard":
        return _reinhard(batch, reference)
    if source is None or isinstance(source, StainReference):
        source = [source or reference] * len(batch)
    if len(source) != len(batch):
        raise ValueError(f"{len(source)} source stains for a batch of {len(batch)} tiles")
    return _recompose(batch, reference, source)


def _reinhard(batch: torch.Tensor, ref: StainReference) -> torch.Tensor:
    import torch

    lab = rgb_to_lab(batch)
    mean = lab.mean((2, 3), keepdim=True)
    std = lab.std((2, 3), keepdim=True).clamp_min(1e-6)
    target_mean = torch.as_tensor(ref.lab_mean, dtype=lab.dtype, device=lab.device)
    target_std = torch.as_tensor(ref.lab_std, dtype=lab.dtype, device=lab.device)
    out = (lab - mean) / std * target_std[None, :, None, None] + target_mean[None, :, None, None]
    return lab_to_rgb(out)


def _od_batch(batch: torch.Tensor) -> torch.Tensor:
    """Per-channel OD of a batch; uint8 through a 256-entry table (a gather, not a log)."""
    import torch

    if batch.dtype == torch.uint8:
        table = -torch.log(torch.arange(256, device=batch.device).float().clamp(1.0) / 255.0)
        return table[batch.long()]
    return -torch.log(batch.float().clamp(1.0, 255.0) / 255.0)


def _recompose(
    batch: torch.Tensor, ref: StainReference, src: Sequence[StainReference]
) -> torch.Tensor:
    import torch

    b, _, h, w = batch.shape
    od = _od_batch(batch).reshape(b, 3, h * w)
    unmix, fallback = _unmixing(src, od)  # [B, 2, 3], [B, 2]
    ref_m = torch.as_tensor(ref.stain_matrix, dtype=od.dtype, device=od.device)
    conc = torch.einsum("bij,bjn->bin", unmix, od)  # [B, 2, HW]
    # the 99th percentile over a tile's tissue, on every 4th pixel (a quarter of the sort)
    sample_od, sample = od[:, :, ::4], conc[:, :, ::4]
    tissue = torch.linalg.vector_norm(sample_od, dim=1, keepdim=True) > OD_BETA
    masked = torch.where(tissue.expand_as(sample), sample, torch.full_like(sample, float("nan")))
    tile_max = torch.nanquantile(masked, MAX_CONC_PERCENTILE / 100, dim=2, keepdim=True)
    ref_max = torch.as_tensor(ref.max_concentration, dtype=od.dtype, device=od.device)
    tile_max = torch.where(torch.isnan(tile_max), fallback[:, :, None], tile_max)
    conc = conc * (ref_max[None, :, None] / tile_max.clamp_min(1e-6))
    out = 255.0 * torch.exp(-torch.einsum("ji,bjn->bin", ref_m, conc))
    return out.clamp(0, 255).reshape(b, 3, h, w)


def _unmixing(src: Sequence[StainReference], od: torch.Tensor):
    """Per tile the pseudo-inverse of its source stains [B, 2, 3] (one per distinct source)
    and the source's 99th-percentile concentrations [B, 2]."""
    import torch

    distinct = {id(s): s for s in src}
    pinv = {
        k: np.linalg.pinv(np.asarray(s.stain_matrix, np.float64).T) for k, s in distinct.items()
    }
    unmix = np.stack([pinv[id(s)] for s in src]) if src else np.zeros((0, 2, 3))
    fallback = np.array([s.max_concentration for s in src]).reshape(-1, 2)
    as_t = dict(dtype=od.dtype, device=od.device)
    return torch.as_tensor(unmix, **as_t), torch.as_tensor(fallback, **as_t)


# --- pixels to fit on ------------------------------------------------------------------------


def sample_tissue_tiles(
    slide: Slide,
    *,
    mpp: float = 1.0,
    tile_px: int = 256,
    n_tiles: int = 16,
    seed: int = 0,
    region_l0: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Up to ``n_tiles`` tissue tiles of ``slide`` at ``mpp`` (uint8 [n, tile_px, tile_px, 3]),
    drawn at random among the tiles that are at least 80 % tissue; ``region_l0`` (x, y, w, h in
    level-0 px) limits the draw to tiles inside it. Raises :class:`StainError` without tissue.
    """
    from cscvision.slides.grid import GridSpec, make_grid

    grid = make_grid(slide, GridSpec(mpp=mpp, tile_px=tile_px, min_tissue=0.8))
    xy = grid.xy_l0
    if region_l0 is not None:
        x, y, w, h = region_l0
        inside = (xy[:, 0] >= x) & (xy[:, 1] >= y)
        inside &= (xy[:, 0] + grid.plan.tile_l0 <= x + w) & (xy[:, 1] + grid.plan.tile_l0 <= y + h)
        xy = xy[inside]
    if len(xy) == 0:
        where = f" inside the region {region_l0}" if region_l0 is not None else ""
        raise StainError(
            f"{slide.info.path}: no tile of {tile_px} px at {mpp} µm/px is 80 % tissue{where}; "
            "give a larger region or a slide with tissue"
        )
    pick = np.random.default_rng(seed).permutation(len(xy))[:n_tiles]
    return np.stack([slide.read_tile(tuple(map(int, xy[i])), grid.plan) for i in sorted(pick)])

"""Marker positivity on an IHC slide and tile targets on its registered H&E slide.

Per IHC slide: haematoxylin/DAB stain vectors (Macenko on the slide's own pixels, or fixed),
a DAB optical-density threshold (Otsu on the slide's DAB channel, or fixed), then, tile by
tile at the marker's µm/px, the fraction of tissue pixels that are DAB-positive, kept as
two small maps (tissue and positive pixels per map cell). Optical densities are taken
against the slide's own glass (its white point, from its background), so a tinted glass
is not tissue. Through the registration the maps are sampled in the H&E frame; positive
regions are where the smoothed positive density reaches the marker's threshold
(``min_density``, or from the cohort's densities: :mod:`cscvision.labels.ihc_threshold`);
a tile's value is the fraction of its H&E tissue inside positive regions. Tiles whose H&E
tissue mostly falls off the IHC tissue (tears, missing pieces, edges) are marked invalid
and counted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage import color, filters

from cscvision.core.errors import CscvisionError
from cscvision.core.names import check_name
from cscvision.labels.registration import Registration, glass_white
from cscvision.slides.grid import GridSpec, detect_tissue, make_grid
from cscvision.slides.slide import Slide, plan_read
from cscvision.slides.stain import fitting_od, macenko_stains

COMBINE = ("max", "mean", "min")  # any marker, the average, all markers
OD_TISSUE = 0.05  # summed optical density over the slide's own glass under which an IHC pixel
# is glass (pale IHC stroma reaches 0.06-0.1; glass, JPEG noise included, stays under 0.025)
FIXED_HD = (color.hed_from_rgb, "skimage rgb2hed (Ruifrok & Johnston)")


class MarkerConfigError(CscvisionError, ValueError):
    """A marker config (``--markers`` YAML) that cannot be used; the message names it."""


@dataclass(frozen=True)
class Marker:
    name: str
    target: str
    mpp: float = 1.0  # µm/px at which DAB is thresholded (nuclear stains want ≤ 1)
    min_density: float | None = None  # positive pixel fraction that makes a region positive
    # (None: chosen from the cohort's densities, cscvision.labels.ihc_threshold)
    smooth_um: float = 12.0  # scale over which the density is taken


@dataclass(frozen=True)
class MarkerConfig:
    markers: dict[str, Marker]
    combine: str = "max"
    stain_vectors: str = "macenko"  # or "fixed"
    dab_threshold: float | None = None  # None: Otsu on the slide, floored at min_threshold
    min_threshold: float = 0.15
    map_mpp: float = 4.0  # µm/px of the positivity maps
    min_ihc_tissue: float = 0.6  # share of a tile's H&E tissue that must lie on IHC tissue

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m.target for m in self.markers.values()))


def marker_config(d: Mapping, source: str = "marker config") -> MarkerConfig:
    """A marker config from a parsed YAML/JSON mapping.

    Parameters
    ----------
    d
        The mapping: ``markers`` (marker → ``target``, ``mpp``, ``min_density``),
        ``combine``, ``stain_vectors``, ``dab_threshold`` and the other keys of
        ``configs/ihc_markers.yaml``.
    source
        What to call the mapping in errors (a file name).

    Returns
    -------
    MarkerConfig
        The checked config.

    Raises
    ------
    MarkerConfigError
        (a ``ValueError``) An unknown key, a missing ``target`` or a value out of
        range; the message names ``source``.

    Examples
    --------
    >>> cfg = cscvision.marker_config({"markers": {"CD44": {"target": "stemness"}}})
    """
    raw = d.get("markers")
    if not isinstance(raw, Mapping) or not raw:
        raise MarkerConfigError(f"{source}: needs 'markers:' mapping marker names to targets")
    markers = {}
    for name, spec in raw.items():
        spec = {"target": spec} if isinstance(spec, str) else dict(spec or {})
        if "target" not in spec:
            raise MarkerConfigError(f"{source}: marker {name!r} needs a 'target'")
        unknown = set(spec) - {"target", "mpp", "min_density", "smooth_um"}
        if unknown:
            raise MarkerConfigError(f"{source}: marker {name!r}: unknown key(s) {sorted(unknown)}")
        check_name(str(name), "marker", source)
        check_name(spec["target"], f"marker {name!r}: target", source)
        markers[str(name)] = Marker(name=str(name), **spec)
    extra = {k: v for k, v in d.items() if k != "markers"}
    unknown = set(extra) - set(MarkerConfig.__dataclass_fields__)
    if unknown:
        raise MarkerConfigError(f"{source}: unknown key(s) {sorted(unknown)}")
    cfg = MarkerConfig(markers=markers, **extra)
    if cfg.combine not in COMBINE:
        raise MarkerConfigError(f"{source}: combine {cfg.combine!r} is not one of {COMBINE}")
    if cfg.stain_vectors not in ("macenko", "fixed"):
        raise MarkerConfigError(f"{source}: stain_vectors must be 'macenko' or 'fixed'")
    return cfg


# --- stains -------------------------------------------------------------------------------


def od(rgb: np.ndarray, white: Sequence[float] | None = None) -> np.ndarray:
    """Optical density per channel against ``white`` (the glass RGB; default 255)."""
    ref = np.asarray(white if white is not None else (255.0,) * 3, np.float32)
    return np.maximum(-np.log(np.clip(rgb.astype(np.float32), 1, 255) / ref), 0.0)


def macenko_vectors(
    rgb_pixels: np.ndarray, beta: float = 0.15, alpha: float = 1.0, white=None
) -> np.ndarray:
    """Haematoxylin and DAB OD vectors (rows, unit length) by Macenko's method on the pixels
    every channel of which is above ``beta``: H&E's fit (:func:`~cscvision.slides.stain.
    macenko_stains`, one copy for both stains). The vector with the larger blue share is
    DAB. Raises ValueError when too few pixels or the two vectors are not distinct."""
    x = macenko_pixels(rgb_pixels, white, beta)
    if len(x) < 100:
        raise ValueError("too few stained pixels for Macenko stain vectors")
    v = macenko_stains(x, alpha)  # StainError is a ValueError
    h, dab = sorted(v, key=lambda u: u[2] / (u[0] + 1e-6))
    return np.stack([h, dab])


def macenko_pixels(rgb_pixels: np.ndarray, white=None, beta: float = 0.15) -> np.ndarray:
    """The ODs [N, 3] an IHC slide's stain vectors are fitted on: pixels every channel of
    which is above ``beta`` against ``white``, then :func:`~cscvision.slides.stain.fitting_od`."""
    x = od(rgb_pixels.reshape(-1, 3), white)
    return fitting_od(x[(x > beta).all(axis=1)])


def deconvolution_matrix(vectors: np.ndarray | None) -> np.ndarray:
    """OD (rows of RGB) -> (H, DAB, residual) concentrations; ``None``: fixed vectors."""
    if vectors is None:
        return FIXED_HD[0][:, [0, 2, 1]]  # columns H, DAB, E
    h, dab = vectors
    residual = np.cross(h, dab)
    residual /= np.linalg.norm(residual)
    return np.linalg.inv(np.stack([h, dab, residual]))


def dab_channel(
    rgb: np.ndarray, matrix: np.ndarray, white: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """DAB concentration (OD units) and a tissue mask per pixel, against ``white``."""
    x = od(rgb, white)
    conc = x.reshape(-1, 3) @ matrix
    return conc[:, 1].reshape(rgb.shape[:2]), x.sum(axis=-1) > OD_TISSUE


# --- IHC slide ----------------------------------------------------------------------------


def _tiles(slide: Slide, mpp: float, tile_px: int = 512):
    plan = plan_read(slide.info, mpp=mpp, tile_px=tile_px)
    w, h = slide.info.dimensions
    step = round(plan.tile_l0)
    for y in range(0, h, step):
        for x in range(0, w, step):
            yield (x, y), plan


def stain_sample(slide: Slide, marker: Marker) -> tuple[np.ndarray, tuple, str]:
    """The pixels [N, 3] of 24 tissue tiles (seed 0) at the marker's µm/px that an IHC
    slide's stains are fitted on, and its glass white with how it was found."""
    thumb, mask = detect_tissue(slide, 8.0)
    white, white_how = glass_white(thumb)
    rng = np.random.default_rng(0)
    tiles = list(_tiles(slide, marker.mpp))
    scale = mask.shape[1] / slide.info.dimensions[0]
    on = [t for t in tiles if mask[min(int(t[0][1] * scale), mask.shape[0] - 1),
                                   min(int(t[0][0] * scale), mask.shape[1] - 1)]]  # fmt: skip
    pool = on or tiles
    sample = [pool[i] for i in rng.choice(len(pool), min(24, len(pool)), replace=False)]
    pixels = np.concatenate([slide.read_tile(xy, plan).reshape(-1, 3) for xy, plan in sample])
    return pixels, white, white_how


def stain_setup(slide: Slide, cfg: MarkerConfig, marker: Marker) -> dict:
    """Stain matrix and DAB threshold of one IHC slide, from a sample of its tissue tiles."""
    pixels, white, white_how = stain_sample(slide, marker)
    vectors, how = None, FIXED_HD[1]
    if cfg.stain_vectors == "macenko":
        try:
            vectors, how = macenko_vectors(pixels, white=white), "macenko"
        except ValueError as e:
            how = f"fixed ({e})"
    matrix = deconvolution_matrix(vectors)
    dab, tissue = dab_channel(pixels.reshape(-1, 1, 3), matrix, white)
    if cfg.dab_threshold is not None:
        threshold, thr_how = float(cfg.dab_threshold), "config"
    else:
        values = dab[tissue].ravel()
        otsu = float(filters.threshold_otsu(values)) if values.size > 1 else np.inf
        threshold, thr_how = max(otsu, cfg.min_threshold), "otsu"
    return {
        "matrix": matrix,
        "vectors": None if vectors is None else vectors.round(4).tolist(),
        "vectors_from": how,
        "dab_threshold": round(threshold, 4),
        "threshold_from": thr_how,
        "white": list(white),
        "white_from": white_how,
    }


def positivity_maps(
    slide: Slide, marker: Marker, setup: dict, map_mpp: float, progress=None
) -> np.ndarray:
    """float32[2, rows, cols] at ``map_mpp``: tissue pixels and DAB-positive pixels per cell,
    as fractions of the cell; read tile by tile at the marker's µm/px."""
    w, h = slide.info.dimensions
    cell_l0 = map_mpp / slide.info.mpp
    maps = np.zeros((2, int(np.ceil(h / cell_l0)), int(np.ceil(w / cell_l0))), np.float64)
    counts = np.zeros(maps.shape[1:], np.float64)
    for xy, plan in _tiles(slide, marker.mpp):
        rgb = slide.read_tile(xy, plan)
        dab, tissue = dab_channel(rgb, setup["matrix"], setup.get("white"))
        pos = tissue & (dab > setup["dab_threshold"])
        per_cell = plan.tile_px / (plan.tile_l0 / cell_l0)  # marker pixels per map cell
        rr, cc = np.mgrid[0 : plan.tile_px, 0 : plan.tile_px]
        r = ((xy[1] / cell_l0) + rr / per_cell).astype(np.int64).ravel()
        c = ((xy[0] / cell_l0) + cc / per_cell).astype(np.int64).ravel()
        ok = (r < counts.shape[0]) & (c < counts.shape[1])
        idx, n = r[ok] * counts.shape[1] + c[ok], counts.size
        counts += np.bincount(idx, minlength=n).reshape(counts.shape)
        for k, px in enumerate((tissue, pos)):
            maps[k] += np.bincount(idx, weights=px.ravel()[ok], minlength=n).reshape(counts.shape)
        if progress is not None:
            progress()
    return (maps / np.maximum(counts, 1)).astype(np.float32)


def n_ihc_tiles(slide: Slide, marker: Marker) -> int:
    return sum(1 for _ in _tiles(slide, marker.mpp))


# --- H&E frame ----------------------------------------------------------------------------


def he_frame_maps(
    maps: np.ndarray, reg: Registration, he_dims: tuple[int, int], map_mpp: float, marker: Marker
) -> dict[str, np.ndarray]:
    """IHC tissue, raw positive fraction and the positive density (smoothed over
    ``marker.smooth_um``) sampled on an H&E-frame raster of ``map_mpp`` (cell (r, c) centred
    at ((c + .5) * map_mpp, (r + .5) * map_mpp) µm)."""
    cols = int(np.ceil(he_dims[0] * reg.fixed_mpp / map_mpp))
    rows = int(np.ceil(he_dims[1] * reg.fixed_mpp / map_mpp))
    rr, cc = np.mgrid[0:rows, 0:cols]
    xy = (np.stack([cc.ravel(), rr.ravel()], axis=1) + 0.5) * map_mpp
    q = reg.map_um(xy) / map_mpp - 0.5
    sample = [
        ndimage.map_coordinates(m, [q[:, 1], q[:, 0]], order=1, mode="constant").reshape(rows, cols)
        for m in maps
    ]
    tissue, pos = sample
    sigma = marker.smooth_um / map_mpp
    density = ndimage.gaussian_filter(pos, sigma) / (ndimage.gaussian_filter(tissue, sigma) + 1e-6)
    return {"tissue": tissue, "positive": pos, "density": density.astype(np.float32)}


def positive_regions(frame: dict[str, np.ndarray], threshold: float) -> np.ndarray:
    """Cells of an H&E-frame map whose density reaches ``threshold``, on IHC tissue."""
    return (frame["density"] >= threshold) & (frame["tissue"] > 0.5)


def tile_values(
    frame: dict[str, np.ndarray],
    he_mask: np.ndarray,
    he_mask_mpp: float,
    xy_l0: np.ndarray,
    tile_l0: float,
    he_mpp: float,
    map_mpp: float,
    points: int = 8,
) -> dict[str, np.ndarray]:
    """Per H&E tile, over a ``points`` x ``points`` lattice of its H&E tissue: fraction in
    positive regions, raw DAB-positive fraction, share lying on IHC tissue."""
    offs = (np.arange(points) + 0.5) / points * tile_l0
    ox, oy = np.meshgrid(offs, offs)
    px = xy_l0[:, 0, None] + ox.ravel()[None]  # level-0 px [N, P]
    py = xy_l0[:, 1, None] + oy.ravel()[None]

    def look(img, cell_um):
        r = np.clip((py * he_mpp / cell_um).astype(np.int64), 0, img.shape[0] - 1)
        c = np.clip((px * he_mpp / cell_um).astype(np.int64), 0, img.shape[1] - 1)
        return img[r, c]

    he = look(he_mask, he_mask_mpp).astype(np.float64)
    on_ihc = he * (look(frame["tissue"], map_mpp) > 0.5)
    region = on_ihc * look(frame["region"], map_mpp)  # frame["region"]: positive_regions()
    pos = on_ihc * look(frame["positive"], map_mpp)
    tis = on_ihc * look(frame["tissue"], map_mpp)
    n_he, n_on = he.sum(axis=1), on_ihc.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "fraction": region.sum(axis=1) / n_on,
            "positive": pos.sum(axis=1) / tis.sum(axis=1),
            "cover": np.where(n_he > 0, n_on / np.maximum(n_he, 1), 0.0),
        }


def combine(values: Sequence[np.ndarray], how: str) -> np.ndarray:
    stack = np.stack(values)
    return {"max": np.max, "mean": np.mean, "min": np.min}[how](stack, axis=0)


def he_tiles(he: Slide, spec: GridSpec):
    """The H&E tissue grid and its tissue mask (at ``spec.mask_mpp``)."""
    _, mask = detect_tissue(he, spec.mask_mpp)
    return make_grid(he, spec, mask=mask), mask

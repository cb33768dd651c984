"""Tissue compartments of a slide and immune densities in each: pure functions on masks.

Everything is computed on a **raster** of square pixels ``px_um`` µm wide laid from the
slide's level-0 corner (:class:`Raster`; default 10 µm), so a 25 × 35 mm slide is a
2,500 × 3,500 mask. Three compartments, as the immune-phenotype literature uses them:

* **tumour** (tumour epithelium, "intratumoral"): from the cells, where tumour cells
  (``tumour`` and everything below it, e.g. ``csc_like``) are the majority of the
  non-immune cells (share ≥ ``tumour_min_share``, 0.5) and their density reaches
  ``tumour_min_mm2`` (500 / mm², against noise in sparse tissue), both after smoothing by a
  Gaussian of ``sigma_um`` (25 µm), on tissue. Immune cells are left out of the share, so
  a densely infiltrated nest stays tumour. Components smaller than ``min_region_um2``
  (10,000 µm², about 40 tumour cells) are dropped and holes as small are filled. Or
  rasterised from annotation polygons, or a model's map thresholded
  (:func:`compartments_from_masks`).
* **stroma** (tumour-associated stroma, as TIGER and the International TILs Working Group
  score it): tissue that is not tumour, within ``stroma_reach_um`` (500 µm) of the tumour.
  Stroma far from any tumour is not scored.
* **margin** (invasive margin): the band of total width ``margin_um`` (500 µm) centred
  on the tumour border, half inside the tumour and half outside, on tissue. The immunoscore
  literature uses bands of this order (Galon et al. 2006, *Science* 313:1960, and Pagès et
  al. 2018, *Lancet* 391:2128, measure CD3/CD8 in the core and the invasive margin; the
  International Immuno-Oncology Biomarker Working Group, Hendry et al. 2017, *Adv Anat
  Pathol* 24:311, describes a 1 mm band centred on the border): the width is a parameter.
  The margin overlaps the other two.

**Tissue**, from the cells: where the smoothed density of all cells reaches
``tissue_min_mm2`` (300 / mm²), optionally cut by the slide's own tissue mask or the
annotations. Glass and fat hold almost no nuclei, so they fall out.

Densities (:func:`compartment_densities`) are cells per mm² of compartment area: count of
the cells whose centre falls in a compartment pixel over that compartment's area.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

MM2_PER_UM2 = 1e-6
NAMES = ("tumour", "stroma", "margin")


@dataclass(frozen=True)
class Raster:
    """A grid of ``shape`` (rows, cols) square pixels ``px_um`` wide from level-0 (0, 0) of
    a slide at ``mpp`` level-0 µm/px."""

    shape: tuple[int, int]
    px_um: float
    mpp: float

    @property
    def px_l0(self) -> float:
        """Raster pixel side in level-0 pixels."""
        return self.px_um / self.mpp

    @property
    def px_mm2(self) -> float:
        return self.px_um * self.px_um * MM2_PER_UM2

    def index(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row, column of each level-0 point and whether it falls on the raster."""
        col = np.floor(np.asarray(x, np.float64) / self.px_l0).astype(np.int64)
        row = np.floor(np.asarray(y, np.float64) / self.px_l0).astype(np.int64)
        ok = (row >= 0) & (col >= 0) & (row < self.shape[0]) & (col < self.shape[1])
        return row, col, ok


def raster_for(dimensions: tuple[int, int], mpp: float, px_um: float = 10.0) -> Raster:
    """The raster covering a slide of level-0 ``dimensions`` (width, height) at ``mpp``."""
    if not (px_um > 0 and mpp > 0):
        raise ValueError(f"raster: px_um ({px_um}) and mpp ({mpp}) must be positive")
    w_um, h_um = dimensions[0] * mpp, dimensions[1] * mpp
    return Raster((max(1, math.ceil(h_um / px_um)), max(1, math.ceil(w_um / px_um))), px_um, mpp)


@dataclass(frozen=True)
class CompartmentSpec:
    """How compartments are derived from cells (module doc); lengths in µm, densities in
    cells per mm²."""

    px_um: float = 10.0
    sigma_um: float = 25.0
    tumour_min_mm2: float = 500.0
    tumour_min_share: float = 0.5
    tissue_min_mm2: float = 300.0
    min_region_um2: float = 10_000.0
    stroma_reach_um: float = 500.0
    margin_um: float = 500.0

    def __post_init__(self) -> None:
        for name in ("px_um", "sigma_um", "tumour_min_mm2", "stroma_reach_um", "margin_um"):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"compartments: {name} must be positive, got {getattr(self, name)}"
                )


@dataclass(frozen=True)
class Compartments:
    """Boolean masks on ``raster``; ``method`` says where the tumour came from."""

    raster: Raster
    tissue: np.ndarray
    tumour: np.ndarray
    stroma: np.ndarray
    margin: np.ndarray
    method: str

    def areas_mm2(self) -> dict[str, float]:
        px = self.raster.px_mm2
        return {n: float(getattr(self, n).sum() * px) for n in ("tissue", *NAMES)}

    def masks(self) -> dict[str, np.ndarray]:
        return {n: getattr(self, n) for n in NAMES}


def cell_counts(raster: Raster, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cells per raster pixel, float64[rows, cols] (cells off the raster are skipped)."""
    row, col, ok = raster.index(x, y)
    flat = np.bincount(
        row[ok] * raster.shape[1] + col[ok], minlength=raster.shape[0] * raster.shape[1]
    )
    return flat.reshape(raster.shape).astype(np.float64)


def smoothed_density_mm2(counts: np.ndarray, raster: Raster, sigma_um: float) -> np.ndarray:
    """Cells per mm²: ``counts`` per pixel smoothed by a Gaussian of ``sigma_um`` (area-
    preserving: the smoothed counts sum to the counts), over a pixel's area."""
    smooth = ndimage.gaussian_filter(counts, sigma_um / raster.px_um, mode="constant")
    return smooth / raster.px_mm2


def clean_mask(mask: np.ndarray, raster: Raster, min_region_um2: float) -> np.ndarray:
    """``mask`` without components, and with no holes, smaller than ``min_region_um2``."""
    min_px = min_region_um2 / (raster.px_um * raster.px_um)
    out = _drop_small(mask, min_px)
    return ~_drop_small(~out, min_px)


def _drop_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask.copy()
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def distance_um(mask: np.ndarray, raster: Raster) -> np.ndarray:
    """Distance in µm from each pixel centre to the nearest pixel of ``mask`` (0 on it;
    inf everywhere when ``mask`` is empty)."""
    if not mask.any():
        return np.full(mask.shape, np.inf)
    return ndimage.distance_transform_edt(~mask) * raster.px_um


def margin_band(
    tumour: np.ndarray, tissue: np.ndarray, raster: Raster, width_um: float
) -> np.ndarray:
    """The invasive margin: tissue pixels within ``width_um / 2`` of the tumour border, on
    either side (a band ``width_um`` wide in all). A pixel's distance to the border is its
    distance to the nearest pixel of the other side minus half a pixel."""
    half = width_um / 2.0
    outside = distance_um(tumour, raster) - raster.px_um / 2.0  # for pixels off the tumour
    inside = distance_um(~tumour, raster) - raster.px_um / 2.0  # for pixels on it
    band = np.where(tumour, inside, outside) < half
    return band & tissue & np.isfinite(outside) & np.isfinite(inside)


def associated_stroma(
    tumour: np.ndarray, tissue: np.ndarray, raster: Raster, reach_um: float
) -> np.ndarray:
    """Tissue off the tumour whose centre lies within ``reach_um`` of a tumour pixel centre."""
    return tissue & ~tumour & (distance_um(tumour, raster) <= reach_um)


def tissue_from_cells(
    raster: Raster, x: np.ndarray, y: np.ndarray, spec: CompartmentSpec
) -> np.ndarray:
    dens = smoothed_density_mm2(cell_counts(raster, x, y), raster, spec.sigma_um)
    return clean_mask(dens >= spec.tissue_min_mm2, raster, spec.min_region_um2)


def compartments_from_masks(
    raster: Raster,
    tissue: np.ndarray,
    tumour: np.ndarray,
    spec: CompartmentSpec,
    method: str,
    stroma: np.ndarray | None = None,
) -> Compartments:
    """Compartments from a tumour mask (annotations, a model's map, or the cells'); ``stroma``
    given (annotated stroma) is cut to tissue within reach of the tumour."""
    tumour = tumour & tissue
    near = associated_stroma(tumour, tissue, raster, spec.stroma_reach_um)
    stroma = near if stroma is None else near & stroma
    margin = margin_band(tumour, tissue, raster, spec.margin_um)
    return Compartments(raster, tissue, tumour, stroma, margin, method)


def compartments_from_cells(
    raster: Raster,
    x: np.ndarray,
    y: np.ndarray,
    is_tumour: np.ndarray,
    spec: CompartmentSpec | None = None,
    tissue: np.ndarray | None = None,
    is_immune: np.ndarray | None = None,
) -> Compartments:
    """Compartments of the module doc from cell centres (level-0 px), which are tumour cells
    and which immune (left out of the tumour share); ``tissue`` (a mask on ``raster``)
    defaults to the cells' own."""
    spec = spec or CompartmentSpec()
    cells_tissue = tissue_from_cells(raster, x, y, spec)
    tissue = cells_tissue if tissue is None else cells_tissue & tissue
    dens = smoothed_density_mm2(
        cell_counts(raster, x[is_tumour], y[is_tumour]), raster, spec.sigma_um
    )
    other = ~is_tumour if is_immune is None else ~is_tumour & ~is_immune
    rest = smoothed_density_mm2(cell_counts(raster, x[other], y[other]), raster, spec.sigma_um)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(dens > 0, dens / (dens + rest), 0.0)
    core = (dens >= spec.tumour_min_mm2) & (share >= spec.tumour_min_share) & tissue
    tumour = clean_mask(core, raster, spec.min_region_um2)
    return compartments_from_masks(raster, tissue, tumour, spec, "cells")


def compartment_densities(
    comp: Compartments, x: np.ndarray, y: np.ndarray
) -> dict[str, float | None]:
    """Cells per mm² of each compartment (None where a compartment is empty)."""
    row, col, ok = comp.raster.index(x, y)
    out: dict[str, float | None] = {}
    for name, mask in (("tissue", comp.tissue), *comp.masks().items()):
        area = float(mask.sum()) * comp.raster.px_mm2
        n = int(mask[row[ok], col[ok]].sum())
        out[name] = n / area if area > 0 else None
    return out


def compartment_counts(comp: Compartments, x: np.ndarray, y: np.ndarray) -> dict[str, int]:
    """Cells whose centre lies in each compartment."""
    row, col, ok = comp.raster.index(x, y)
    return {
        name: int(mask[row[ok], col[ok]].sum())
        for name, mask in (("tissue", comp.tissue), *comp.masks().items())
    }


def polygon_mask(raster: Raster, geometry) -> np.ndarray:
    """Raster pixels whose centre lies in ``geometry`` (a shapely (Multi)Polygon in level-0
    px; None or empty: none; a pixel a border passes through may go either way). Scan-line
    filled (Pillow): each part's outline, then its holes, larger parts first, so an island
    inside a hole stays."""
    import shapely
    from PIL import Image, ImageDraw

    if geometry is None or geometry.is_empty:
        return np.zeros(raster.shape, bool)
    image = Image.new("1", (raster.shape[1], raster.shape[0]), 0)
    draw = ImageDraw.Draw(image)
    parts = [g for g in shapely.get_parts(geometry) if g.geom_type == "Polygon" and g.area > 0]
    for part in sorted(parts, key=lambda g: -g.area):
        for ring, fill in ((part.exterior, 1), *((r, 0) for r in part.interiors)):
            xy = np.asarray(ring.coords) / raster.px_l0 - 0.5  # pixel centres at k + 0.5
            if len(xy) >= 3:
                draw.polygon([tuple(p) for p in xy], fill=fill)
    return np.asarray(image, dtype=bool)


def map_mask(raster: Raster, values: np.ndarray, transform, threshold: float) -> np.ndarray:
    """Raster pixels where a per-tile map (``values`` [rows, cols], ``transform`` a
    :class:`~cscvision.core.geometry.MapTransform`) sampled at their centre reaches
    ``threshold`` (NaN, off the tiles: False)."""
    from cscvision.core.geometry import sample_map

    xs = (np.arange(raster.shape[1]) + 0.5) * raster.px_l0
    ys = (np.arange(raster.shape[0]) + 0.5) * raster.px_l0
    sampled = sample_map(np.asarray(values, np.float32)[None], transform, xs, ys)[0]
    return np.nan_to_num(sampled, nan=-np.inf) >= threshold


def restrict(comp: Compartments, region: np.ndarray, method: str) -> Compartments:
    """Every compartment cut to ``region`` (a mask on the same raster): the compartments of
    one annotated region or of a model's stemness-rich area."""
    return Compartments(
        comp.raster, comp.tissue & region, comp.tumour & region, comp.stroma & region,
        comp.margin & region, method,
    )  # fmt: skip

"""Region geometry of one synthetic slide: tissue outline and classified regions.

Smooth random fields on a coarse grid (``GRID_UM`` µm per cell) are thresholded at
quantiles chosen for each class's share of the tissue, then traced into polygons in
level-0 pixels. Set operations in shapely make the classes exact: every pixel's truth
is decided by these polygons alone, for the GeoJSON, the label mask and the renderer.

Biology encoded: necrosis sits inside the tumour; stemness-rich regions hug necrosis
(hypoxic rims) and form blobs in the tumour; the immunosuppressive stroma follows the
tumour margin and is drawn towards stemness-rich regions, so their overlap, the niche,
occurs on almost every slide.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
from scipy import ndimage
from shapely.geometry.base import BaseGeometry
from skimage import measure, morphology

from cscvision.synth.artefacts import Artefacts, make_artefacts
from cscvision.synth.noise import smooth_noise

GRID_UM = 16.0  # layout raster cell

TUMOR = "Tumor"
NECROSIS = "Necrosis"
STEMNESS = "Stemness-rich"
IMMUNO = "Immunosuppressive"
REGION_SHARE = (0.14, 0.28)  # default range of each target region's share of tissue
REGION_CLASSES = (TUMOR, NECROSIS, STEMNESS, IMMUNO)
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    TUMOR: (200, 0, 0),
    NECROSIS: (80, 80, 80),
    STEMNESS: (255, 170, 0),
    IMMUNO: (0, 150, 255),
    "Pen mark": (0, 160, 60),
    "Fold": (120, 60, 160),
    "Bubble": (60, 200, 200),
    "Out of focus": (230, 80, 200),
}


@dataclass(frozen=True)
class SlideLayout:
    """Where everything is on a slide, in level-0 pixels (shapely geometries)."""

    width_px: int
    height_px: int
    mpp: float
    tissue: BaseGeometry
    regions: dict[str, BaseGeometry]  # REGION_CLASSES -> (Multi)Polygon
    artefacts: Artefacts

    @property
    def niche(self) -> BaseGeometry:
        return shapely.intersection(self.regions[STEMNESS], self.regions[IMMUNO])


def polygons_only(geom: BaseGeometry) -> BaseGeometry:
    """Keep the polygonal parts of ``geom`` (set operations can leave lines and points)."""
    parts = [g for g in shapely.get_parts(shapely.make_valid(geom)) if g.geom_type == "Polygon"]
    parts += [
        p
        for g in shapely.get_parts(shapely.make_valid(geom))
        if g.geom_type in ("MultiPolygon", "GeometryCollection")
        for p in shapely.get_parts(g)
        if p.geom_type == "Polygon"
    ]
    return shapely.multipolygons(parts) if parts else shapely.MultiPolygon()


def drop_small(geom: BaseGeometry, min_area_px: float) -> BaseGeometry:
    """Remove parts and holes smaller than ``min_area_px``."""
    keep = []
    for poly in shapely.get_parts(polygons_only(geom)):
        if poly.area < min_area_px:
            continue
        holes = [r for r in poly.interiors if shapely.Polygon(r).area >= min_area_px]
        keep.append(shapely.Polygon(poly.exterior, holes))
    return shapely.multipolygons(keep) if keep else shapely.MultiPolygon()


def mask_to_geometry(mask: np.ndarray, cell_px: float, simplify_px: float) -> BaseGeometry:
    """Trace a boolean raster (cell ``cell_px`` level-0 pixels) into a smooth polygon set."""
    if not mask.any():
        return shapely.MultiPolygon()
    soft = ndimage.gaussian_filter(np.pad(mask.astype(np.float32), 2), 0.8)
    rings = []
    for contour in measure.find_contours(soft, 0.5):
        if len(contour) < 4:
            continue
        xy = (contour[:, ::-1] - 2 + 0.5) * cell_px
        ring = shapely.make_valid(shapely.Polygon(xy))
        if ring.area > 0:
            rings.append(ring)
    if not rings:
        return shapely.MultiPolygon()
    return polygons_only(shapely.simplify(even_odd(rings), simplify_px))


def even_odd(rings: list[BaseGeometry]) -> BaseGeometry:
    """Fill nested closed contours even-odd: a ring inside an odd number of others is a hole."""
    rings = sorted(rings, key=lambda r: -r.area)
    shapely.prepare(rings)
    solids, holes = [], []
    for i, ring in enumerate(rings):
        probe = ring.representative_point()
        depth = sum(1 for outer in rings[:i] if outer.contains(probe))
        (holes if depth % 2 else solids).append(ring)
    solid = shapely.union_all(solids)
    return shapely.difference(solid, shapely.union_all(holes)) if holes else solid


def wiggle(geom: BaseGeometry, warp: np.ndarray, cell_px: float, step_px: float) -> BaseGeometry:
    """Displace outlines by a smooth field ``warp`` [2, rows, cols] (level-0 px per grid cell).

    Boundaries traced from a coarse grid are too straight; a shared displacement field keeps
    boundaries that coincide together.
    """
    if geom.is_empty:
        return geom

    def shift(xy: np.ndarray) -> np.ndarray:
        at = [xy[:, 1] / cell_px - 0.5, xy[:, 0] / cell_px - 0.5]
        dx = ndimage.map_coordinates(warp[0], at, order=1, mode="nearest")
        dy = ndimage.map_coordinates(warp[1], at, order=1, mode="nearest")
        return xy + np.c_[dx, dy]

    moved = shapely.transform(shapely.segmentize(geom, step_px), shift)
    return polygons_only(moved)


def _quantile_mask(score: np.ndarray, domain: np.ndarray, share: float) -> np.ndarray:
    """The top ``share`` of ``domain`` by ``score``."""
    if share <= 0 or not domain.any():
        return np.zeros_like(domain)
    values = score[domain]
    thr = np.quantile(values, max(0.0, 1.0 - share))
    return domain & (score >= thr)


def _clean(mask: np.ndarray, min_cells: int) -> np.ndarray:
    mask = morphology.remove_small_objects(mask, max_size=min_cells)
    return morphology.remove_small_holes(mask, max_size=min_cells)


def _tissue_raster(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """An irregular tissue section or two on glass, with a glass margin at the edges."""
    gh, gw = shape
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    cy, cx = gh * rng.uniform(0.42, 0.58), gw * rng.uniform(0.42, 0.58)
    ry, rx = gh * rng.uniform(0.33, 0.45), gw * rng.uniform(0.33, 0.45)
    radial = 1.0 - ((yy - cy) / ry) ** 2 - ((xx - cx) / rx) ** 2
    coarse = smooth_noise(rng, shape, max(2.0, min(shape) / 7))
    fine = smooth_noise(rng, shape, max(1.0, min(shape) / 40))
    score = radial + 0.45 * coarse + 0.08 * fine
    edge = np.minimum.reduce([yy, xx, gh - 1 - yy, gw - 1 - xx]) / max(2.0, 0.12 * min(shape))
    score = np.where(edge < 1, score - 2.5 * (1 - edge) ** 2, score)
    tissue = score > np.quantile(score, 1 - rng.uniform(0.33, 0.52))
    labels, n = ndimage.label(tissue)
    if n > 1:
        sizes = ndimage.sum(tissue, labels, index=np.arange(1, n + 1))
        tissue = np.isin(labels, 1 + np.flatnonzero(sizes >= 0.08 * sizes.max()))
    return ndimage.binary_fill_holes(tissue)


def _region_rasters(
    rng: np.random.Generator,
    tissue: np.ndarray,
    blob_cells: float,
    share: tuple[float, float] = REGION_SHARE,
) -> dict[str, np.ndarray]:
    """Tumour compartment, necrosis, stemness and immunosuppression on the layout grid."""
    shape = tissue.shape
    min_cells = max(2, int(0.25 * blob_cells**2))
    t_score = smooth_noise(rng, shape, 1.2 * blob_cells)
    tumour = _clean(_quantile_mask(t_score, tissue, rng.uniform(0.5, 0.7)), min_cells) & tissue
    core = ndimage.distance_transform_edt(tumour) > 0.35 * blob_cells
    n_share = rng.uniform(0.03, 0.09) * tissue.sum() / max(core.sum(), 1)
    n_score = smooth_noise(rng, shape, 0.6 * blob_cells)
    necrosis = _clean(_quantile_mask(n_score, core, min(n_share, 0.6)), min_cells) & core
    d_necrosis = _distance_to(necrosis)
    rim = rng.uniform(0.3, 0.7) * blob_cells
    s_score = smooth_noise(rng, shape, blob_cells) + 1.6 * np.exp(-d_necrosis / rim)
    s_domain = tumour & ~necrosis
    s_share = rng.uniform(*share) * tissue.sum() / max(s_domain.sum(), 1)
    stem = _clean(_quantile_mask(s_score, s_domain, min(s_share, 0.8)), min_cells) & s_domain
    d_margin = ndimage.distance_transform_edt(~_boundary(tumour))
    d_stem = _distance_to(stem)
    i_domain = tissue & ~necrosis
    i_share = rng.uniform(*share) * tissue.sum() / max(i_domain.sum(), 1)
    base = smooth_noise(rng, shape, blob_cells) + 0.8 * np.exp(-d_margin / (0.6 * blob_cells))
    for pull in (0.8, 1.6, 2.4, 3.5):
        score = base + pull * np.exp(-d_stem / (0.8 * blob_cells))
        immuno = _clean(_quantile_mask(score, i_domain, min(i_share, 0.8)), min_cells) & i_domain
        if (immuno & stem).sum() >= 0.02 * tissue.sum():
            break
    return {"tumour": tumour, NECROSIS: necrosis, STEMNESS: stem, IMMUNO: immuno}


def _distance_to(mask: np.ndarray) -> np.ndarray:
    if not mask.any():
        return np.full(mask.shape, 1e9, np.float32)
    return ndimage.distance_transform_edt(~mask).astype(np.float32)


def _boundary(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def make_layout(
    rng: np.random.Generator,
    *,
    width_px: int,
    height_px: int,
    mpp: float,
    artefact_rate: float = 1.0,
    region_share: tuple[float, float] = REGION_SHARE,
) -> SlideLayout:
    """Draw tissue, regions and artefacts for a ``width_px`` x ``height_px`` slide at ``mpp``.

    The stemness-rich and the immunosuppressive share of tissue are each drawn uniformly
    from ``region_share`` (before cleaning: the realised fractions are in the truth file).
    """
    cell_px = GRID_UM / mpp
    shape = (max(8, int(np.ceil(height_px / cell_px))), max(8, int(np.ceil(width_px / cell_px))))
    size_um = min(width_px, height_px) * mpp
    blob_um = float(np.clip(size_um / 14, 60, 260))  # regional length scale
    tissue_r = _tissue_raster(rng, shape)
    rasters = _region_rasters(rng, tissue_r, blob_um / GRID_UM, region_share)
    simplify_px = 0.3 * cell_px
    amp_px = 7.0 / mpp
    warp = np.stack([smooth_noise(rng, shape, 1.2) for _ in range(2)]) * amp_px
    warp += np.stack([smooth_noise(rng, shape, 0.5) for _ in range(2)]) * (0.4 * amp_px)

    def trace(mask: np.ndarray) -> BaseGeometry:
        return wiggle(mask_to_geometry(mask, cell_px, simplify_px), warp, cell_px, 5.0 / mpp)

    min_area = (0.5 * blob_um / mpp) ** 2
    tissue = drop_small(trace(tissue_r), min_area)
    tissue = shapely.clip_by_rect(tissue, 0, 0, width_px, height_px)
    compartment = shapely.intersection(trace(rasters["tumour"]), tissue)
    necrosis = drop_small(
        shapely.intersection(trace(rasters[NECROSIS]), compartment),
        min_area / 4,
    )
    stem = shapely.intersection(trace(rasters[STEMNESS]), compartment)
    stem = drop_small(shapely.difference(stem, necrosis), min_area / 2)
    immuno = shapely.intersection(trace(rasters[IMMUNO]), tissue)
    immuno = drop_small(shapely.difference(immuno, necrosis), min_area / 2)
    tumour = shapely.difference(compartment, shapely.union_all([necrosis, stem, immuno]))
    regions = {
        TUMOR: drop_small(tumour, min_area / 4),
        NECROSIS: necrosis,
        STEMNESS: stem,
        IMMUNO: immuno,
    }
    tissue = polygons_only(tissue)
    artefacts = make_artefacts(
        rng, tissue, width_px=width_px, height_px=height_px, mpp=mpp, rate=artefact_rate
    )
    return SlideLayout(
        width_px=width_px,
        height_px=height_px,
        mpp=mpp,
        tissue=tissue,
        regions={k: polygons_only(v) for k, v in regions.items()},
        artefacts=artefacts,
    )

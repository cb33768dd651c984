"""Cells of a multiplex IF image: nuclei on the nuclear stain, grown to cell bodies, measured.

**Nuclei** (a classical default, per tile of ``tile_px`` with a ``margin_px`` overlap,
each nucleus kept by the tile whose core holds its centroid):

1. Gaussian smoothing (``sigma_um``);
2. foreground: above a local threshold (Gaussian-weighted mean over ``block_um``) and above
   the slide's floor (Otsu's threshold of the smoothed nuclear channel, on a subsample of
   the whole slide), holes filled, objects under ``min_area_um2`` dropped;
3. touching nuclei split by a watershed of the distance transform from its peaks at least
   ``min_distance_um`` apart.

**Cells**: each nucleus grown by ``expand_um`` (``skimage.segmentation.expand_labels``: no
overlap, a pixel goes to its nearest nucleus). **Compartments**: ``nucleus`` the nucleus;
``membrane`` and ``cytoplasm`` the grown ring outside the nucleus (without a membrane
stain the two cannot be told apart); ``cell`` nucleus and ring. Per cell and marker: the
mean intensity of its compartment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cscvision.cells.mif_panel import Panel, channel_indices
from cscvision.cells.mif_read import MifImage
from cscvision.core.errors import CscvisionError


class SegmentationError(CscvisionError, ValueError):
    """Nuclei could not be found (no nuclear signal, or settings that cannot work)."""


@dataclass(frozen=True)
class SegmentParams:
    sigma_um: float = 0.5
    block_um: float = 25.0
    min_area_um2: float = 4.0
    min_distance_um: float = 2.5
    expand_um: float = 4.0  # nucleus → cell body (QuPath's cell expansion: 5 µm)
    tile_px: int = 2048
    margin_px: int = 64


@dataclass(frozen=True)
class MeasuredCells:
    """Cells found in an mIF image, in its level-0 px, with per-marker compartment means."""

    x: np.ndarray  # float64[N]
    y: np.ndarray
    area_um2: np.ndarray  # float64[N] nucleus area
    intensity: dict[str, np.ndarray]  # marker → float64[N]
    mpp: float


def nuclei(dapi: np.ndarray, mpp: float, floor: float, p: SegmentParams) -> np.ndarray:
    """int32 labels of the nuclei of one tile of the nuclear channel."""
    from skimage import feature, filters, measure, morphology, segmentation

    smooth = ndimage.gaussian_filter(dapi.astype(np.float32), p.sigma_um / mpp)
    block = int(p.block_um / mpp) | 1
    local = filters.threshold_local(smooth, block, method="gaussian")
    mask = ndimage.binary_fill_holes((smooth > local) & (smooth > floor))
    mask = morphology.remove_small_objects(mask, max_size=max(1, int(p.min_area_um2 / mpp**2)))
    if not mask.any():
        return np.zeros(dapi.shape, np.int32)
    dist = ndimage.gaussian_filter(ndimage.distance_transform_edt(mask), 1.0)
    parts = measure.label(mask)
    peaks = feature.peak_local_max(dist, min_distance=max(1, int(p.min_distance_um / mpp)),
                                   labels=parts, exclude_border=False)  # fmt: skip
    seeds = np.zeros(dapi.shape, np.int32)
    seeds[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return segmentation.watershed(-dist, seeds, mask=mask).astype(np.int32)


def slide_floor(dapi: np.ndarray, mpp: float, p: SegmentParams) -> float:
    """Otsu's threshold of the smoothed nuclear channel on a subsample of the slide."""
    from skimage import filters

    step = max(1, int(np.sqrt(dapi.size / 4e6)))
    smooth = ndimage.gaussian_filter(
        dapi[::step, ::step].astype(np.float32), p.sigma_um / mpp / step
    )
    if smooth.max() <= smooth.min():
        raise SegmentationError("the nuclear channel is flat: no nuclei to find")
    return float(filters.threshold_otsu(smooth))


def _means(values: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    count = np.bincount(labels.ravel(), minlength=n + 1)
    total = np.bincount(labels.ravel(), weights=values.ravel().astype(np.float64), minlength=n + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (total / count)[1:]


def _tile(planes: dict[str, np.ndarray], panel: Panel, window, floor: float, mpp: float,
          p: SegmentParams) -> dict[str, np.ndarray]:  # fmt: skip
    from skimage import segmentation

    (y0, y1, x0, x1), (cy0, cy1, cx0, cx1) = window
    nuc = nuclei(planes[panel.nuclear_marker][y0:y1, x0:x1], mpp, floor, p)
    n = int(nuc.max())
    if not n:
        return {}
    cell = segmentation.expand_labels(nuc, distance=p.expand_um / mpp)
    ring = np.where(nuc > 0, 0, cell)
    area = np.bincount(nuc.ravel(), minlength=n + 1)[1:]
    rows, cols = np.indices(nuc.shape)
    cy, cx = _means(rows, nuc, n), _means(cols, nuc, n)
    keep = (area > 0) & (cy + y0 >= cy0) & (cy + y0 < cy1) & (cx + x0 >= cx0) & (cx + x0 < cx1)
    out = {"x": cx + x0 + 0.5, "y": cy + y0 + 0.5, "area": area * mpp**2}
    masks = {"nucleus": nuc, "membrane": ring, "cytoplasm": ring, "cell": cell}
    for m in panel.markers:
        out[m.marker] = _means(planes[m.marker][y0:y1, x0:x1], masks[m.compartment], n)
    return {k: v[keep] for k, v in out.items()}


def segment_and_measure(image: MifImage, panel: Panel, params: SegmentParams | None = None,
                        planes: dict[str, np.ndarray] | None = None) -> MeasuredCells:  # fmt: skip
    """Nuclei on the panel's nuclear marker, grown to cells, every panel marker measured
    in its compartment (module doc). ``planes`` (marker → level-0 plane) skips reading."""
    p = params or SegmentParams()
    if planes is None:
        index = channel_indices(panel, image.channels, str(image.path))
        planes = {m: image.plane(c) for m, c in index.items()}
    dapi = planes[panel.nuclear_marker]
    floor = slide_floor(dapi, image.mpp, p)
    h, w = dapi.shape
    parts = []
    for cy0 in range(0, h, p.tile_px):
        for cx0 in range(0, w, p.tile_px):
            cy1, cx1 = min(cy0 + p.tile_px, h), min(cx0 + p.tile_px, w)
            window = (max(0, cy0 - p.margin_px), min(h, cy1 + p.margin_px),
                      max(0, cx0 - p.margin_px), min(w, cx1 + p.margin_px))  # fmt: skip
            part = _tile(planes, panel, (window, (cy0, cy1, cx0, cx1)), floor, image.mpp, p)
            if part:
                parts.append(part)
    keys = ["x", "y", "area", *(m.marker for m in panel.markers)]
    cols = {k: np.concatenate([q[k] for q in parts]) if parts else np.zeros(0) for k in keys}
    return MeasuredCells(cols["x"], cols["y"], cols["area"],
                         {m.marker: cols[m.marker] for m in panel.markers}, image.mpp)  # fmt: skip

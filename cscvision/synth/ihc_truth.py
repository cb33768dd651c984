"""The truth of an H&E/IHC pair as a dense point map, in a layout any generator can write.

``<ihc_id>_pointmap.npz`` (a NumPy ``.npz``; plain arrays, no pickles) beside each IHC slide:

=============== ========================= ===============================================
key             array                     meaning
=============== ========================= ===============================================
``step_um``     float64 scalar            spacing of the points on the H&E slide (µm)
``he_mpp``      float64 scalar            H&E level-0 µm/px
``ihc_mpp``     float64 scalar            IHC level-0 µm/px
``ihc_xy_um``   float32[2, rows, cols]    (x, y) in IHC level-0 µm of the H&E point
                                          ((c + 0.5) * step_um, (r + 0.5) * step_um) µm
                                          (H&E level-0 µm): the true H&E -> IHC map
``he_tissue``   uint8[rows, cols]         1 where the H&E point is on tissue
``ihc_tissue``  uint8[rows, cols]         1 where the IHC section holds that tissue (0 in
                                          tears, missing pieces, off the IHC slide)
``region``      uint8[rows, cols]         H&E region truth: bit 8 stemness-rich, bit 16
                                          immunosuppressive (bit 1 tissue)
``artefact``    uint8[rows, cols]         1 under a fold or an air bubble of the IHC section
=============== ========================= ===============================================

``scripts/eval_ihc.py`` scores registrations and labels of any cohort whose
``ihc_manifest.csv`` has such a file beside every IHC slide.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import shapely

from cscvision.core.io import atomic_path
from cscvision.synth.layout import SlideLayout
from cscvision.synth.raster import fill_exact
from cscvision.synth.truth import label_mask

STEP_UM = 8.0
KEYS = ("step_um", "he_mpp", "ihc_mpp", "ihc_xy_um", "he_tissue", "ihc_tissue", "region",
        "artefact")  # fmt: skip


def invert(transform, x_he: np.ndarray, y_he: np.ndarray, iterations: int = 30):
    """IHC level-0 px of H&E level-0 px through the inverse of ``transform`` (IHC px -> H&E
    px, an affine plus a smooth displacement): fixed-point iteration on the displacement."""
    m = transform.matrix
    inv = np.linalg.inv(m[:, :2])
    x, y = (np.stack([x_he - m[0, 2], y_he - m[1, 2]], -1) @ inv.T).T
    for _ in range(iterations):
        fx, fy = transform(x, y)
        step = np.stack([x_he - fx, y_he - fy], -1) @ inv.T
        x, y = x + step[..., 0], y + step[..., 1]
    return x, y


def point_map(
    layout: SlideLayout, section: SlideLayout, transform, ihc_mpp: float, ihc_size: tuple
) -> dict[str, np.ndarray]:
    """The arrays of a point map (see the module docstring) of one synthetic pair."""
    px = STEP_UM / layout.mpp
    bits = label_mask(layout, STEP_UM)
    rows, cols = bits.shape
    rr, cc = np.mgrid[0:rows, 0:cols]
    qx, qy = invert(transform, (cc + 0.5) * px, (rr + 0.5) * px)
    on_slide = (qx >= 0) & (qy >= 0) & (qx < ihc_size[0]) & (qy < ihc_size[1])
    kept = fill_exact(section.tissue, bits.shape, px) & on_slide
    art = section.artefacts
    under = shapely.union_all([art.fold, *(shapely.Point(x, y).buffer(r) for x, y, r in
                                           art.bubbles)])  # fmt: skip
    return {
        "step_um": np.float64(STEP_UM),
        "he_mpp": np.float64(layout.mpp),
        "ihc_mpp": np.float64(ihc_mpp),
        "ihc_xy_um": (np.stack([qx, qy]) * ihc_mpp).astype(np.float32),
        "he_tissue": (bits & 1).astype(np.uint8),
        "ihc_tissue": ((bits & 1) > 0).astype(np.uint8) * kept.astype(np.uint8),
        "region": (bits & 0b11000).astype(np.uint8),
        "artefact": fill_exact(under, bits.shape, px).astype(np.uint8),
    }


def write_point_map(
    path: Path, layout: SlideLayout, section: SlideLayout, transform, ihc_mpp: float,
    ihc_size: tuple[int, int],
) -> Path:  # fmt: skip
    arrays = point_map(layout, section, transform, ihc_mpp, ihc_size)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    return path


def read_point_map(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a point map; raises ValueError naming the file and the missing keys."""
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in KEYS if k not in z.files]
        if missing:
            raise ValueError(f"{path}: point map lacks {missing} (see cscvision.synth.ihc_truth)")
        return {k: z[k] for k in KEYS}


def he_to_ihc_um(pm: dict, xy_he_um: np.ndarray) -> np.ndarray:
    """The true IHC µm of H&E µm points [N, 2], bilinear between the map's points."""
    from scipy import ndimage

    g = np.asarray(xy_he_um, np.float64) / float(pm["step_um"]) - 0.5
    return np.stack([ndimage.map_coordinates(pm["ihc_xy_um"][k], [g[:, 1], g[:, 0]], order=1,
                                             mode="nearest") for k in range(2)], 1)  # fmt: skip

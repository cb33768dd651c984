"""A tissue type the demo cohort never shows, for out-of-distribution checks: adipose-like
tissue (large empty cells bounded by thin eosin membranes, a few flat nuclei on them),
rendered through the same stain model as every synthetic slide, so only its morphology
is new, never its colours."""

from __future__ import annotations

import numpy as np
from scipy import ndimage, spatial

from cscvision.synth.stain import od_lut, od_to_rgb, sample_lab_profile, sample_slide_profile


def adipose_rgb(size_px: int, seed: int, *, cell_um: float = 60.0, mpp: float = 0.5):
    """RGB uint8 [size, size, 3] of adipose-like tissue (a 5 % glass margin) and its stain
    profile (drawn as a synthetic slide's)."""
    rng = np.random.default_rng(seed)
    cell_px = cell_um / mpp
    n = max(4, int((size_px / cell_px) ** 2))
    points = rng.uniform(0, size_px, (n, 2))
    yy, xx = np.mgrid[0:size_px, 0:size_px].astype(np.float32)
    dist, _ = spatial.cKDTree(points).query(np.stack([xx.ravel(), yy.ravel()], 1), k=2)
    gap = (dist[:, 1] - dist[:, 0]).reshape(size_px, size_px)
    membrane = np.exp(-((gap / 2.5) ** 2)).astype(np.float32)
    nuclei = np.zeros((size_px, size_px), np.float32)
    on = np.argwhere(gap < 1.5)
    for y, x in on[rng.choice(len(on), size=max(1, n // 3), replace=False)]:
        nuclei[max(0, y - 3) : y + 4, max(0, x - 6) : x + 7] = 1.0
    nuclei = ndimage.gaussian_filter(nuclei, 1.2)
    margin = int(0.05 * size_px)
    tissue = np.zeros((size_px, size_px), np.float32)
    tissue[margin:-margin, margin:-margin] = 1.0
    noise = rng.normal(0, 0.03, (size_px, size_px)).astype(np.float32)
    od_e = np.clip((0.9 * membrane + 0.2 + noise) * tissue, 0, None)
    od_h = np.clip((1.1 * nuclei + 0.02 + noise) * tissue, 0, None)
    profile = sample_slide_profile(rng, sample_lab_profile(rng))
    return od_to_rgb(od_lut(profile), od_h, od_e), profile

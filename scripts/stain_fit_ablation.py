"""Why the per-slide Macenko fit missed a faint eosin, taken apart on the shifted slides.

For each slide of the groups of an ``eval_trust.py --parts`` work folder, on the pixels
``infer`` fits a slide's stains on (:func:`cscvision.slides.slide_stains.slide_stains`: 16
tiles of 256 px at 1 µm/px, seed 0) it prints how many pixels pass Macenko's beta (|OD| >
0.15) and the fitting cap (every channel's OD <= ``OD_FIT_MAX``), the three eigenvalues of the
ODs' covariance, how far the true eosin lies out of that covariance plane, the angle
percentiles in it, and the angles (H / E, degrees) to the truth of four Macenko variants:
the fit before (covariance plane, every stained pixel), the cap alone, the plane through the
origin (SVD of the ODs) alone, and both (the fit now). Truth: the generator's stain vectors
(``id/<slide>_truth.json``) turned by the shift's set angle (:func:`rotate_stains`).

    nice -n 5 .venv/bin/python scripts/stain_fit_ablation.py --work trust_eval \\
        --group id --group s=2-stain --group s=3-stain --group s=3

How it could fool you: the truth is the generator's vectors, but the shift rotated the
vectors a Macenko fit of the whole unshifted slide found (1-13 degrees from the generator's),
and the generator adds a glass tint and white balance (an OD offset no two-stain fit models),
so even the unshifted slides' fits lie 1-6 degrees from it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cscvision.slides.slide import open_slide
from cscvision.slides.slide_stains import SAMPLE_MPP, SAMPLE_PX, SAMPLE_SEED, SAMPLE_TILES
from cscvision.slides.stain import (
    OD_BETA,
    angle_deg,
    fitting_od,
    macenko_stains,
    optical_density,
    order_he,
    sample_tissue_tiles,
)
from cscvision.synth.stain_shift import PARTS, SiteShift, rotate_stains


def macenko(od: np.ndarray, centred: bool, alpha: float = 1.0) -> np.ndarray:
    """Macenko's two stains (rows H, E): the package's fit (the plane of the ODs) or,
    ``centred``, the plane of their covariance that it replaced."""
    if not centred:
        return order_he(macenko_stains(od, alpha))
    _, vecs = np.linalg.eigh(np.cov(od.T))
    plane = vecs[:, 1:3]
    proj = od @ plane
    angle = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(angle, (alpha, 100 - alpha))
    stains = np.stack([plane @ np.array([np.cos(a), np.sin(a)]) for a in (lo, hi)])
    return order_he(stains * np.where(stains.sum(1, keepdims=True) < 0, -1.0, 1.0))


def shift_of(group: str) -> SiteShift:
    """The shift of an ``eval_trust`` group name: ``id``, ``s=3``, ``s=3-stain``, ..."""
    if group == "id":
        return SiteShift()
    strength, _, part = group[2:].partition("-")
    return SiteShift.at(float(strength), part if part in PARTS else "all")


def one_slide(work: Path, group: str, sid: str) -> str:
    stain = json.loads((work / "id" / f"{sid}_truth.json").read_text())["stain"]
    truth = np.array([stain["haematoxylin_od"], stain["eosin_od"]], float)
    truth = rotate_stains(truth, shift_of(group).rotation_deg)
    path = work / "id" / f"{sid}.tiff" if group == "id" else work / group / f"{sid}-{group}.tiff"
    with open_slide(path) as slide:
        tiles = sample_tissue_tiles(
            slide, mpp=SAMPLE_MPP, tile_px=SAMPLE_PX, n_tiles=SAMPLE_TILES, seed=SAMPLE_SEED
        )
    od = optical_density(tiles.reshape(-1, 3))
    stained = od[np.linalg.norm(od, axis=1) > OD_BETA]
    capped = fitting_od(stained)
    eig, vecs = np.linalg.eigh(np.cov(stained.T))
    plane = vecs[:, 1:3]
    off = angle_deg(truth[1], plane @ (plane.T @ truth[1]))
    proj = stained @ plane
    pct = np.degrees(np.percentile(np.arctan2(proj[:, 1], proj[:, 0]), (1, 50, 99)))
    cells = []
    for name, pixels, centred in (("before", stained, True), ("cap", capped, True),
                                  ("svd", stained, False), ("now", capped, False)):  # fmt: skip
        fit = macenko(pixels, centred)
        angles = [angle_deg(f, t) for f, t in zip(fit, truth, strict=True)]
        cells.append(f"{name} {angles[0]:4.1f}/{angles[1]:4.1f}")
    return (
        f"  {group:10s} {sid:13s} {len(od):7d} px, {len(stained) / len(od):.1%} pass beta, "
        f"{len(capped) / len(od):.1%} also the cap; cov eig {eig[0]:.4f} {eig[1]:.4f} "
        f"{eig[2]:.3f}; true E {off:4.1f} deg off the cov plane; angles p1/50/99 "
        f"{pct[0]:.0f}/{pct[1]:.0f}/{pct[2]:.0f}; H/E deg to truth: {'; '.join(cells)}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("trust_eval"))
    p.add_argument("--group", action="append", help="eval_trust group (repeat)")
    args = p.parse_args()
    sids = sorted(t.stem for t in (args.work / "id").glob("*.tiff"))
    for group in args.group or ["id", "s=2-stain", "s=3-stain", "s=3"]:
        for sid in sids:
            print(one_slide(args.work, group, sid))


if __name__ == "__main__":
    main()

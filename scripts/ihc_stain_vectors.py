"""How far the IHC stain vectors `labels ihc` fits lie from the generator's, and why.

For every IHC slide of a synthetic cohort (``cscvision synth --ihc realistic``) that has a
``<slide>_<marker>_truth.json``: the haematoxylin and DAB vectors that ``labels ihc`` fits
(:func:`cscvision.labels.ihc.stain_setup`, its defaults: Macenko on 24 tissue tiles
against the slide's own glass), their angles to the generator's vectors, the same for the
fixed vectors (``stain_vectors: fixed``, Ruifrok & Johnston's H-DAB), and the share of the
fitted pixels whose direction lies beyond the true DAB in the fitted plane (on the far
side from haematoxylin), and the share of the sampled tissue pixels called DAB-positive
(Otsu threshold, floored, as ``labels ihc`` sets it) with the fitted and with the true
vectors, with the 99th-percentile DAB amount. Where the share beyond is 0, no pixel is
pure enough to show the true DAB direction and an extreme-angle fit (Macenko, or Vahadane
started from it) can only find the most DAB-rich mixture.

    python scripts/ihc_stain_vectors.py /tmp/reg/ho77 /tmp/reg/ho31

How it could fool you: the truth is the renderer's own vector; a real slide has no such
truth, and the renderer's DAB is only ever drawn over or beside haematoxylin.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from skimage import filters

from cscvision.labels.ihc import (
    FIXED_HD,
    Marker,
    MarkerConfig,
    dab_channel,
    deconvolution_matrix,
    macenko_pixels,
    stain_sample,
    stain_setup,
)
from cscvision.slides.slide import open_slide
from cscvision.slides.stain import angle_deg


def unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def positive_share(rgb: np.ndarray, h: np.ndarray, dab: np.ndarray, setup: dict) -> str:
    """Share of tissue pixels above the DAB threshold (Otsu, floored, as ``stain_setup``
    chooses it) and the 99th-percentile DAB, unmixed with ``h`` and ``dab``."""
    conc, tissue = dab_channel(rgb, deconvolution_matrix(np.stack([h, dab])), setup["white"])
    v = conc[tissue].ravel()
    threshold = max(float(filters.threshold_otsu(v)), MarkerConfig(markers={}).min_threshold)
    return f"{np.mean(v > threshold):.1%} (p99 {np.percentile(v, 99):.2f})"


def beyond_share(x: np.ndarray, h: np.ndarray, dab: np.ndarray) -> float:
    """Share of ``x`` whose angle in the H-DAB plane lies beyond ``dab`` (away from ``h``)."""
    e1 = h
    e2 = dab - (dab @ h) * h
    e2 /= np.linalg.norm(e2)
    ang = np.arctan2(x @ e2, x @ e1)
    return float(np.mean(ang > np.arctan2(dab @ e2, dab @ e1)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cohorts", nargs="+", type=Path)
    args = p.parse_args()
    fixed = np.linalg.inv(FIXED_HD[0])[[0, 2]]  # rows H, DAB of skimage's rgb_from_hed
    fixed = np.stack([unit(v) for v in fixed])
    print(
        "cohort slide marker | fitted H / DAB deg | fixed H / DAB deg | pixels beyond true "
        "DAB | DAB-positive pixels unmixed with the fitted / the true vectors"
    )
    for folder in args.cohorts:
        for truth_path in sorted(folder.glob("*_truth.json")):
            truth = json.loads(truth_path.read_text())
            if "marker" not in truth:  # the H&E slide's own truth
                continue
            stain = truth["stain"]
            h_true, dab_true = unit(stain["haematoxylin_od"]), unit(stain["dab_od"])
            marker = Marker(name=truth["marker"], target="t")
            with open_slide(folder / f"{truth['slide_id']}.tiff") as slide:
                setup = stain_setup(slide, MarkerConfig(markers={marker.name: marker}), marker)
                rgb = stain_sample(slide, marker)[0].reshape(-1, 1, 3)
            x = macenko_pixels(rgb, setup["white"])
            if setup["vectors"] is None:  # Macenko refused: stain_setup fell back
                print(f"{folder.name} {truth['he_slide_id']} {truth['marker']} | "
                      f"{setup['vectors_from']}")  # fmt: skip
                continue
            h, dab = (unit(v) for v in setup["vectors"])
            print(
                f"{folder.name} {truth['he_slide_id']} {truth['marker']} | "
                f"{angle_deg(h, h_true):.1f} / {angle_deg(dab, dab_true):.1f} | "
                f"{angle_deg(fixed[0], h_true):.1f} / {angle_deg(fixed[1], dab_true):.1f} | "
                f"{beyond_share(x, h_true, dab_true):.2%} of {len(x)} | "
                f"{positive_share(rgb, h, dab, setup)} / "
                f"{positive_share(rgb, h_true, dab_true, setup)}",
                flush=True,
            )


if __name__ == "__main__":
    main()

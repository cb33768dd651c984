"""Figures for IHC labels on synthetic pairs (issue 14), against the *true* transforms.

    python scripts/eval_ihc.py [--out eval_ihc] [--slides 6] [--size 3072] [--seed 11]

Prints, per (H&E, IHC) pair: mirrored/rotation, the registration error against the true
transform over the H&E tissue (median, p90, µm) next to the method's own held-out estimate;
per target the AUROC of the IHC-derived tile targets against the H&E ground truth
(a tile is positive when ≥ half its tissue is in the target); and whether an unrelated
slide given as the pair is refused. Synthetic data only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

from cscvision.labels.ihc import marker_config
from cscvision.labels.ihc_labels import ihc_labels
from cscvision.labels.registration import register_slides
from cscvision.slides.grid import GridSpec
from cscvision.slides.slide import open_slide
from cscvision.synth import write_cohort
from cscvision.synth.ihc import read_pair_transform

BITS = {"stemness": 8, "immunosuppressive": 16}
MARKERS = {"CD44": "stemness", "FOXP3": "immunosuppressive"}


def true_error_um(reg, truth: dict, labels: np.ndarray, label_px: float, mpp: float) -> np.ndarray:
    """|T(reg(p)) - p| over the H&E tissue, µm: T is the true IHC -> H&E map."""
    T = read_pair_transform(truth)
    ys, xs = np.nonzero(labels & 1)
    p = (np.stack([xs, ys], axis=1) + 0.5) * label_px
    q = reg.map_l0(p)
    bx, by = T(q[:, 0], q[:, 1])
    return np.hypot(bx - p[:, 0], by - p[:, 1]) * mpp


def tile_truth(labels: np.ndarray, xy: np.ndarray, tile_l0: float, label_px: float, bit: int):
    out = np.zeros(len(xy), bool)
    for i, (x, y) in enumerate(xy):
        win = labels[int(y // label_px) : int((y + tile_l0) // label_px),
                     int(x // label_px) : int((x + tile_l0) // label_px)]  # fmt: skip
        tissue = (win & 1) > 0
        out[i] = tissue.any() and ((win & bit) > 0)[tissue].mean() >= 0.5
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("eval_ihc"))
    ap.add_argument("--slides", type=int, default=6)
    ap.add_argument("--size", type=int, default=3072)
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args()
    folder = args.out / "cohort"
    if not (folder / "ihc_manifest.csv").exists():
        write_cohort(folder, n_slides=args.slides, n_patients=args.slides, size_px=args.size,
                     seed=args.seed, ihc_markers=tuple(MARKERS), progress=True)  # fmt: skip
    cfg = marker_config({"markers": MARKERS})
    spec = GridSpec(mpp=0.5, tile_px=224)
    ids = sorted(p.name[: -len(".tiff")] for p in folder.glob("SYN-*-S??.tiff"))
    errors, scores, truths = [], {t: [] for t in BITS}, {t: [] for t in BITS}
    for sid in ids:
        pairs = [(m, folder / f"{sid}_{m}.tiff") for m in MARKERS]
        result = ihc_labels(sid, folder / f"{sid}.tiff", pairs, cfg, spec)
        meta = json.loads((folder / f"{sid}_truth.json").read_text())
        labels = np.asarray(Image.open(folder / f"{sid}_labels.png"))
        label_px = meta["label_mask"]["mpp"] / meta["mpp"]
        for m in result.markers:
            truth = json.loads((folder / f"{sid}_{m.marker}_truth.json").read_text())
            err = true_error_um(m.registration, truth, labels, label_px, meta["mpp"])
            errors.append(err)
            t = truth["transform"]
            print(f"{sid} {m.marker:5s} true flip {t['flip']!s:5s} angle {t['angle_deg']:6.1f}° | "
                  f"found flip {m.registration.flip!s:5s} ok {m.registration.ok} | true error "
                  f"median {np.median(err):5.1f} p90 {np.percentile(err, 90):5.1f} µm | own "
                  f"estimate {m.registration.error_um}")  # fmt: skip
        table = result.table
        if table is None:
            print(f"{sid}: no table ({result.reason})")
            continue
        tile_l0 = spec.tile_px * spec.mpp / meta["mpp"]
        for j, target in enumerate(BITS):
            gt = tile_truth(labels, table.xy_l0, tile_l0, label_px, BITS[target])
            scores[target].append(table.values[table.valid, j])
            truths[target].append(gt[table.valid])
        print(f"{sid}: {result.counts}")
    all_err = np.concatenate(errors)
    print(f"\nregistration vs the true transform, {len(errors)} pairs: median "
          f"{np.median(all_err):.1f} µm, p90 {np.percentile(all_err, 90):.1f} µm; worst pair "
          f"p90 {max(np.percentile(e, 90) for e in errors):.1f} µm")  # fmt: skip
    for target in BITS:
        y, s = np.concatenate(truths[target]), np.concatenate(scores[target])
        print(f"IHC-derived {target}: tile AUROC {roc_auc_score(y, s):.3f} vs H&E ground truth "
              f"({y.sum()} positive of {len(y)} valid tiles)")  # fmt: skip
    other = folder / f"{ids[1]}_CD44.tiff"
    with open_slide(folder / f"{ids[0]}.tiff") as he, open_slide(other) as ihc:
        reg, _ = register_slides(he, ihc)
    print(f"unrelated pair {ids[0]} + {ids[1]}_CD44: ok={reg.ok} ({reg.reason})")


if __name__ == "__main__":
    main()

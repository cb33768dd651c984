"""Train on IHC-derived labels only, score held-out H&E slides against their ground truth.

    python scripts/eval_ihc_train.py [--out eval_ihc_train] [--slides 8] [--size 3072]

Synthetic cohort with paired IHC (`cscvision synth --ihc`) -> `cscvision labels ihc` ->
`cscvision train` with configs/cpu_demo.yaml (no annotation is read) -> predictions on
fresh synthetic H&E slides -> tile AUROC per target against their ground-truth masks
(a tile is positive when ≥ half its tissue is in the target). Synthetic data only.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

from cscvision.cli import main as cli
from cscvision.synth import write_cohort

ROOT = Path(__file__).resolve().parents[1]
BITS = {"stemness": 8, "immunosuppressive": 16}


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
    ap.add_argument("--out", type=Path, default=Path("eval_ihc_train"))
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--size", type=int, default=3072)
    args = ap.parse_args()
    t0 = time.perf_counter()
    cohort = args.out / "cohort"
    if not (cohort / "ihc_manifest.csv").exists():
        write_cohort(cohort, n_slides=args.slides, n_patients=args.slides, size_px=args.size,
                     seed=21, ihc_markers=("CD44", "FOXP3"), progress=True)  # fmt: skip
    labels = args.out / "labels"
    cli(["labels", "ihc", str(cohort / "ihc_manifest.csv"), "--markers",
         str(ROOT / "configs" / "ihc_markers.yaml"), "--out", str(labels)])  # fmt: skip
    from cscvision.training.config import load_config
    from cscvision.training.train import train

    cfg = load_config(ROOT / "configs" / "cpu_demo.yaml", [
        f"cohort.csv={labels / 'cohort.csv'}", "cohort.split_fractions=[0.75, 0.25, 0.0]",
        f"run_dir={args.out / 'run'}", f"export_dir={args.out / 'model'}",
        "name=ihc_labels", "card.trained_on=synthetic slides labelled from synthetic IHC only",
    ])  # fmt: skip
    result = train(cfg)
    held = args.out / "heldout"
    if not (held / "cohort.csv").exists():
        write_cohort(held, n_slides=2, n_patients=2, size_px=4096, seed=99, progress=True)
    from cscvision.inference.predict import predict_slide
    from cscvision.training.export import load_model

    model = load_model(result.model_dir)
    ys = {t: [] for t in BITS}
    ps = {t: [] for t in BITS}
    for slide in sorted(held.glob("SYN-*.tiff")):
        pred = predict_slide(slide, model)
        mask = np.asarray(Image.open(slide.with_name(slide.stem + "_labels.png")))
        for j, target in enumerate(pred.targets):
            gt = tile_truth(mask, pred.grid.xy_l0, pred.grid.plan.tile_l0, 16, BITS[target])
            ys[target].append(gt)
            ps[target].append(pred.probs[:, j])
    print(f"\ntrained on IHC-derived labels of {args.slides} synthetic slides; "
          f"{time.perf_counter() - t0:.0f} s in all")  # fmt: skip
    for target in BITS:
        y, p = np.concatenate(ys[target]), np.concatenate(ps[target])
        print(f"held-out H&E tile AUROC vs ground truth, {target}: {roc_auc_score(y, p):.3f} "
              f"({y.sum()} positive of {len(y)} tiles, 2 unseen slides)")  # fmt: skip


if __name__ == "__main__":
    main()

"""Learn lymphocyte density from H&E with cell-derived labels; score it on held-out slides.

synth (lymphocyte infiltration drawn per slide independently of the regions, seed 505: no
test uses it) → ``cscvision labels cells --feature density_lymphocyte`` (labels from the
generator's cell tables, cells / mm² of tissue per tile of 112 µm: 112 px at 1 µm/px by
default) → ``cscvision train`` (the cpu_demo config as regression: small_cnn, 16 epochs of
at most 300 tiles per slide, at the labels' tile size) → ``cscvision infer`` of
the trained model and of the packaged demo model on the held-out test slides. Prints Pearson
r, over all tissue tiles of the test slides, between the label and (a) the trained model's
predicted density, (b) the demo model's immunosuppressive probability used as the predictor
(the baseline: it maps lymphocyte-rich immunosuppressive regions, not infiltration).

Splits are fixed by patient: one slide per patient, the last ``--test`` slides are test, the
``--val`` before them validation. What could fool you: labels are the generator's cells
(no detector error), and the demo model was trained on other synthetic slides of the same
generator, so both numbers are on synthetic data only.

    .venv/bin/python scripts/eval_cell_labels.py --slides 16 --size 4096 --epochs 16
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def sh(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cscvision", *args], check=True)


def _split_cohort(labels_cohort: Path, n_val: int, n_test: int) -> list[str]:
    """Give the labels' cohort.csv a split column; returns the test slide ids."""
    with labels_cohort.open(newline="") as f:
        rows = list(csv.DictReader(f))
    n = len(rows)
    for i, row in enumerate(rows):
        row["split"] = "test" if i >= n - n_test else "val" if i >= n - n_test - n_val else "train"
    with labels_cohort.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return [r["slide_id"] for r in rows if r["split"] == "test"]


def _tiles(path: Path) -> dict[tuple[int, int], dict[str, str]]:
    with path.open(newline="") as f:
        return {(int(r["x"]), int(r["y"])): r for r in csv.DictReader(f)}


def _pairs(labels: Path, infer: Path, test: list[str], column: str) -> tuple[np.ndarray, ...]:
    truth, pred = [], []
    for sid in test:
        lab = _tiles(labels / f"{sid}.labels.csv")
        out = _tiles(infer / sid / "tiles.csv")
        for xy, row in lab.items():
            if xy in out and row["density_lymphocyte"]:
                truth.append(float(row["density_lymphocyte"]))
                pred.append(float(out[xy][column]))
    return np.array(truth), np.array(pred)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/eval_cell_labels"))
    ap.add_argument("--slides", type=int, default=16)
    ap.add_argument("--size", type=int, default=4096, help="slide side, level-0 px (0.5 µm/px)")
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--tiles-per-slide", type=int, default=300, help="cap per epoch")
    ap.add_argument("--mpp", type=float, default=1.0, help="tile µm/px (label and model)")
    ap.add_argument("--tile-px", type=int, default=112, help="tile px (112 µm at 1 µm/px)")
    ap.add_argument("--val", type=int, default=3)
    ap.add_argument("--test", type=int, default=4)
    ap.add_argument("--seed", type=int, default=505)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    t0 = time.perf_counter()
    cohort = args.out / "cohort"
    if not (cohort / "cohort.csv").exists():
        sh("synth", "--out", str(cohort), "--slides", str(args.slides), "--patients",
           str(args.slides), "--size", str(args.size), "--seed", str(args.seed),
           "--infiltration", "--workers", str(args.workers))  # fmt: skip
    labels = args.out / "labels"
    sh("labels", "cells", str(cohort / "cohort.csv"), "--feature", "lymphocyte_density",
       "--out", str(labels), "--overwrite", "--mpp", str(args.mpp),
       "--tile-px", str(args.tile_px))  # fmt: skip
    test = _split_cohort(labels / "cohort.csv", args.val, args.test)
    t1 = time.perf_counter()
    model = args.out / "model"
    sh("train", "--config", "cpu_demo", f"cohort.csv={labels / 'cohort.csv'}",
       "task=regression", "name=eval_cell_labels", f"run_dir={args.out / 'run'}",
       f"export_dir={model}", f"trainer.max_epochs={args.epochs}",
       f"data.max_tiles_per_slide={args.tiles_per_slide}", f"grid.mpp={args.mpp}",
       f"grid.tile_px={args.tile_px}",
       "regression.units=lymphocytes / mm² of tissue",
       "card.trained_on=synthetic slides with cell-derived lymphocyte-density labels "
       "from cscvision labels cells",
       "--no-resume")  # fmt: skip
    t2 = time.perf_counter()
    slides = [str(cohort / f"{sid}.tiff") for sid in test]
    for name, m in (("trained", str(model)), ("demo", "demo")):
        sh("infer", *slides, "--model", m, "--out", str(args.out / f"infer_{name}"),
           "--threads", "1", "--workers", "1", "--overwrite")  # fmt: skip
    t3 = time.perf_counter()
    y, trained = _pairs(labels, args.out / "infer_trained", test, "prob_density_lymphocyte")
    y2, demo = _pairs(labels, args.out / "infer_demo", test, "prob_immunosuppressive")
    r_trained = float(np.corrcoef(y, trained)[0, 1])
    r_demo = float(np.corrcoef(y2, demo)[0, 1])
    print(
        f"\n{args.slides} synthetic slides of {args.size}² px (seed {args.seed}), one per "
        f"patient; test slides {', '.join(test)}; {len(y)} test tiles of {args.tile_px} px at "
        f"{args.mpp:g} µm/px"
        f"\nlymphocyte density of the labels on test tiles: mean {y.mean():.0f}, sd "
        f"{y.std():.0f} cells / mm²"
        f"\nPearson r, label vs trained model's predicted density:         {r_trained:.3f}"
        f"\nPearson r, label vs demo model's immunosuppressive probability: {r_demo:.3f}"
        f"\ntimes: synth + labels {t1 - t0:.0f} s, train {t2 - t1:.0f} s, infer "
        f"{t3 - t2:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

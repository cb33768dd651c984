"""Train on IHC-derived labels only; score labels and the model against region truth.

    cscvision synth --out T --slides 4 --patients 4 --size 4096 --seed 7 --ihc realistic
    cscvision synth --out H --slides 2 --patients 2 --size 6144 --seed 2024 --ihc realistic
    python scripts/eval_ihc_train.py T H [--out eval_ihc_train] [--epochs 8] [--baseline]

Both folders are cohorts in the layout ``scripts/eval_ihc.py`` reads (``ihc_manifest.csv``
and a ``<ihc>_pointmap.npz`` beside every IHC slide: :mod:`cscvision.synth.ihc_truth`).
``cscvision labels ihc`` (every setting at its default) labels T; the label tables are
scored against T's region truth (tile AUROC, excluded tiles against the truth); then
``cscvision train`` with ``configs/cpu_demo.yaml`` learns from them alone (no annotation
is read; 3/4 of T's patients train, 1/4 validate) and the model is scored on H's H&E
slides, which it never saw, against their region truth (tile AUROC per target).
``--baseline`` trains the same config, split and epochs a second time on T's own region
annotations (the annotation road, ``T/cohort.csv``: the generator's truth) and scores it
on H the same way: what the tiles alone allow, so a low figure can be told apart from
labels that cost accuracy. Synthetic data only, unless you bring yours.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_ihc import BITS, pointmap_path, score_labels

from cscvision.cli import main as cli
from cscvision.cli.labels_ihc import read_manifest
from cscvision.synth.ihc_truth import read_point_map

ROOT = Path(__file__).resolve().parents[1]


def tile_region_truth(pm: dict, xy_l0: np.ndarray, tile_l0: float, bit: int) -> np.ndarray:
    """A tile is positive when ≥ half of its tissue points lie in the target's regions."""
    step_px = float(pm["step_um"]) / float(pm["he_mpp"])
    out = np.zeros(len(xy_l0), bool)
    for i, (x, y) in enumerate(xy_l0):
        rs = slice(int(y / step_px), int((y + tile_l0) / step_px))
        cs = slice(int(x / step_px), int((x + tile_l0) / step_px))
        tissue = pm["he_tissue"][rs, cs] > 0
        out[i] = tissue.any() and ((pm["region"][rs, cs] & bit) > 0)[tissue].mean() >= 0.5
    return out


def train_and_score(cohort: Path, args, name: str, held: dict) -> tuple[dict, dict]:
    """Train ``configs/cpu_demo.yaml`` on ``cohort`` (3/4 of its patients train, 1/4
    validate, seed as the config) into ``args.out/name``; each target's region truth and
    probabilities on the held-out cohort's H&E slides."""
    from cscvision.inference.predict import predict_slide
    from cscvision.training.config import load_config
    from cscvision.training.export import load_model
    from cscvision.training.train import train

    cfg = load_config(ROOT / "configs" / "cpu_demo.yaml", [
        f"cohort.csv={cohort}", "cohort.split_fractions=[0.75, 0.25, 0.0]",
        f"run_dir={args.out / name / 'run'}", f"export_dir={args.out / name / 'model'}",
        f"trainer.max_epochs={args.epochs}", f"name={name}",
        f"card.trained_on=synthetic slides labelled from {name.replace('_', ' ')}",
    ])  # fmt: skip
    model = load_model(train(cfg).model_dir)
    ys: dict = {t: [] for t in BITS}
    ps: dict = {t: [] for t in BITS}
    for entry in held.values():
        pm = read_point_map(pointmap_path(entry["pairs"][0][1]))
        pred = predict_slide(entry["slide_path"], model)
        for j, target in enumerate(pred.targets):
            ys[target].append(tile_region_truth(pm, pred.grid.xy_l0, pred.grid.plan.tile_l0,
                                                BITS[target]))  # fmt: skip
            ps[target].append(pred.probs[:, j])
    return ys, ps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("train_cohort", type=Path)
    ap.add_argument("heldout_cohort", type=Path)
    ap.add_argument("--out", type=Path, default=Path("eval_ihc_train"))
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--baseline", action="store_true",
                    help="also train on the training cohort's region annotations")  # fmt: skip
    args = ap.parse_args()
    t0 = time.perf_counter()
    labels = args.out / "labels"
    markers = ROOT / "configs" / "ihc_markers.yaml"
    cli(["labels", "ihc", str(args.train_cohort / "ihc_manifest.csv"), "--markers",
         str(markers), "--out", str(labels), "--overwrite"])  # fmt: skip
    lab = score_labels(read_manifest(args.train_cohort / "ihc_manifest.csv"), labels, 0.6)
    held = read_manifest(args.heldout_cohort / "ihc_manifest.csv")
    scored = {"IHC labels": train_and_score(labels / "cohort.csv", args, "ihc_labels", held)}
    if args.baseline:
        scored["T's region annotations (baseline)"] = train_and_score(
            args.train_cohort / "cohort.csv", args, "annotations", held
        )
    print(f"\nlabels of {len(read_manifest(args.train_cohort / 'ihc_manifest.csv'))} slides, "
          f"training and scoring took {time.perf_counter() - t0:.0f} s")  # fmt: skip
    for t, (auc, pos, n) in lab["auroc"].items():
        print(f"IHC-derived {t} labels: tile AUROC {auc:.3f} vs region truth ({pos} positive "
              f"of {n} valid tiles)")  # fmt: skip
    e = lab["excluded"]
    print(f"excluded tiles: tool {e['tool']}, truth {e['truth']}, both {e['both']} "
          f"(of {e['tiles']} tiles)")  # fmt: skip
    for name, (ys, ps) in scored.items():
        for target in BITS:
            y, p = np.concatenate(ys[target]), np.concatenate(ps[target])
            print(f"model trained on {name}, held-out H&E tile AUROC {target}: "
                  f"{roc_auc_score(y, p):.3f} ({y.sum()} positive of {len(y)} tiles, "
                  f"{len(held)} unseen slides)")  # fmt: skip


if __name__ == "__main__":
    main()

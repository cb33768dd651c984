"""How well a MIL model's OOD record (its tile embeddings, :mod:`cscvision.training.mil_ood`)
tells new slides apart, on synthetic slides whose group is known by construction.

Trains a MIL model with ``cscvision train`` (kind mil, encoder ``demo-cnn``: the committed
demo model's CNN without its head) on ``--slides`` synthetic slides of ``--patients``
patients, then runs ``cscvision infer`` with it on four groups, each into its own folder:

- ``train``: the model's own slides (its thresholds come from them, cross-fitted by patient);
- ``id``: new slides of the same generator (new seed, new patients): should not be flagged;
- ``unseen``: adipose-like tissue the model never saw (:mod:`cscvision.synth.unseen`, the
  generator's stain model);
- ``swapped``: the ``id`` slides with their colour channels rotated (RGB → BRG), a stain far
  from any training slide;
- ``real``: ``../shared/data/cmu_small_region.svs`` (a real H&E section, not synthetic).

Prints per group the slides flagged and each slide's share of tiles beyond the threshold,
and the tile AUROC of the ``ood`` ratio of each group against the ``id`` tiles.

    nice -n 5 .venv/bin/python scripts/eval_mil_ood.py --work mil_ood_eval \
        [--architecture gated_attention|instance_linear|clam_sb] [--slides 12 --patients 6]

How it could fool you: the groups are made here (one texture of unseen tissue, one colour
transform, one real slide), the synthetic patients differ only in the generator's stain
and layout draws, and a few slides per group give wide intervals.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import tifffile
from sklearn.metrics import roc_auc_score

from cscvision.cli import main as cli
from cscvision.synth import write_cohort
from cscvision.synth.slide_labels import write_slide_labels
from cscvision.synth.unseen import adipose_rgb
from cscvision.testing import write_pyramid

ROOT = Path(__file__).resolve().parents[1]
DEMO_WEIGHTS = ROOT / "models" / "demo-synthetic" / "model.safetensors"
REAL = ROOT.parent / "shared" / "data" / "cmu_small_region.svs"
CONFIG = """name: mil-ood-eval
seed: 0
threads: 2
task: mil
run_dir: {work}/run
export_dir: {work}/model
cohort: {{csv: {cohort}}}
model: {{encoder: demo-cnn, weights: {weights}}}
data: {{batch_size: 32, num_workers: 0}}
mil:
  labels: {labels}
  targets: {targets}
  architecture: {architecture}
  epochs: {epochs}
cv: {{folds: 0}}
card: {{synthetic: true}}
"""


def train(work: Path, args: argparse.Namespace) -> Path:
    model = work / "model"
    if (model / "model.json").is_file():
        return model
    cohort = write_cohort(work / "cohort", n_slides=args.slides, n_patients=args.patients,
                          size_px=args.size, seed=3, region_share=(0.02, 0.5))  # fmt: skip
    labels = write_slide_labels(cohort, noise_sd=0.02, seed=3)
    targets = '[stemness_fraction, "stemness_fraction:tercile"]'
    if args.architecture == "instance_linear":
        targets = "[stemness_fraction]"
    config = work / "mil.yaml"
    text = CONFIG.format(
        work=work, cohort=cohort, weights=DEMO_WEIGHTS, labels=labels, targets=targets,
        architecture=args.architecture, epochs=args.epochs,
    )  # fmt: skip
    config.write_text(text)
    if cli(["train", "--config", str(config), "--quiet"]) != 0:
        raise SystemExit("training failed")
    return model


def groups(work: Path, size: int) -> dict[str, list[Path]]:
    made = {"train": sorted((work / "cohort").glob("*.tiff"))}
    new = work / "id"
    if not (new / "cohort.csv").is_file():
        write_cohort(new, n_slides=4, n_patients=2, size_px=size, seed=101)
    made["id"] = sorted(new.glob("*.tiff"))
    made["unseen"], made["swapped"] = [], []
    for i in range(2):
        path = work / "unseen" / f"ADIPOSE-{i}.tiff"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_pyramid(path, adipose_rgb(size, 500 + i)[0], mpp=0.5)
        made["unseen"].append(path)
    for slide in made["id"]:
        path = work / "swapped" / f"BRG-{slide.stem}.tiff"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            rgb = tifffile.imread(slide, key=0)
            write_pyramid(path, np.ascontiguousarray(rgb[..., [2, 0, 1]]), mpp=0.5)
        made["swapped"].append(path)
    made["real"] = [REAL] if REAL.is_file() else []
    return made


def infer(model: Path, slides: list[Path], out: Path) -> dict[str, tuple[dict, np.ndarray]]:
    args = ["infer", *map(str, slides), "--model", str(model), "--out", str(out)]
    cli([*args, "--workers", "0", "--threads", "2"])
    found = {}
    for slide in slides:
        folder = out / slide.stem
        if (folder / "summary.json").is_file():
            block = json.loads((folder / "summary.json").read_text()).get("ood") or {}
            rows = csv.DictReader((folder / "tiles.csv").open())
            found[slide.stem] = (block, np.array([float(r["ood"]) for r in rows]))
    return found


def report(results: dict[str, dict[str, tuple[dict, np.ndarray]]], card: dict) -> None:
    ood = card["ood"]
    print(f"record: {ood['features']}, {ood['dim']} dims, {ood['train_tiles']} training tiles, "
          f"tile threshold {ood['tile_threshold']:.4g}, slide share threshold "
          f"{ood['slide_share_threshold']:.0%}")  # fmt: skip
    reference = np.concatenate([r for _, r in results["id"].values()])
    for group, slides in results.items():
        flagged = [s for s, (b, _) in slides.items() if b.get("out_of_distribution")]
        shares = ", ".join(
            f"{s} {b.get('share_beyond_p99', 0):.0%}" for s, (b, _) in slides.items()
        )
        ratio = np.concatenate([r for _, r in slides.values()]) if slides else np.zeros(0)
        auroc = ""
        if group != "id" and len(ratio):
            y = np.r_[np.zeros(len(reference)), np.ones(len(ratio))]
            auroc = f"; tile AUROC vs id {roc_auc_score(y, np.r_[reference, ratio]):.3f}"
        median = f"{np.median(ratio):.3f}" if len(ratio) else "-"
        print(f"{group}: {len(flagged)} of {len(slides)} flagged, median ratio {median}"
              f"{auroc} ({shares})")  # fmt: skip


def run(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--architecture", default="gated_attention",
                   choices=("gated_attention", "clam_sb", "mean", "instance_linear"))  # fmt: skip
    p.add_argument("--slides", type=int, default=12)
    p.add_argument("--patients", type=int, default=6)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=10)
    args = p.parse_args(argv)
    work = args.work.resolve() / args.architecture
    model = train(work, args)
    made = groups(work, args.size)
    results = {g: infer(model, slides, work / "infer" / g) for g, slides in made.items() if slides}
    report(results, json.loads((model / "model.json").read_text()))


if __name__ == "__main__":
    run()

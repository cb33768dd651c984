"""Held-out tile AUROC of a head trained on stored features, on a synthetic cohort.

Writes the demo cohort (``cscvision synth``: 16 slides of 8 patients, 4096 px), extracts
features with ``cscvision features`` and trains a head with ``cscvision train`` and
``configs/cpu_head_demo.yaml`` (patients split 4 / 2 / 2), then prints the test AUROC per
target. The default encoder, ``demo-cnn``, is the feature layers of the committed demo model
(trained on synthetic slides of the seed-0 cohort with the same patient split, so its test
patients are unseen by encoder and head; with ``--seed 1`` every slide is new to both).

    .venv/bin/python scripts/proof_heads.py --work /tmp/proof_heads
    .venv/bin/python scripts/proof_heads.py --work /tmp/proof_heads --encoder test-vit-tiny
    .venv/bin/python scripts/proof_heads.py --work /tmp/proof_heads --finetune-blocks 2 --epochs 8

With ``--finetune-blocks N`` no features are stored: the encoder's last N blocks train with
the head on tile images (``model.finetune_blocks``).

Synthetic data only: this tests the pipeline, not any encoder on real tissue.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cscvision.cli import main as cli
from cscvision.models.encoders import save_random_weights
from cscvision.synth import write_cohort
from cscvision.training.config import load_config
from cscvision.training.train import train

ROOT = Path(__file__).resolve().parents[1]


def run(args: argparse.Namespace) -> dict[str, float]:
    work = args.work / f"seed{args.seed}"
    cohort = write_cohort(
        work / "cohort", n_slides=16, n_patients=8, size_px=4096, seed=args.seed, workers=2
    )
    weights = args.weights
    if weights is None and args.encoder == "test-vit-tiny":
        weights = save_random_weights(args.encoder, work / "test-vit-tiny.safetensors")
    weights = weights or ROOT / "models" / "demo-synthetic" / "model.safetensors"
    features = work / f"features_{args.encoder}"
    start = time.perf_counter()
    if not args.finetune_blocks:
        flags = ["--encoder", args.encoder, "--weights", str(weights), "--out", str(features)]
        assert cli(["features", str(cohort), *flags, "--threads", "1", "--workers", "1"]) == 0
    extracted = time.perf_counter() - start
    name = f"{args.encoder}_{args.head}"
    if args.finetune_blocks:
        name += f"_ft{args.finetune_blocks}"
    overrides = [
        f"cohort.csv={cohort}",
        f"model.encoder={args.encoder}",
        f"model.weights={weights}",
        f"model.head={args.head}",
        f"model.features_dir={features}",
        f"model.finetune_blocks={args.finetune_blocks}",
        f"run_dir={work / f'run_{name}'}",
        f"export_dir={work / f'model_{name}'}",
        *([f"trainer.max_epochs={args.epochs}"] if args.epochs else []),
    ]
    cfg = load_config(ROOT / "configs" / "cpu_head_demo.yaml", overrides)
    start = time.perf_counter()
    result = train(cfg, resume=False, progress=False)
    test = result.metrics["test"]
    tiles = {s: c["tiles"] for s, c in result.summary.items()}
    trained = time.perf_counter() - start
    how = f", last {args.finetune_blocks} block(s) fine-tuned" if args.finetune_blocks else ""
    print(f"\n{args.encoder} + {args.head} head{how}, cohort seed {args.seed}: features")
    print(f"  {extracted:.0f} s, training {trained:.0f} s; tiles {tiles}")
    for target in ("stemness", "immunosuppressive"):
        print(f"  held-out tile AUROC {target}: {test[f'auroc_{target}']:.3f}")
    return test


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("proof_heads"))
    p.add_argument("--seed", type=int, default=0, help="synthetic cohort seed")
    p.add_argument("--encoder", default="demo-cnn")
    p.add_argument("--weights", type=Path, default=None)
    p.add_argument("--head", default="linear", choices=("linear", "mlp"))
    p.add_argument("--finetune-blocks", type=int, default=0, help="model.finetune_blocks")
    p.add_argument("--epochs", type=int, default=None, help="trainer.max_epochs")
    run(p.parse_args())


if __name__ == "__main__":
    main()

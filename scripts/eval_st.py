"""Spatial transcriptomics end to end on synthetic Visium: synth → labels st → train (regression).

Prints, per target, the Pearson and Spearman correlation of predicted and measured panel
scores on the spots of held-out (test) patients, with the bootstrap 95 % CI over patients.
Synthetic data only: this checks the pipeline, not the biology.

    python scripts/eval_st.py --out /tmp/eval_st            # defaults below
    python scripts/eval_st.py --out /tmp/eval_st_head --encoder demo-cnn \
        --weights models/demo-synthetic/model.safetensors    # a linear head on stored features

With ``--encoder`` the spot tiles are cut at the encoder's tile size and µm/px (they replace
``--tile-px`` and ``--mpp``) and a head is trained on the encoder's stored features.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def sh(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cscvision", *args], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/eval_st"))
    ap.add_argument("--slides", type=int, default=16)
    ap.add_argument("--patients", type=int, default=16)
    ap.add_argument("--size", type=int, default=4096, help="slide side, level-0 px (0.5 µm/px)")
    ap.add_argument("--tile-px", type=int, default=56, help="tile side at --mpp (112 µm)")
    ap.add_argument("--mpp", type=float, default=2.0)
    ap.add_argument("--epochs", type=int, default=24)
    ap.add_argument("--loss", default="mse", choices=("mse", "pearson"))
    ap.add_argument("--augment", default="histo", help="data.augment preset")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--encoder", help="train a head on this encoder's features (registry name)")
    ap.add_argument("--weights", type=Path, help="the encoder's local weights file")
    ap.add_argument("--head", default="linear", choices=("linear", "mlp"))
    args = ap.parse_args()
    model = ["model.backbone=small_cnn", "optim.lr=0.003", "optim.scheduler=onecycle"]
    if args.encoder:
        from cscvision.models.registry import get_encoder_spec

        if args.weights is None:
            ap.error("--encoder needs --weights FILE")
        spec = get_encoder_spec(args.encoder)
        args.tile_px, args.mpp = spec.tile_px, spec.mpp
        model = [
            f"model.encoder={args.encoder}",
            f"model.weights={args.weights.resolve()}",
            f"model.head={args.head}",
            f"model.features_dir={args.out / 'features'}",
            "optim.lr=0.01",
            "optim.scheduler=cosine",
            "trainer.precision=32-true",
        ]
    t0 = time.perf_counter()
    cohort = args.out / "cohort"
    if not (cohort / "cohort.csv").exists():
        sh(
            "synth",
            "--out",
            str(cohort),
            "--slides",
            str(args.slides),
            "--patients",
            str(args.patients),
            "--size",
            str(args.size),
            "--seed",
            str(args.seed),
            "--visium",
        )
    panels = args.out / "panels.yaml"
    panels.write_text(f"tile_px: {args.tile_px}\nmpp: {args.mpp}\n")
    labels = args.out / "labels"
    sh(
        "labels",
        "st",
        str(cohort / "cohort.csv"),
        "--panels",
        str(panels),
        "--out",
        str(labels),
        "--overwrite",
    )
    run = args.out / "run"
    sh(
        "train",
        f"cohort.csv={labels / 'cohort.csv'}",
        "task=regression",
        "name=eval_st",
        f"run_dir={run}",
        f"export_dir={args.out / 'model'}",
        f"grid.mpp={args.mpp}",
        f"grid.tile_px={args.tile_px}",
        "grid.mask_mpp=8.0",
        *model,
        "cohort.split_fractions=[0.5,0.25,0.25]",
        f"regression.loss={args.loss}",
        f"threads={args.threads}",
        "data.num_workers=1",
        "data.batch_size=64",
        f"data.augment={args.augment}",
        f"trainer.max_epochs={args.epochs}",
        "trainer.accelerator=cpu",
        "card.synthetic=true",
        "--no-resume",
    )
    metrics = json.loads((run / "metrics.json").read_text())["test"]
    n_patients, n_tiles = int(metrics["n_groups"]), int(metrics["n_tiles"])
    what = f"a {args.head} head on {args.encoder} features" if args.encoder else "small_cnn"
    print(f"\n{what}; held-out test patients: {n_patients}, spot tiles: {n_tiles}")
    for target in ("stemness", "immunosuppressive"):
        r, rho = metrics[f"pearson_{target}"], metrics[f"spearman_{target}"]
        lo, hi = metrics.get(f"pearson_{target}_ci_low"), metrics.get(f"pearson_{target}_ci_high")
        ci = f" (95 % CI over patients {lo:.3f}-{hi:.3f})" if lo is not None else ""
        print(f"{target:18s} Pearson {r:.3f}{ci}, Spearman {rho:.3f}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

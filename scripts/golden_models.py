"""Write a golden set of command outputs, one model of each kind, for refactor checks.

    python scripts/golden_models.py OUT [--quick]
    python scripts/golden_compare.py OUT_BEFORE OUT_AFTER

OUT receives two synthetic cohorts (the demo cohort, and a small one with paired IHC,
Visium and slide labels), one model of each kind trained one epoch (tile CNN on the demo
cohort; head on encoder features, fine-tuned encoder blocks and attention MIL on the small
one) and the outputs of `tile`, `features`, `labels ihc`, `labels st`, `mil`, `infer` (each
kind), `stats` and `report`. Everything is seeded and single-threaded, so two runs on one
machine give the same bytes except timing fields and the paths under OUT
(`golden_compare.py` ignores those). Synthetic data only; a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGED_WEIGHTS = ROOT / "cscvision" / "resources" / "models" / "demo-synthetic"  # demo-cnn
DEMO_WEIGHTS = Path()  # the demo-cnn encoder file, copied under OUT by main()
CLASSES = """classes:
  targets:
    stemness: [Stemness-rich]
    immunosuppressive: [Immunosuppressive]
  ignore: [Tumor, Necrosis]
  exclude: [Pen mark, Fold, Bubble, Out of focus]
"""


def cli(*args: object) -> None:
    """Run one `cscvision` command in a fresh process (as a user would), stop on failure."""
    argv = [sys.executable, "-m", "cscvision", *map(str, args)]
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    print(f"{time.perf_counter() - t0:6.1f} s  cscvision {' '.join(map(str, args[:2]))}")
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(argv)}\n{done.stdout}\n{done.stderr}")


def write_config(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def cohorts(out: Path) -> tuple[Path, Path]:
    demo = out / "demo_cohort"
    small = out / "small_cohort"
    if (small / "cohort.csv").exists():  # --resume: the cohorts are written
        return demo / "cohort.csv", small / "cohort.csv"
    cli("synth", "--out", demo, "--slides", 16, "--patients", 8, "--size", 4096, "--seed", 0,
        "--workers", 2)  # fmt: skip
    extra = ("--ihc", "--visium", "--slide-labels", "--region-share", 0.02, 0.5, "--workers", 2)
    cli("synth", "--out", small, "--slides", 4, "--patients", 4, "--size", 4096, "--seed", 5,
        *extra)  # fmt: skip
    return demo / "cohort.csv", small / "cohort.csv"


def train_models(out: Path, demo_csv: Path, small_csv: Path) -> dict[str, Path]:
    models = {}
    common = f"seed: 0\nthreads: 1\n{CLASSES}card: {{synthetic: true}}\n"
    cli("train", "--config", "cpu_demo", f"cohort.csv={demo_csv}", "trainer.max_epochs=1",
        "data.max_tiles_per_slide=100", "trainer.precision=32-true",
        "--run-dir", out / "runs" / "cnn", "--export", out / "models" / "cnn",
        "--quiet")  # fmt: skip
    models["cnn"] = out / "models" / "cnn"
    head = write_config(
        out / "head.yaml",
        f"""name: golden_head
{common}cohort: {{csv: {small_csv}, split_fractions: [0.5, 0.25, 0.25]}}
grid: {{mask_mpp: 8.0}}
data: {{batch_size: 64, num_workers: 0, balance: pos_weight}}
model: {{encoder: demo-cnn, weights: {DEMO_WEIGHTS}, head: mlp, features_dir: {out / "features"}}}
optim: {{lr: 0.003, scheduler: cosine}}
trainer: {{max_epochs: 1, accelerator: cpu, precision: 32-true}}
""",
    )
    cli("train", "--config", head, "--run-dir", out / "runs" / "head",
        "--export", out / "models" / "head", "--quiet")  # fmt: skip
    models["head"] = out / "models" / "head"
    tune = write_config(
        out / "finetune.yaml",
        f"""name: golden_finetune
{common}cohort: {{csv: {small_csv}, split_fractions: [0.5, 0.25, 0.25]}}
grid: {{mask_mpp: 8.0}}
data: {{batch_size: 32, num_workers: 0, balance: pos_weight, max_tiles_per_slide: 64,
        augment: flips}}
model: {{encoder: demo-cnn, weights: {DEMO_WEIGHTS}, head: linear, finetune_blocks: 1}}
optim: {{lr: 0.003, scheduler: cosine}}
trainer: {{max_epochs: 1, accelerator: cpu, precision: 32-true}}
""",
    )
    cli("train", "--config", tune, "--run-dir", out / "runs" / "finetune",
        "--export", out / "models" / "finetune", "--quiet")  # fmt: skip
    models["finetune"] = out / "models" / "finetune"
    mil = write_config(
        out / "mil.yaml",
        f"""name: golden_mil
seed: 0
threads: 1
task: mil
cohort: {{csv: {small_csv}}}
model: {{encoder: demo-cnn, weights: {DEMO_WEIGHTS}, features_dir: {out / "features"}}}
data: {{batch_size: 32, num_workers: 0}}
mil:
  labels: {small_csv.parent / "slide_labels.csv"}
  targets: [stemness_fraction, "stemness_fraction:tercile"]
  architecture: gated_attention
  epochs: 1
cv: {{folds: 2}}
card: {{synthetic: true}}
""",
    )
    cli("train", "--config", mil, "--run-dir", out / "runs" / "mil",
        "--export", out / "models" / "mil", "--quiet")  # fmt: skip
    models["mil"] = out / "models" / "mil"
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the golden set (must not exist)")
    parser.add_argument("--resume", action="store_true", help="go on in an existing OUT")
    args = parser.parse_args()
    out = args.out.resolve()
    if out.exists() and not args.resume:
        sys.exit(f"{out} exists; give a new folder")
    t0 = time.perf_counter()
    global DEMO_WEIGHTS  # under OUT, so every path a card records is under OUT
    DEMO_WEIGHTS = out / "encoder" / "model.safetensors"
    DEMO_WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PACKAGED_WEIGHTS / "model.safetensors", DEMO_WEIGHTS)
    for name in ("ihc_markers.yaml", "st_panels.yaml"):  # copies under OUT, as the weights
        shutil.copyfile(ROOT / "cscvision" / "resources" / "configs" / name, out / name)
    import cscvision

    print(f"cscvision {cscvision.__version__} from {Path(cscvision.__file__).parent}")
    demo_csv, small_csv = cohorts(out)
    small = small_csv.parent
    slide = small / "SYN-P001-S01.tiff"
    demo_slide = demo_csv.parent / "SYN-P002-S01.tiff"
    cli("tile", demo_slide, slide, "--out", out / "tile")
    cli("features", slide, "--encoder", "demo-cnn", "--weights", DEMO_WEIGHTS,
        "--out", out / "features_cli", "--workers", 0, "--threads", 1)  # fmt: skip
    cli("labels", "ihc", small / "ihc_manifest.csv", "--markers", out / "ihc_markers.yaml",
        "--out", out / "labels_ihc")  # fmt: skip
    cli("labels", "st", small_csv, "--panels", out / "st_panels.yaml", "--out", out / "labels_st")
    models = train_models(out, demo_csv, small_csv)
    cli("mil", small_csv, "--labels", small / "slide_labels.csv", "--features", out / "features",
        "--out", out / "mil_cli", "--target", "stemness_fraction", "--folds", 2,
        "--epochs", 1)  # fmt: skip
    flags = ("--workers", 0, "--threads", 1, "--permutations", 19, "--no-prefetch")
    for kind, model in models.items():
        slides = (demo_slide,) if kind == "cnn" else (slide,)
        cli("infer", *slides, "--model", model, "--out", out / "infer" / kind, *flags)
    cli("infer", demo_slide, "--model", "demo", "--out", out / "infer" / "demo", *flags)
    cli("stats", out / "infer" / "cnn")
    cli("report", out / "infer" / "cnn", "--model", models["cnn"], "--run", out / "runs" / "cnn")
    print(f"golden set in {out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()

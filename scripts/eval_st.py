"""Spatial transcriptomics end to end on synthetic Visium: synth → labels st → train (regression).

Prints, per target, the Pearson and Spearman correlation of predicted and measured panel
scores on the spots of held-out (test) patients, with the bootstrap 95 % CI over patients.
Synthetic data only: this checks the pipeline, not the biology.

    python scripts/eval_st.py --out /tmp/eval_st            # defaults below
    python scripts/eval_st.py --out /tmp/eval_st_head --encoder demo-cnn \
        --weights models/demo-synthetic/model.safetensors    # a linear head on stored features

With ``--encoder`` the spot tiles are cut at the encoder's tile size and µm/px (they replace
``--tile-px`` and ``--mpp``) and a head is trained on the encoder's stored features.

Then, against the truth: per target, the Pearson of the held-out spots' predicted score with
each spot's TRUE region fraction, beside the measured panel score's own (the label's
ceiling). The truth is synth's ``<id>_visium/spot_truth.csv``, or with ``--cohort DIR`` (a
cohort made elsewhere: ``DIR/cohort.csv`` with ``st_path``, no synth) the layout
``DIR/truth/spots/<slide_id>.csv`` (docs: reference/truth-layout.md). ``--write-truth``
writes the synthetic cohort's truth in that layout, so ``--cohort`` can score it too:

    python scripts/eval_st.py --out /tmp/eval_st --write-truth
    python scripts/eval_st.py --out /tmp/eval_st_ext --cohort /tmp/eval_st/cohort
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _truth import TARGETS, layout_spot_truth, pearson, synth_spot_truth, write_synth_truth

from cscvision.labels.cohort import read_splits


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
    ap.add_argument(
        "--cohort",
        type=Path,
        help="score a cohort made elsewhere: DIR/cohort.csv (slide_id,patient_id,slide_path,"
        "st_path) and DIR/truth/spots/<slide_id>.csv (no synth; docs: reference/truth-layout)",
    )
    ap.add_argument(
        "--write-truth",
        action="store_true",
        help="write the synthetic cohort's truth in the layout --cohort reads (cohort/truth/)",
    )
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
    cohort = args.cohort or args.out / "cohort"
    if args.cohort is None and not (cohort / "cohort.csv").exists():
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
    args.out.mkdir(parents=True, exist_ok=True)
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
    if args.write_truth and args.cohort is None:
        print(f"wrote the truth layout to {write_synth_truth(cohort / 'cohort.csv')}")
    truth_of = layout_spot_truth(cohort) if args.cohort else synth_spot_truth(cohort / "cohort.csv")
    test_ids = sorted(s for s, split in read_splits(run / "splits.csv").items() if split == "test")
    preds = predict_spots(args.out / "model", labels, cohort / "cohort.csv", test_ids)
    where = f"{cohort}/truth/spots" if args.cohort else "synth's spot_truth.csv"
    print_truth_figures(spot_truth_figures(labels, test_ids, truth_of, preds), where)
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


def predict_spots(model_dir: Path, labels: Path, cohort_csv: Path, slide_ids: list[str]) -> dict:
    """The exported model's scores of each slide's spot tiles, in its label table's order."""
    import dataclasses

    from cscvision.inference.predict import predict_tiles
    from cscvision.labels.cohort import read_cohort
    from cscvision.labels.table import read_label_table, table_path
    from cscvision.models.export import load_model
    from cscvision.slides.grid import GridSpec, make_grid
    from cscvision.slides.slide import open_slide

    model, entries = load_model(model_dir), {e.slide_id: e for e in read_cohort(cohort_csv)}
    out = {}
    for sid in slide_ids:
        table = read_label_table(table_path(labels, sid))
        with open_slide(entries[sid].slide_path) as slide:
            grid = make_grid(slide, GridSpec(mpp=table.mpp, tile_px=table.tile_px, min_tissue=0))
        xy = table.xy_l0.astype(np.int64)
        grid = dataclasses.replace(
            grid, slide_id=sid, xy_l0=xy, tissue=np.ones(len(xy), np.float32)
        )
        scores = predict_tiles(grid, model, progress=False)
        out[sid] = scores[:, [list(model.card.targets).index(t) for t in TARGETS]]
    return out


def spot_truth_figures(labels: Path, slide_ids, truth_of, predictions=None) -> dict:
    """Pooled over the spots of ``slide_ids``, per target: Pearson of the measured panel
    score (the label) and, given ``predictions`` ({slide id: float[N, T] in label-table
    order}), of the model's score with each spot's true fraction; and the spots scored."""
    from cscvision.labels.table import read_label_table, table_path

    label, truth, pred = [], [], []
    for sid in slide_ids:
        table = read_label_table(table_path(labels, sid))
        barcodes = table.provenance["barcodes"]
        known = truth_of(sid)
        rows = known.lookup(barcodes)
        truth.append(np.column_stack([rows[:, known.targets.index(t)] for t in TARGETS]))
        label.append(table.values[:, [table.targets.index(t) for t in TARGETS]])
        if predictions is not None:
            pred.append(predictions[sid])
    truth_all, label_all = np.concatenate(truth), np.concatenate(label)
    pred_all = np.concatenate(pred) if pred else None
    figures = {}
    for j, t in enumerate(TARGETS):
        figures[t] = {
            "spots": int(np.isfinite(truth_all[:, j]).sum()),
            "label": pearson(label_all[:, j], truth_all[:, j]),
            "model": pearson(pred_all[:, j], truth_all[:, j]) if pred_all is not None else None,
        }
    return figures


def print_truth_figures(figures: dict, where: str) -> None:
    print(f"against the TRUE spot fractions ({where}), held-out spots:")
    for t, f in figures.items():
        model = "" if f["model"] is None else f"model {f['model']:.3f}, "
        print(f"{t:18s} Pearson {model}measured panel score {f['label']:.3f} ({f['spots']} spots)")


if __name__ == "__main__":
    sys.exit(main())

"""MIL on a synthetic cohort (by default instance_linear, the slide label being a fraction):
slide labels only, 5-fold CV over patients.

Writes ``--slides`` small synthetic slides of ``--patients`` patients, their slide labels
(true stemness-rich fraction of tissue + noise, :mod:`cscvision.synth.slide_labels`),
and one feature store per slide. The test encoder is the registered ``demo-cnn``: the
committed demo model's small CNN with its head removed (128-d pooled features) — a CNN
that has seen synthetic slides, standing in for a foundation model, as the encoder issue
allows. Bags are every tile with ``--min-tissue`` tissue (bulk labels measure the whole
section, so the default keeps tiles at the tissue's edge). Prints pooled cross-validated
Pearson/Spearman/R² with bootstrap CIs over patients, and how well held-out per-tile
contributions and attention rank the truly stemness-rich tiles (AUROC against the
ground-truth tile targets).

    .venv/bin/python scripts/eval_mil.py [--slides 200 --patients 100 --size 2048] [--cache DIR]

Synthetic data only: these figures test the method and the plumbing, not biology.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cscvision.core.io import file_sha256
from cscvision.features.extract import (
    ExtractSettings,
    FeatureExtractor,
    encoder_grid_spec,
    extract_slide,
)
from cscvision.features.store import read_feature_store
from cscvision.labels.annotations import DEFAULT_CLASS_MAP, read_annotations
from cscvision.labels.cohort import read_cohort
from cscvision.labels.slide_table import parse_targets, read_slide_labels
from cscvision.labels.targets import tile_targets
from cscvision.models.encoders import load_encoder
from cscvision.slides.grid import make_grid
from cscvision.slides.slide import open_slide
from cscvision.synth import write_cohort
from cscvision.synth.slide_labels import write_slide_labels
from cscvision.training.mil import ARCHITECTURES, Bag, MILConfig
from cscvision.training.mil_cv import cross_validate

ROOT = Path(__file__).resolve().parents[1]


def demo_encoder() -> FeatureExtractor:
    """The registered test encoder ``demo-cnn``: the committed demo model's small CNN
    without its head (128-d), loaded as ``cscvision train`` (task mil) loads it."""
    weights = ROOT / "models" / "demo-synthetic" / "model.safetensors"
    encoder = load_encoder("demo-cnn", weights)
    return FeatureExtractor(encoder, weights_sha256=file_sha256(weights))


def extract(slide_path: Path, out: Path, extractor, min_tissue: float):
    """The slide's feature store (every tissue tile at the encoder's grid) and its grid."""
    settings = ExtractSettings(min_tissue=min_tissue, workers=0)
    store = extract_slide(slide_path, extractor, out, settings, progress=False)
    with open_slide(slide_path) as slide:
        spec = dataclasses.replace(encoder_grid_spec(extractor.spec), min_tissue=min_tissue)
        grid = make_grid(slide, spec)
    assert np.array_equal(grid.xy_l0, store.xy_l0)
    return store, grid


def tile_truth(entry, grid, slide_path: Path) -> np.ndarray:
    """Ground-truth soft stemness target of each tile (fraction of its tissue)."""
    from cscvision.slides.grid import detect_tissue
    from cscvision.slides.tissue import DEFAULT_MASK_MPP

    with open_slide(slide_path) as slide:
        _, mask = detect_tissue(slide, DEFAULT_MASK_MPP)
        scale = mask.shape[1] / slide.info.dimensions[0]
    regions = read_annotations(entry.annotation_path)
    soft = tile_targets(
        regions,
        DEFAULT_CLASS_MAP,
        grid.xy_l0,
        grid.plan.tile_l0,
        tissue_mask=mask,
        mask_scale=scale,
    )
    return soft.targets[:, 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=200)
    ap.add_argument("--patients", type=int, default=100)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--accumulate", type=int, default=8, help="bags per optimiser step")
    ap.add_argument(
        "--max-bag",
        type=int,
        default=24,
        help="tiles sampled per training step: about half a small slide's bag, as 2,048 is a "
        "fraction of a real slide's (random sub-bags are the augmentation)",
    )
    ap.add_argument(
        "--architecture",
        choices=ARCHITECTURES,
        default="auto",
        help="auto (instance_linear, or gated_attention with --tercile), instance_linear, "
        "gated_attention, clam_sb (needs --tercile) or mean (every tile weighted 1/N)",
    )
    ap.add_argument(
        "--tercile",
        action="store_true",
        help="also train the stemness tercile (a classification target; clam_sb needs one)",
    )
    ap.add_argument("--cv-seed", type=int, default=None, help="seed of folds and weights")
    ap.add_argument(
        "--share",
        type=float,
        nargs=2,
        default=(0.02, 0.5),
        metavar=("LO", "HI"),
        help="range of each slide's stemness-rich share of tissue (synth --region-share)",
    )
    ap.add_argument(
        "--min-tissue",
        type=float,
        default=0.1,
        help="tissue fraction a tile needs to join its bag (bulk labels measure all tissue)",
    )
    ap.add_argument(
        "--cache", type=Path, help="keep the cohort, labels and features here and reuse them"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    encoder = demo_encoder()
    with tempfile.TemporaryDirectory() as tmp:
        if args.cache:
            tmp = str(
                args.cache / f"s{args.slides}-p{args.patients}-px{args.size}-seed{args.seed}"
                f"-share{args.share[0]}-{args.share[1]}-mt{args.min_tissue}"
            )
        bags, truth, entries, labels_csv = cohort_bags(args, Path(tmp), encoder)
        print(
            f"{len(bags)} slides of {args.patients} patients, {sum(len(b.features) for b in bags)}"
            f" tiles, features in {time.perf_counter() - start:.0f} s"
        )
        targets = ["stemness_fraction"] + (["stemness_fraction:tercile"] if args.tercile else [])
        labels = read_slide_labels(
            labels_csv, parse_targets(targets), [(e.slide_id, e.patient_id) for e in entries]
        )
        seed = args.seed if args.cv_seed is None else args.cv_seed
        cfg = MILConfig(
            architecture=args.architecture,
            epochs=args.epochs,
            hidden=64,
            attention=32,
            max_bag=args.max_bag,
            accumulate=args.accumulate,
            seed=seed,
        )
        result = cross_validate(bags, labels, cfg, k=args.folds, progress=print)
        baseline = mean_pool_baseline(bags, labels, result.folds)
    report(result, truth, args.folds)
    mil = result.pooled["pearson_stemness_fraction"]["value"]
    print(
        f"baseline, the same folds: ridge regression on mean-pooled features, pooled "
        f"Pearson {baseline:.4f} (the MIL's {mil:.4f}, difference {mil - baseline:+.4f}); "
        f"the mean of the tiles' true stemness vs the label: "
        f"{np.corrcoef([t.mean() for t in truth], labels.values['stemness_fraction'])[0, 1]:.3f}"
    )
    print(f"total {time.perf_counter() - start:.0f} s")


def mean_pool_baseline(bags, labels, folds: np.ndarray) -> float:
    """Pooled CV Pearson of ridge regression (alpha chosen inside each training fold) on
    each slide's mean feature vector: what MIL has to beat."""
    from sklearn.linear_model import RidgeCV

    x = np.stack([b.features.mean(0) for b in bags])
    y = labels.values["stemness_fraction"]
    pred = np.zeros_like(y)
    for f in np.unique(folds):
        train, test = folds != f, folds == f
        model = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(x[train], y[train])
        pred[test] = model.predict(x[test])
    return float(np.corrcoef(y, pred)[0, 1])


def cohort_bags(args, tmp: Path, encoder):
    """The synthetic cohort's bags, per-tile truth, entries and label table (reused from
    ``tmp`` when an earlier run with the same settings finished there)."""
    done = tmp / "bags.npz"
    csv = tmp / "cohort" / "cohort.csv"
    if done.exists():
        entries = read_cohort(csv)
        data = np.load(done)
        bags = [
            Bag(e.slide_id, data[f"f{i}"].astype(np.float32), data[f"xy{i}"])
            for i, e in enumerate(entries)
        ]
        truth = [data[f"t{i}"] for i in range(len(entries))]
        return bags, truth, entries, csv.parent / "slide_labels.csv"
    csv = write_cohort(
        tmp / "cohort",
        n_slides=args.slides,
        n_patients=args.patients,
        size_px=args.size,
        seed=args.seed,
        workers=2,
        region_share=tuple(args.share),
    )
    labels_csv = write_slide_labels(csv, noise_sd=0.02, seed=args.seed)
    entries = read_cohort(csv)
    stores = tmp / "features"
    bags, truth = [], []
    for e in entries:
        path = stores / f"{e.slide_id}.h5"
        _, grid = extract(e.slide_path, path, encoder, args.min_tissue)
        store = read_feature_store(path)  # as MIL reads it
        bags.append(Bag(e.slide_id, store.features.astype(np.float32), store.xy_l0))
        truth.append(tile_truth(e, grid, e.slide_path))
    arrays = {f"f{i}": b.features for i, b in enumerate(bags)}
    arrays |= {f"xy{i}": b.xy_l0 for i, b in enumerate(bags)}
    arrays |= {f"t{i}": t for i, t in enumerate(truth)}
    np.savez(done, **arrays)  # read back with np.load's default allow_pickle=False
    return bags, truth, entries, labels_csv


def report(result, truth, folds: int) -> None:
    for name, rec in result.pooled.items():
        lo, hi = rec["ci95"]
        print(f"pooled {folds}-fold CV {name}: {rec['value']:.3f} (95% CI {lo:.3f}–{hi:.3f})")
    from sklearn.metrics import roc_auc_score

    contrib, attn = [], []
    for pred, soft in zip(result.predictions, truth, strict=True):
        positive = soft >= 0.5
        if 0 < positive.mean() < 1:
            contrib.append(roc_auc_score(positive, pred.contributions[:, 0]))
            if np.ptp(pred.attention) > 0:  # mean pooling weighs every tile alike
                attn.append(roc_auc_score(positive, pred.attention))
    attention = f"{np.median(attn):.3f}" if attn else "n/a (mean pooling)"
    print(
        f"held-out tiles (soft stemness ≥ 0.5 positive), {len(contrib)} slides with both: "
        f"median AUROC per-tile contribution {np.median(contrib):.3f}, attention {attention}"
    )


if __name__ == "__main__":
    main()

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

Against the truth it also prints the pooled CV prediction's Pearson with each slide's TRUE
stemness-rich share of tissue, beside the label's own. The truth is the synthetic cohort's
own (``<id>_truth.json``, tiles from the GeoJSON), or with ``--cohort DIR`` (a cohort made
elsewhere: ``DIR/cohort.csv``, ``DIR/slide_labels.csv``, no synth) the layout
``DIR/truth/slides.csv`` and, for the per-tile AUROC, ``DIR/truth/tiles/<slide_id>.csv``
(docs: reference/truth-layout.md). ``--write-truth`` writes the synthetic cohort's truth
in that layout (tiles at the encoder's grid), so ``--cohort`` can score it too.

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
from _truth import layout_slide_truth, pearson, synth_slide_truth, write_synth_truth

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
from cscvision.labels.cohort_truth import read_tile_truth
from cscvision.labels.slide_table import parse_targets, read_slide_labels
from cscvision.labels.targets import tile_targets
from cscvision.models.encoders import load_encoder
from cscvision.slides.grid import make_grid
from cscvision.slides.slide import open_slide
from cscvision.synth import write_cohort
from cscvision.synth.slide_labels import SLIDE_LABELS, write_slide_labels
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
    ap.add_argument(
        "--cohort",
        type=Path,
        help="score a cohort made elsewhere: DIR/cohort.csv, DIR/slide_labels.csv and "
        "DIR/truth/ (no synth; docs: reference/truth-layout)",
    )
    ap.add_argument(
        "--write-truth",
        action="store_true",
        help="write the synthetic cohort's truth in the layout --cohort reads (cohort/truth/)",
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
            if args.cohort:
                tmp = str(args.cache / f"cohort-{args.cohort.resolve().name}-mt{args.min_tissue}")
        if args.cohort:
            bags, truth, entries = external_bags(args.cohort, Path(tmp), encoder, args.min_tissue)
            labels_csv, slide_truth = args.cohort / SLIDE_LABELS, layout_slide_truth(args.cohort)
        else:
            bags, truth, entries, labels_csv = cohort_bags(args, Path(tmp), encoder)
            slide_truth = synth_slide_truth(labels_csv.parent / "cohort.csv")
            if args.write_truth:
                tiles = {b.slide_id: (b.xy_l0, t) for b, t in zip(bags, truth, strict=True)}
                folder = write_synth_truth(labels_csv.parent / "cohort.csv", tiles)
                print(f"wrote the truth layout to {folder}")
        print(
            f"{len(bags)} slides of {len({e.patient_id for e in entries})} patients, "
            f"{sum(len(b.features) for b in bags)} tiles, features in "
            f"{time.perf_counter() - start:.0f} s"
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
    label = labels.values["stemness_fraction"]
    tile_mean = np.array([np.nanmean(t) if np.isfinite(t).any() else np.nan for t in truth])
    mil = result.pooled["pearson_stemness_fraction"]["value"]
    print(
        f"baseline, the same folds: ridge regression on mean-pooled features, pooled "
        f"Pearson {baseline:.4f} (the MIL's {mil:.4f}, difference {mil - baseline:+.4f}); "
        f"the mean of the tiles' true stemness vs the label: {pearson(tile_mean, label):.3f}"
    )
    figures = slide_truth_figures(result, label, slide_truth, [e.slide_id for e in entries])
    print(
        f"against the TRUE stemness-rich share of tissue ({figures['slides']} slides): pooled "
        f"CV prediction Pearson {figures['model']:.3f}, the label {figures['label']:.3f}"
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
    csv = tmp / "cohort" / "cohort.csv"
    if (tmp / "bags.npz").exists():
        entries = read_cohort(csv)
        bags, truth = _bags(entries, tmp, encoder, args.min_tissue, tile_truth=tile_truth)
        return bags, truth, entries, csv.parent / SLIDE_LABELS
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
    bags, truth = _bags(entries, tmp, encoder, args.min_tissue, tile_truth=tile_truth)
    return bags, truth, entries, labels_csv


def _bags(entries, tmp: Path, encoder, min_tissue: float, *, tile_truth=None):
    """Each slide's bag (features extracted to ``tmp/features``) and, with ``tile_truth``
    (entry, grid, path) -> float[N], its tiles' truth (else NaN); all kept in
    ``tmp/bags.npz`` and reused from there."""
    done = tmp / "bags.npz"
    if done.exists():
        data = np.load(done)  # np.load's default allow_pickle=False
        bags = [
            Bag(e.slide_id, data[f"f{i}"].astype(np.float32), data[f"xy{i}"])
            for i, e in enumerate(entries)
        ]
        return bags, [data[f"t{i}"] for i in range(len(entries))]
    bags, truth = [], []
    for e in entries:
        path = tmp / "features" / f"{e.slide_id}.h5"
        _, grid = extract(e.slide_path, path, encoder, min_tissue)
        store = read_feature_store(path)  # as MIL reads it
        bags.append(Bag(e.slide_id, store.features.astype(np.float32), store.xy_l0))
        none = np.full(len(store.xy_l0), np.nan)
        truth.append(none if tile_truth is None else tile_truth(e, grid, e.slide_path))
    arrays = {f"f{i}": b.features for i, b in enumerate(bags)}
    arrays |= {f"xy{i}": b.xy_l0 for i, b in enumerate(bags)}
    arrays |= {f"t{i}": t for i, t in enumerate(truth)}
    tmp.mkdir(parents=True, exist_ok=True)
    np.savez(done, **arrays)
    return bags, truth


def slide_truth_figures(result, label: np.ndarray, slide_truth, slide_ids: list[str]) -> dict:
    """Pearson of the pooled held-out predictions (label units) and of the label itself with
    each slide's true stemness share, over the slides the truth lists."""
    true = slide_truth.lookup(slide_ids)[:, slide_truth.targets.index("stemness")]
    pred = np.array([p.regression[0] for p in result.predictions])
    known = int(np.isfinite(true).sum())
    return {"slides": known, "model": pearson(pred, true), "label": pearson(label, true)}


def external_bags(cohort_dir: Path, tmp: Path, encoder, min_tissue: float):
    """A cohort made elsewhere: its bags (features extracted here), per-tile true stemness
    from ``truth/tiles/<slide_id>.csv`` at each bag tile (NaN where none), and entries."""
    entries = read_cohort(cohort_dir / "cohort.csv")
    bags, _ = _bags(entries, tmp, encoder, min_tissue)
    truth = []
    for b in bags:
        table = read_tile_truth(cohort_dir, b.slide_id)
        truth.append(np.full(len(b.xy_l0), np.nan) if table is None else table.at(b.xy_l0)[:, 0])
    return bags, truth, entries


def report(result, truth, folds: int) -> None:
    for name, rec in result.pooled.items():
        lo, hi = rec["ci95"]
        print(f"pooled {folds}-fold CV {name}: {rec['value']:.3f} (95% CI {lo:.3f}–{hi:.3f})")
    from sklearn.metrics import roc_auc_score

    contrib, attn = [], []
    for pred, soft in zip(result.predictions, truth, strict=True):
        known = np.isfinite(soft)  # a cohort's tile truth may not cover every tile
        positive = soft[known] >= 0.5
        if 0 < positive.sum() < len(positive):
            contrib.append(roc_auc_score(positive, pred.contributions[known, 0]))
            if np.ptp(pred.attention) > 0:  # mean pooling weighs every tile alike
                attn.append(roc_auc_score(positive, pred.attention[known]))
    if not contrib:
        print("held-out tiles: no slide has per-tile truth with both classes (no AUROC)")
        return
    attention = f"{np.median(attn):.3f}" if attn else "n/a (every tile weighs alike)"
    print(
        f"held-out tiles (soft stemness ≥ 0.5 positive), {len(contrib)} slides with both: "
        f"median AUROC per-tile contribution {np.median(contrib):.3f}, attention {attention}"
    )


if __name__ == "__main__":
    main()

"""``cscvision mil``: cross-validate attention MIL on slide-level labels over feature stores."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "mil",
        help="attention MIL on slide-level labels (k-fold CV over patients)",
        description=(
            "Cross-validate attention MIL (gated attention or CLAM-SB) on bags of stored tile "
            "features (one feature store per slide, from cscvision features) against "
            "slide-level labels, with patient-level k-fold cross-validation; for a model that "
            "cscvision infer runs on slides, use cscvision train with kind: mil. Writes "
            "OUT/cv_metrics.json (per fold and "
            "pooled, with bootstrap 95 % CIs over patients), OUT/predictions.csv (held-out "
            "prediction per slide) and OUT/tiles/<slide_id>.csv (each tile's attention × "
            "number of tiles and its contribution to each regression output)."
        ),
    )
    p.add_argument("cohort", type=Path, help="cohort manifest (slide_id, patient_id, slide_path)")
    p.add_argument("--labels", type=Path, required=True, help="slide-label CSV")
    p.add_argument(
        "--target",
        action="append",
        required=True,
        metavar="NAME[:TASK]",
        help="a label column; TASK regression (default) or tercile; repeatable",
    )
    p.add_argument(
        "--covariate",
        action="append",
        default=[],
        metavar="COLUMN",
        help="a covariate column given to the model (e.g. purity); repeatable",
    )
    p.add_argument(
        "--features", type=Path, required=True, help="folder of feature stores <slide_id>.h5"
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--folds", type=int, default=5, help="folds over patients (default 5)")
    p.add_argument("--epochs", type=int, default=30, help="passes over the bags (default 30)")
    p.add_argument("--max-bag", type=int, default=2048, help="tiles sampled per training step")
    p.add_argument("--accumulate", type=int, default=8, help="bags per optimiser step (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of folds, sampling and weights")
    p.add_argument(
        "--architecture",
        choices=("auto", "gated_attention", "clam_sb", "mean"),
        default="auto",
        help="auto (default): mean pooling when every target is a regression (a fraction of "
        "the section), gated attention when any is a class; gated attention (Ilse et al. "
        "2018), CLAM-SB (its instance loss needs a NAME:tercile or other classification "
        "target) or mean pooling",
    )
    p.set_defaults(func=run)


def _bags(entries, folder: Path):
    import numpy as np

    from cscvision.features.store import read_feature_store
    from cscvision.training.mil import Bag

    missing = [e.slide_id for e in entries if not (folder / f"{e.slide_id}.h5").is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder}: no feature store for {len(missing)} labelled slides "
            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); run cscvision "
            f"features on them with --out {folder}, or drop them from the cohort"
        )
    out = []
    for e in entries:
        store = read_feature_store(folder / f"{e.slide_id}.h5")
        out.append(Bag(e.slide_id, store.features.astype(np.float32), store.xy_l0))
    return out


def run(args: argparse.Namespace) -> int:
    from cscvision.features.store import FeatureStoreError
    from cscvision.labels.cohort import CohortError, read_cohort
    from cscvision.labels.slide_table import SlideLabelError, parse_targets, read_slide_labels

    try:
        entries = read_cohort(args.cohort)
        specs = parse_targets(args.target)
        labels = read_slide_labels(
            args.labels, specs, [(e.slide_id, e.patient_id) for e in entries], args.covariate
        )
        bags = _bags(entries, args.features)
    except (CohortError, SlideLabelError, FeatureStoreError, FileNotFoundError, ValueError) as e:
        print(f"cscvision mil: {e}", file=sys.stderr)
        return 2
    import torch

    from cscvision.training.mil import MILConfig
    from cscvision.training.mil_cv import cross_validate, write_cv_outputs

    torch.set_num_threads(1)  # one thread per process: MIL bags are small matrices
    cfg = MILConfig(
        architecture=args.architecture,
        epochs=args.epochs,
        max_bag=args.max_bag,
        accumulate=args.accumulate,
        seed=args.seed,
    )
    try:
        result = cross_validate(
            bags,
            labels,
            cfg,
            k=args.folds,
            covariates=args.covariate,
            progress=lambda line: print(line, file=sys.stderr),
        )
    except ValueError as e:
        print(f"cscvision mil: {e}", file=sys.stderr)
        return 2
    written = write_cv_outputs(args.out, bags, labels, result)
    for name, rec in result.pooled.items():
        lo, hi = rec["ci95"]
        print(
            f"pooled {args.folds}-fold CV {name}: {rec['value']:.3f} (95% CI {lo:.3f} to {hi:.3f})"
        )
    for path in written:
        print(f"wrote {path}")
    return 0

"""``cscvision mil``: cross-validate attention MIL on slide-level labels over feature stores."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import Field

from cscvision.core.io import check_writable
from cscvision.core.validate import Flags, check_flags


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "mil",
        help="attention MIL on slide-level labels (k-fold CV over patients)",
        description=(
            "Cross-validate MIL (instance-level linear, gated attention or CLAM-SB) on bags "
            "of stored tile features (one feature store per slide, from cscvision features) "
            "against "
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
        choices=("auto", "gated_attention", "clam_sb", "mean", "instance_linear"),
        default="auto",
        help="auto (the default): instance_linear when every target is a regression, "
        "gated_attention when a class target is trained; instance_linear: a linear per-tile "
        "head, the slide the mean of its tiles, fitted in closed form (ridge on mean-pooled "
        "features with a per-tile read-out); gated attention (Ilse et al. 2018); CLAM-SB "
        "(needs a NAME:tercile or other classification target); mean: mean pooling trained "
        "by gradient descent",
    )
    p.set_defaults(func=run)


def _bags(entries, folder: Path):
    import numpy as np

    from cscvision.features.store import check_bag, check_same_source, read_feature_store
    from cscvision.training.mil import Bag

    missing = [e.slide_id for e in entries if not (folder / f"{e.slide_id}.h5").is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder}: no feature store for {len(missing)} labelled slides "
            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); run cscvision "
            f"features on them with --out {folder}, or drop them from the cohort"
        )
    stores = []
    for e in entries:
        path = folder / f"{e.slide_id}.h5"
        stores.append((path, check_bag(path, e.slide_id, read_feature_store(path))))
    check_same_source(stores)
    return [Bag(e.slide_id, store.features.astype(np.float32), store.xy_l0)
            for e, (_, store) in zip(entries, stores, strict=True)]  # fmt: skip


class MILFlags(Flags):
    """``cscvision mil``'s counts, checked before any file is read."""

    folds: int = Field(5, ge=2, le=1000)
    epochs: int = Field(30, ge=1, le=100_000)
    max_bag: int = Field(2048, ge=1)
    accumulate: int = Field(8, ge=1)


def run(args: argparse.Namespace) -> int:
    from cscvision.labels.cohort import read_cohort
    from cscvision.labels.slide_table import parse_targets, read_slide_labels

    check_flags(MILFlags, folds=args.folds, epochs=args.epochs, max_bag=args.max_bag,
                accumulate=args.accumulate)  # fmt: skip
    check_writable(args.out)
    entries = read_cohort(args.cohort)
    specs = parse_targets(args.target)
    labels = read_slide_labels(
        args.labels, specs, [(e.slide_id, e.patient_id) for e in entries], args.covariate
    )
    bags = _bags(entries, args.features)
    import torch

    from cscvision.core.guard import (
        Interrupted,
        defer_signals,
        interrupt_on_signals,
        interrupted_notice,
    )
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
    written = None
    try:
        with interrupt_on_signals():
            result = cross_validate(
                bags,
                labels,
                cfg,
                k=args.folds,
                covariates=args.covariate,
                progress=lambda line: print(line, file=sys.stderr),
            )
        with defer_signals():  # the outputs of one cross-validation: all, or none
            written = write_cv_outputs(args.out, bags, labels, result)
    except Interrupted as e:
        done = "nothing written" if written is None else "every output written"
        print(interrupted_notice("mil", e.signum, done), file=sys.stderr)
        return 128 + e.signum
    for name, rec in result.pooled.items():
        lo, hi = rec["ci95"]
        print(
            f"pooled {args.folds}-fold CV {name}: {rec['value']:.3f} (95% CI {lo:.3f} to {hi:.3f})"
        )
    for path in written:
        print(f"wrote {path}")
    return 0

"""``cscvision stats OUT_DIR``: the per-slide figures of a batch as one table, and
cohort-level tests across patients (:mod:`cscvision.outputs.cohort_stats`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_parser", "run"]

SLIDES_CSV = "cohort_slides.csv"
TESTS_JSON = "cohort_stats.json"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "stats",
        help="tabulate per-slide statistics and test cohort-level association",
        description=(
            "Read OUT_DIR/<slide_id>/summary.json of a cscvision infer batch, write "
            f"OUT_DIR/{SLIDES_CSV} (one row per slide, with its patient) and "
            f"OUT_DIR/{TESTS_JSON}: Spearman's rho of the stemness and immunosuppressive "
            "fractions across patients with a bootstrap CI, and a signed-rank test of each "
            "co-localisation z across patients, Benjamini-Hochberg corrected. Tests need "
            "at least 5 patients; below that they are reported as undefined."
        ),
    )
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="the --out folder of infer")
    p.add_argument(
        "--cohort",
        type=Path,
        default=None,
        help="cohort manifest (slide_path, patient_id[, slide_id]) giving each slide's "
        "patient; without it every slide counts as its own patient",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cscvision.core.io import write_csv, write_json
    from cscvision.outputs.cohort_stats import (
        cohort_tests,
        read_patients,
        read_summaries,
        slide_table,
    )

    skipped: list[str] = []
    try:
        summaries = read_summaries(args.out_dir, skipped)
        patients = None if args.cohort is None else read_patients(args.cohort)
    finally:
        for line in skipped:
            print(f"cscvision stats: WARNING: {line}", file=sys.stderr)
    if any("slide_prediction" in s for s in summaries):
        print(
            f"cscvision stats: {args.out_dir} holds outputs of a slide-level MIL model: its "
            "maps are within-slide percentiles with no regions, so there are no niche "
            "statistics to test; its slide predictions are in results.csv",
            file=sys.stderr,
        )
        return 2
    columns, rows = slide_table(summaries, patients)
    targets = list(summaries[0]["targets"])
    tests = cohort_tests(rows, targets)
    table = write_csv(args.out_dir / SLIDES_CSV, columns, ([r[c] for c in columns] for r in rows))
    report = write_json(args.out_dir / TESTS_JSON, tests)
    n_patients = len({r["patient_id"] for r in rows})
    print(f"stats: {len(rows)} slides, {n_patients} patients")
    for name, test in tests["tests"].items():
        print(f"  {name}: {_describe(test)}")
    print(f"per slide: {table}")
    print(f"cohort tests: {report}")
    return 0


def _describe(test: dict) -> str:
    if test.get("p") is None:
        return f"undefined ({test.get('undefined', 'no p-value')})"
    effect = f"rho {test['rho']:.3f}" if "rho" in test else f"median z {test['median_z']:.2f}"
    return f"{effect}, p {test['p']:.3g}, q {test.get('q', float('nan')):.3g}"

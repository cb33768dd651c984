"""``cscvision report``: a static offline page over a batch's outputs and a training run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="write a static HTML report of a batch (and a training run)",
        description=(
            "Write OUT_DIR/report/index.html with its assets: the model and settings, a "
            "sortable cohort table, plots across slides, one card per slide with its overlays, "
            "the failed slides, and with --run the training run's curves, metrics and "
            "calibration. Works offline and when the folder is copied elsewhere."
        ),
    )
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="the --out folder of infer")
    p.add_argument(
        "--run",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="a cscvision train run folder to include",
    )
    p.add_argument(
        "--cohort",
        type=Path,
        default=None,
        metavar="CSV",
        help="cohort manifest (slide_id, patient_id, ...) to group slides by patient",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="DIR_OR_NAME",
        help="the exported model folder (or a packaged name such as demo), to show its card",
    )
    p.set_defaults(func=run)


def _missing_extra() -> str | None:
    from importlib.util import find_spec

    if find_spec("matplotlib") is None:
        return 'the report needs matplotlib: pip install "cscvision[viewer]"'
    return None


def run(args: argparse.Namespace) -> int:
    missing = _missing_extra()
    if missing:
        print(f"cscvision report: {missing}", file=sys.stderr)
        return 2
    from cscvision.views.report import write_report

    skipped: list[str] = []
    try:  # ReportError, CohortError, ModelError, a missing file: exit 2 (cli.run_command)
        page = write_report(
            args.out_dir,
            run_dir=args.run,
            cohort_csv=args.cohort,
            model_dir=args.model,
            skipped=skipped,
        )
    finally:
        for line in skipped:
            print(f"cscvision report: WARNING: {line}", file=sys.stderr)
    print(f"report: {page}")
    print(f"open it in a browser (file://{page.resolve()}); copy {page.parent} anywhere")
    return 0

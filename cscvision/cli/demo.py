"""``cscvision demo``: synthetic cohort → CPU training → inference, in one command."""

from __future__ import annotations

import argparse
from pathlib import Path

from cscvision.cli.demo_pipeline import DEMO_CONFIG, run_demo, summary_lines


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on synthetic slides",
        description=(
            "Write a synthetic cohort, train the CPU demo model on it, and run inference on the "
            "held-out slides. Re-running reuses the cohort and resumes training. The model "
            "knows synthetic slides only."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder")
    p.add_argument("--slides", type=int, default=16, help="synthetic slides (default 16)")
    p.add_argument("--patients", type=int, default=8, help="patients (default 8)")
    p.add_argument("--size", type=int, default=4096, help="slide side in pixels (default 4096)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--config",
        default=DEMO_CONFIG,
        help=f"training config: a YAML file or a packaged config name (default {DEMO_CONFIG}; "
        "see cscvision config list)",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cscvision.training.config import resolve_config

    resolve_config(args.config)  # a ConfigError before anything is made
    result = run_demo(
        args.out,
        slides=args.slides,
        patients=args.patients,
        size_px=args.size,
        seed=args.seed,
        config=args.config,
        overrides=tuple(args.overrides),
    )
    print("\n".join(summary_lines(result)))
    return 0

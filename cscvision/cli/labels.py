"""``cscvision labels SOURCE ...``: tile-label tables from a label source (IHC, ST, ...)."""

from __future__ import annotations

import argparse
import importlib

# Label sources, each a module cscvision.cli.labels_<source> with add_parser and run.
SOURCES = ("ihc", "st")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "labels",
        help="build tile-label tables (and a cohort CSV for train) from IHC or other sources",
        description="Build per-slide tile-label tables that `cscvision train` reads.",
    )
    sources = parser.add_subparsers(dest="source", metavar="SOURCE")
    for name in SOURCES:
        try:
            module = importlib.import_module(f"cscvision.cli.labels_{name}")
        except ModuleNotFoundError as e:
            if e.name != f"cscvision.cli.labels_{name}":
                raise
            continue
        module.add_parser(sources)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

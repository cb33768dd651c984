"""``cscvision labels SOURCE``: tile-label tables from a label source, one subcommand each."""

from __future__ import annotations

import argparse
import importlib

# Label sources, each a module cli/labels_<source>.py with add_parser(subparsers) and run(args).
SOURCES = ("ihc", "st", "cells", "mif")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "labels",
        help="make tile-label tables (training targets) from IHC, spatial transcriptomics, cells "
        "or multiplex IF",
        description=(
            "Write one tile-label table per slide (<slide_id>.labels.csv + .labels.json) and a "
            "cohort CSV with a label_path column that `cscvision train` accepts."
        ),
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
    parser.set_defaults(func=lambda args: _missing_source(parser))


def _missing_source(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2

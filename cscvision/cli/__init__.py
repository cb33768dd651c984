"""The ``cscvision`` command: one subcommand per module in this package."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from cscvision import __version__

# Subcommand modules, each with add_parser(subparsers) and run(args) -> int.
COMMANDS = (
    "demo",
    "synth",
    "tile",
    "register",
    "labels",
    "train",
    "infer",
    "features",
    "encoders",
    "mil",
    "stats",
    "report",
    "view",
    "config",
    "doctor",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cscvision",
        description=(
            "Map stemness-rich and immunosuppressive tumour-microenvironment regions in "
            "whole-slide images. Research use only; not for diagnosis."
        ),
    )
    parser.add_argument("--version", action="version", version=f"cscvision {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"cscvision.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"cscvision.cli.{name}":
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; completed slides are kept, re-run to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``cscvision`` command: one subcommand per module in this package."""

from __future__ import annotations

import argparse
import importlib
import os
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
    "cells",
    "stain",
    "features",
    "encoders",
    "mil",
    "stats",
    "export",
    "report",
    "view",
    "config",
    "doctor",
)


class _Parser(argparse.ArgumentParser):
    """argparse, with a hint when a file name starting with '-' was taken for a flag."""

    argv: Sequence[str] = ()

    def error(self, message: str) -> None:  # type: ignore[override]
        dashed = [a for a in self.argv if a.startswith("-") and a != "-" and os.path.lexists(a)]
        if dashed:
            name = dashed[0]
            message += (
                f"\n{name!r} is a file whose name starts with '-', so it reads as a flag: put "
                f"file names after '--' (cscvision COMMAND --out OUT ... -- {name}) or write "
                f"it as ./{name}"
            )
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    # Process state is set here, at the entry point, never by the library: timm (encoders)
    # must never reach the Hugging Face Hub; nothing is downloaded at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    _Parser.argv = list(sys.argv[1:] if argv is None else argv)
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

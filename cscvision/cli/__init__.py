"""The ``cscvision`` command: one subcommand per module in this package."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from cscvision import __version__
from cscvision.core.errors import CscvisionError
from cscvision.core.guard import Interrupted, interrupt_on_signals

# commands that install their own signal handling (Lightning's trainer, uvicorn's server)
OWN_SIGNALS = frozenset({"train", "demo", "view"})

# The exit statuses of every command (docs/reference/cli.md).
EXIT_OK, EXIT_SOME_FAILED, EXIT_BAD_INPUT = 0, 1, 2

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
        return EXIT_BAD_INPUT
    return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command and turn how it ended into the exit status, for every command:
    its own status (0, or 1 when some slides failed); 2 with one line on stderr for bad
    input (any :class:`~cscvision.core.errors.CscvisionError`: a flag, a file, a config,
    a model; an input file that cannot be opened); 128 + the signal's number when SIGTERM
    or SIGINT stopped it (143, 130), wherever in the command the signal lands (a batch's
    loop, or the tables written after it). Anything else is a bug and keeps its traceback."""
    import contextlib

    name = " ".join(str(p) for p in (args.command, getattr(args, "source", None)) if p)
    signals = contextlib.nullcontext() if args.command in OWN_SIGNALS else interrupt_on_signals()
    try:
        with signals:
            return int(args.func(args) or 0)
    except Interrupted as e:
        print(f"cscvision {name}: stopped by {e}; completed work is kept, re-run to resume",
              file=sys.stderr)  # fmt: skip
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"cscvision {name}: interrupted; completed work is kept, re-run to resume",
              file=sys.stderr)  # fmt: skip
        return 128 + 2
    except (CscvisionError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"cscvision {name}: {_one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(main())

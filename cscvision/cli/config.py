"""``cscvision config``: list, print and copy the packaged training configs; the schema."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "config",
        help="list, print or copy the packaged training configs; write their schema",
        description=(
            "The package carries the default training configs; `--config NAME` of train and "
            "demo uses them by name. `default` documents every key; `schema` writes the "
            "JSON Schema every training config follows (types, ranges, choices)."
        ),
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", help="the packaged configs, one a line with its summary")
    show = actions.add_parser("show", help="print a packaged config (or a YAML file) as it is")
    show.add_argument("name", metavar="NAME_OR_FILE")
    show.add_argument(
        "--resolved",
        action="store_true",
        help="print the training config's resolved values instead (defaults filled in, "
        "overrides applied, checked), as train --print-config does",
    )
    show.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="with --resolved: config overrides"
    )
    schema = actions.add_parser(
        "schema", help="write the training config's JSON Schema (for editors and checks)"
    )
    schema.add_argument(
        "--out", type=Path, default=None, metavar="FILE", help="write it here (default: stdout)"
    )
    copy = actions.add_parser("copy", help="copy a packaged config to a file to edit")
    copy.add_argument("name", metavar="NAME")
    copy.add_argument("dest", type=Path, metavar="FILE")
    copy.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    p.set_defaults(func=run)


def _summary(path: Path) -> str:
    """The first comment line of a config: what it is for."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#") and line.strip("# "):
            return line.strip("# ")
    return ""


# packaged configs that are not training configs, and the command each one feeds
USED_BY = {
    "st_panels": "cscvision labels st MANIFEST.csv --panels {dest} --out DIR",
    "ihc_markers": "cscvision labels ihc MANIFEST.csv --markers {dest} --out DIR",
    # the hierarchy is read from the package; a copy is a reference for writing class maps
    "cell_types": "cscvision cells ... --class-map NAME (a map named in {dest}) or "
    "--class-map MAP.yaml ('tool class: cell type')",
}


def usage_hint(name: str, dest: Path) -> str:
    """How to use a copied config: the command that reads it."""
    stem = Path(name).stem
    return USED_BY.get(stem, "cscvision train --config {dest}").format(dest=dest)


def run(args: argparse.Namespace) -> int:
    from cscvision.core.io import write_text
    from cscvision.training.config import ConfigError, config_names, resolve_config

    if args.action == "list":
        for name in config_names():
            print(f"{name:<12} {_summary(resolve_config(name))}")
        return 0
    if args.action == "schema":
        return _schema(args.out)
    path = resolve_config(args.name)
    if args.action == "show":
        if args.resolved:
            print(resolved_yaml(path, args.overrides), end="")
        elif args.overrides:
            raise ConfigError("KEY=VALUE overrides need --resolved")
        else:
            print(path.read_text(encoding="utf-8"), end="")
        return 0
    if args.dest.is_dir():  # --overwrite replaces a file, never a folder
        raise ConfigError(
            f"{args.dest} is a folder; give the file to write, e.g. {args.dest / path.name}"
        )
    if args.dest.exists() and not args.overwrite:
        raise ConfigError(f"{args.dest} exists; pass --overwrite to replace it")
    write_text(args.dest, path.read_text(encoding="utf-8"))
    print(f"wrote {args.dest} (from {path}); use it with: {usage_hint(path.name, args.dest)}")
    return 0


def resolved_yaml(path: str | Path | None, overrides: Sequence[str] = ()) -> str:
    """The training config ``path`` with ``overrides``, resolved and checked, as YAML."""
    import yaml

    from cscvision.training.config import config_to_dict, load_config

    cfg = load_config(path, overrides)
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)


def _schema(out: Path | None) -> int:
    from cscvision.core.io import write_text
    from cscvision.training.config import config_schema

    text = json.dumps(config_schema(), indent=2, ensure_ascii=False) + "\n"
    if out is None:
        print(text, end="")
    else:
        write_text(out, text)
        print(f"wrote {out} (JSON Schema of the training config)")
    return 0

"""Generated reference pages: the CLI from its argparse parsers, the config keys from the
packaged default config, the Python API from ``cscvision``'s export table.

MkDocs runs :func:`on_page_markdown` on every page (``hooks:`` in ``mkdocs.yml``); a page
that holds one of the markers below gets the generated Markdown in its place, so adding a
flag, a config key or an exported name changes the manual with no hand edit. Run as a
script to print one part: ``python docs/hooks/reference.py cli|config|card|api``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # document the tree being built, not another installed copy
    sys.path.insert(0, str(ROOT))
MARKERS = {
    "<!-- generated: cli -->": "cli",
    "<!-- generated: config -->": "config",
    "<!-- generated: api -->": "api",
    "<!-- generated: card -->": "card",
}


# --- CLI ---------------------------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def _flag(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    names = ", ".join(action.option_strings)
    if action.nargs == 0:
        return f"`{names}`"
    if action.metavar is not None:
        metavar = action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
    elif action.choices is not None:
        metavar = "{" + ",".join(map(str, action.choices)) + "}"
    else:
        metavar = action.dest.upper()
    if action.nargs in ("?",):
        metavar = f"[{metavar}]"
    elif action.nargs in ("*", "+"):
        metavar = f"{metavar} ..."
    return f"`{names} {metavar}`"


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help:
        return ""
    try:
        return parser._get_formatter()._expand_help(action)
    except (KeyError, TypeError, ValueError):
        return action.help


def _default(action: argparse.Action) -> str:
    if (
        not action.option_strings
        or action.nargs == 0
        or action.default in (None, argparse.SUPPRESS)
    ):
        return ""
    return f"`{action.default}`"


def _command_markdown(path: str, parser: argparse.ArgumentParser, level: int) -> list[str]:
    lines = [f"{'#' * level} {path}", ""]
    if parser.description:
        lines += [parser.description, ""]
    lines += ["```text", parser.format_usage().strip(), "```", ""]
    groups = [(g.title, g._group_actions) for g in parser._action_groups if g._group_actions]
    for title, actions in groups:
        rows = [
            a
            for a in actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
            and a.help != argparse.SUPPRESS
        ]
        if not rows:
            continue
        lines += [f"**{title}**", "", "| argument | default | meaning |", "|---|---|---|"]
        lines += [f"| {_flag(a)} | {_default(a)} | {_cell(_help(parser, a))} |" for a in rows]
        lines.append("")
    for name, sub in _subcommands(parser):
        lines += _command_markdown(f"{path} {name}", sub, min(level + 1, 4))
    return lines


def cli_markdown() -> str:
    """Every subcommand's usage and arguments, read from ``cscvision.cli.build_parser()``."""
    from cscvision.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "80"  # argparse wraps usage lines at the terminal width
    try:
        parser = build_parser()
        lines = ["| command | what it does |", "|---|---|"]
        helps = {
            c.dest: c.help for a in parser._actions if isinstance(a, argparse._SubParsersAction)
            for c in a._choices_actions
        }  # fmt: skip
        for name, _ in _subcommands(parser):
            lines.append(
                f"| [`cscvision {name}`](#cscvision-{name}) | {_cell(helps.get(name) or '')} |"
            )
        lines.append("")
        for name, sub in _subcommands(parser):
            lines += _command_markdown(f"cscvision {name}", sub, 2)
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(lines)


# --- config ------------------------------------------------------------------------------------

_KEY = re.compile(
    r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.]*):(?P<value>[^#]*?)\s*(?:#\s?(?P<comment>.*))?$"
)
_COMMENT = re.compile(r"^(?P<indent> *)#\s?(?P<text>.*)$")


def _allowed(prop: dict, defs: dict) -> str:
    """What a JSON Schema property allows, in a few words: choices, type and range."""
    if "$ref" in prop:
        return ""
    if "enum" in prop:
        return " | ".join(str(v) for v in prop["enum"])
    if "anyOf" in prop:
        parts = [_allowed(p, defs) for p in prop["anyOf"] if p.get("type") != "null"]
        nullable = " or null" if any(p.get("type") == "null" for p in prop["anyOf"]) else ""
        return " or ".join(p for p in parts if p) + nullable
    kind = prop.get("type", "")
    if kind == "array":
        items = prop.get("prefixItems") or [prop.get("items", {})]
        return f"list of {_allowed(items[0], defs) or 'values'}"
    bounds = [f"{sign} {prop[key]}" for key, sign in (("minimum", "≥"), ("exclusiveMinimum", ">"),
              ("maximum", "≤"), ("exclusiveMaximum", "<")) if key in prop]  # fmt: skip
    return " ".join([{"integer": "integer", "number": "number", "string": "text",
                      "boolean": "true/false", "object": "mapping"}.get(kind, kind)]
                    + ([", ".join(bounds)] if bounds else []))  # fmt: skip


def allowed_by_key() -> dict[str, str]:
    """Dotted config key → what its schema allows (``cscvision config schema``)."""
    from cscvision.training.config import config_schema

    schema = config_schema()
    defs = schema.get("$defs", {})
    out: dict[str, str] = {}
    for key, prop in schema["properties"].items():
        ref = prop.get("$ref", "").rsplit("/", 1)[-1] or ("ModelSection" if key == "model" else "")
        if ref in defs:
            for sub, p in defs[ref].get("properties", {}).items():
                out[f"{key}.{sub}"] = _allowed(p, defs)
        else:
            out[key] = _allowed(prop, defs)
    return out


def config_markdown(path: Path | None = None) -> str:
    """One table per section of the packaged default config: key, default, what the schema
    allows and the key's comment."""
    path = path or ROOT / "cscvision" / "resources" / "configs" / "default.yaml"
    allowed = allowed_by_key()
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[str] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the open sections
    rows: list[list[str]] = []  # [key, default, meaning] of the current table
    pending: list[str] = []  # comment lines above the next key
    last_code_col = None  # column of the trailing comment of the last key line

    def flush() -> None:
        if rows:
            out.extend(["| key | default | allowed | meaning |", "|---|---|---|---|"])
            out.extend(f"| `{k}` | {f'`{v}`' if v else ''} | {_cell(allowed.get(k, ''))} | "
                       f"{_cell(m)} |" for k, v, m in rows)  # fmt: skip
            out.append("")
            rows.clear()

    def paragraph() -> None:
        text = list(pending)
        pending.clear()
        if not any(t.strip() for t in text):
            return
        flush()
        code = [t for t in text if t.startswith("  ")]
        prose = [t for t in text if not t.startswith("  ")]
        if prose:
            out.extend([" ".join(t.strip() for t in prose if t.strip()), ""])
        if code:
            lang = "yaml" if any(": " in t for t in code) else "text"
            out.extend([f"```{lang}", *[t[2:] for t in code], "```", ""])

    for line in lines:
        if not line.strip():
            paragraph()
            last_code_col = None
            continue
        comment = _COMMENT.match(line)
        if comment:
            col = line.index("#")
            if last_code_col is not None and col == last_code_col and rows:
                rows[-1][2] += " " + comment["text"].strip()
            else:
                pending.append(comment["text"])
                last_code_col = None
            continue
        key = _KEY.match(line)
        if not key:
            continue
        paragraph()
        indent = len(key["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [key["key"]])
        value = key["value"].strip()
        if not value:  # a section
            flush()
            stack.append((indent, key["key"]))
            out.extend([f"## `{dotted}`", ""])
            if key["comment"]:
                out.extend([key["comment"].strip(), ""])
            last_code_col = line.index("#") if key["comment"] else None
            continue
        if indent == 0 and stack:  # a top-level key after a section: a table of its own
            stack.clear()
            flush()
        rows.append([dotted, value, (key["comment"] or "").strip()])
        last_code_col = (
            line.index("#", len(key["indent"]) + len(key["key"])) if key["comment"] else None
        )
    paragraph()
    flush()
    return "\n".join(out)


# --- model card ------------------------------------------------------------------------------


def card_markdown() -> str:
    """The model card's fields, read from the source of ``cscvision.ModelCard``: name, type,
    default (with its pydantic bounds) and the comments written beside the field."""
    import ast
    import importlib
    import io
    import tokenize

    import cscvision

    module = importlib.import_module(cscvision._API["ModelCard"])
    source = Path(module.__file__).read_text(encoding="utf-8")
    comments = {
        tok.start[0]: tok.string.lstrip("# ").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    lines = source.splitlines()
    (cls,) = [
        n
        for n in ast.walk(ast.parse(source))
        if isinstance(n, ast.ClassDef) and n.name == "ModelCard"
    ]
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for node in cls.body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        kind = ast.get_source_segment(source, node.annotation)
        default = "required"
        if node.value is not None:
            value = node.value
            if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "Field":
                parts = [ast.get_source_segment(source, a) for a in value.args]
                parts += [
                    f"{k.arg}={ast.get_source_segment(source, k.value)}"
                    for k in value.keywords
                    if k.arg != "default_factory"
                ]
                factory = [k for k in value.keywords if k.arg == "default_factory"]
                if factory:
                    parts.insert(0, f"{ast.get_source_segment(source, factory[0].value)}()")
                default = ", ".join(parts)
            else:
                default = ast.get_source_segment(source, value)
        above, line = [], node.lineno - 1
        while line - 1 >= 0 and lines[line - 1].strip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        meaning = " ".join([*above, comments.get(node.lineno, "")]).strip()
        rows.append(
            f"| `{node.target.id}` | `{_cell(kind)}` | `{_cell(default)}` | {_cell(meaning)} |"
        )
    return "\n".join(rows)


# --- Python API --------------------------------------------------------------------------------


def api_markdown() -> str:
    """One mkdocstrings block per name ``cscvision`` exports, grouped by the stage that
    defines it (read from ``cscvision._API``, so a new export appears by itself)."""
    import cscvision

    by_stage: dict[str, list[tuple[str, str]]] = {}
    for name, module in cscvision._API.items():
        stage = module.split(".")[1] if module.count(".") else module
        by_stage.setdefault(stage, []).append((name, module))
    lines = []
    for stage, names in by_stage.items():
        lines += [f"## `{stage}`", ""]
        for name, module in sorted(names, key=lambda n: n[0].lower()):
            lines += [f"::: {module}.{name}", "    options:", "        heading_level: 3", ""]
    return "\n".join(lines)


GENERATORS = {
    "cli": cli_markdown,
    "config": config_markdown,
    "card": card_markdown,
    "api": api_markdown,
}


def on_page_markdown(markdown: str, **_: object) -> str:
    for marker, part in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, GENERATORS[part]())
    return markdown


if __name__ == "__main__":
    sys.stdout.write(GENERATORS[sys.argv[1]]() + "\n")

"""Reading YAML and JSON configuration files: errors that name the file, and a bound on
YAML aliases.

A YAML alias (``*a``) repeats a node without copying it, so a few lines can stand for
billions of values ("billion laughs"); the parser keeps them shared, but whatever walks
the data afterwards (validation, printing) expands them and runs out of memory. A
document whose expanded size passes :data:`MAX_YAML_NODES` is refused before it is
built. A configuration file needs a few hundred nodes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cscvision.core.errors import CscvisionError

MAX_YAML_NODES = 100_000


class ConfigFileError(CscvisionError, ValueError):
    """A configuration file that cannot be read or parsed; the message names the file."""


def _expanded_size(node: Any, memo: dict[int, int]) -> int:
    """Nodes the document holds once every alias is expanded (a shared node counted at
    each place it appears; each distinct node visited once)."""
    import yaml

    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = MAX_YAML_NODES + 1  # a node reaching itself: a recursive document, refused
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(item, memo) for item in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    memo[key] = size = min(size, MAX_YAML_NODES + 1)
    return size


def _bounded_loader() -> type:
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        """``yaml.SafeLoader`` refusing a document that expands past the bound."""

        def get_single_data(self) -> Any:
            node = self.get_single_node()
            if node is None:
                return None
            if _expanded_size(node, {}) > MAX_YAML_NODES:
                raise yaml.YAMLError(
                    f"its aliases expand to more than {MAX_YAML_NODES:,} values (an alias "
                    "bomb, or a recursive alias); write the values out instead"
                )
            return self.construct_document(node)

    return BoundedLoader


def parse_yaml(text: str, where: str) -> Any:
    """``text`` parsed as YAML (safe types only, aliases bounded); ``where`` names it in
    the :class:`ConfigFileError` of a document that does not parse."""
    import yaml

    try:
        return yaml.load(text, Loader=_bounded_loader())  # a SafeLoader
    except yaml.YAMLError as e:
        raise ConfigFileError(f"{where}: not valid YAML ({_one_line(e)})") from None
    except RecursionError:
        raise ConfigFileError(f"{where}: not valid YAML (nested too deeply)") from None


def read_yaml(path: str | Path) -> Any:
    """The YAML file ``path`` (see :func:`parse_yaml`); errors name the file."""
    return parse_yaml(_read(path), str(path))


def read_json(path: str | Path) -> Any:
    """The JSON file ``path``; errors name the file."""
    try:
        return json.loads(_read(path))
    except ValueError as e:
        raise ConfigFileError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ConfigFileError(f"{path}: not valid JSON (nested too deeply)") from None


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigFileError(f"{path}: cannot read the file ({e})") from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())

"""The cell-type hierarchy and the class maps that put each tool's classes on it.

Both live in the packaged ``cell_types.yaml`` (``types``: child → parent; ``class_maps``:
tool → {class name → type, or null to drop}). A node counts its own cells and every cell
below it, so ``inflammatory`` holds lymphocytes and macrophages, and ``lymphocyte`` holds
T cells but never a cell a detector called only "inflammatory".
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cscvision.core.config_files import ConfigFileError, read_yaml
from cscvision.core.errors import CscvisionError
from cscvision.core.resources import packaged_dir

CONFIG_NAME = "cell_types.yaml"


class CellTypeError(CscvisionError, ValueError):
    """A class a cell table or a class map names is not in the hierarchy."""


@dataclass(frozen=True)
class CellTypes:
    """The hierarchy: ``parent[name]`` is ``None`` at the top. Names in config order."""

    parent: Mapping[str, str | None]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.parent)

    def ancestors(self, name: str) -> tuple[str, ...]:
        """``name`` and every node above it, nearest first."""
        self.check(name)
        chain, node = [], name
        while node is not None:
            chain.append(node)
            node = self.parent[node]
        return tuple(chain)

    def below(self, name: str) -> tuple[str, ...]:
        """``name`` and every node under it."""
        self.check(name)
        return tuple(n for n in self.names if name in self.ancestors(n))

    def check(self, name: str) -> str:
        if name not in self.parent:
            raise CellTypeError(
                f"cell type {name!r} is not in the hierarchy; known: {', '.join(self.names)}"
            )
        return name

    def membership(self, codes: Sequence[str], nodes: Sequence[str]) -> np.ndarray:
        """bool[len(codes), len(nodes)]: whether a cell of type ``codes[i]`` counts in
        ``nodes[j]``."""
        for node in nodes:
            self.check(node)
        return np.array(
            [[node in self.ancestors(code) for node in nodes] for code in codes], dtype=bool
        ).reshape(len(codes), len(nodes))


def _read_config(path: Path) -> dict:
    try:
        doc = read_yaml(path)
    except ConfigFileError as e:
        raise CellTypeError(f"cell-type config {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("types"), dict):
        raise CellTypeError(f"{path}: needs a 'types' mapping of child: parent")
    return doc


@functools.cache
def default_config() -> dict:
    return _read_config(packaged_dir("configs") / CONFIG_NAME)


def cell_types(config: dict | None = None) -> CellTypes:
    """The hierarchy of ``config`` (default: the packaged one), checked for unknown
    parents and loops."""
    parent = dict((config or default_config())["types"])
    for child, up in parent.items():
        if up is not None and up not in parent:
            raise CellTypeError(f"cell type {child!r}: parent {up!r} is not a cell type")
    types = CellTypes(parent)
    for name in parent:
        seen, node = set(), name
        while node is not None:
            if node in seen:
                raise CellTypeError(f"cell types loop through {node!r}")
            seen.add(node)
            node = parent[node]
    return types


def class_map(name: str | Mapping[str, str | None], config: dict | None = None) -> dict:
    """A tool's class map (lower-cased class name → type or None), by name from the config
    or given as a mapping; every type it names must be in the hierarchy."""
    config = config or default_config()
    if isinstance(name, str):
        maps = config.get("class_maps") or {}
        if name not in maps:
            raise CellTypeError(
                f"class map {name!r} is not in the config; known: {', '.join(maps)}"
            )
        mapping = maps[name]
    else:
        mapping = name
    types = cell_types(config)
    out = {}
    for cls, target in mapping.items():
        if target is not None:
            types.check(str(target))
        out[str(cls).strip().lower()] = None if target is None else str(target)
    return out


def map_classes(
    names: np.ndarray, mapping: Mapping[str, str | None], source: str
) -> tuple[np.ndarray, np.ndarray]:
    """Hierarchy type of each class name (object array) and whether to keep the cell.

    A name the map does not hold raises :class:`CellTypeError` naming ``source``, the
    unknown names and the fix; names mapped to None are dropped (``keep`` False)."""
    uniq, inverse = np.unique(np.asarray(names, dtype=object).astype(str), return_inverse=True)
    lowered = [u.strip().lower() for u in uniq]
    unknown = [str(u) for u, low in zip(uniq, lowered, strict=True) if low not in mapping]
    if unknown:
        raise CellTypeError(
            f"{source}: classes {', '.join(map(repr, unknown[:10]))} are not in the class "
            f"map (it knows {', '.join(sorted(mapping))}); pass a class map (YAML "
            "'name: type') that names them"
        )
    mapped = np.array([mapping[low] or "" for low in lowered], dtype=object)
    types = mapped[inverse]
    return types, types != ""

"""Training configuration: typed, checked records built from YAML plus dotted overrides.

``load_config("cpu_demo", ["trainer.max_epochs=3", "data.batch_size=32"])`` starts from
the defaults, applies the YAML file (a path, or the name of a packaged config), then each
override (its value parsed as YAML: ``3``, ``0.5``, ``null``, ``[1, 2]``, ``true``). The
schema (:mod:`cscvision.training.config_sections`) gives every key its type, range or
choices; a value that does not fit, or an unknown key, is one :class:`ConfigError`
naming the file, the key, the value and what is allowed. ``cscvision config schema``
writes the schema as JSON Schema; the packaged ``default`` config
(``cscvision config show default``) documents every key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from cscvision.core.config_files import ConfigFileError, parse_yaml, read_yaml
from cscvision.core.errors import CscvisionError
from cscvision.core.resources import packaged_dir, packaged_names
from cscvision.training.config_sections import (
    MODEL_SECTIONS,
    CardConfig,
    CohortConfig,
    CVConfig,
    DataConfig,
    GridConfig,
    MetricsConfig,
    MILNetConfig,
    MILSection,
    ModelConfig,
    ModelSection,
    OptimConfig,
    RegressionConfig,
    TrainConfig,
    TrainerConfig,
)

__all__ = [
    "CVConfig",
    "CardConfig",
    "CohortConfig",
    "ConfigError",
    "DataConfig",
    "GridConfig",
    "MILNetConfig",
    "MILSection",
    "MetricsConfig",
    "ModelConfig",
    "ModelSection",
    "OptimConfig",
    "RegressionConfig",
    "TrainConfig",
    "TrainerConfig",
    "config_names",
    "config_schema",
    "config_to_dict",
    "load_config",
    "resolve_config",
    "with_absolute_paths",
]


class ConfigError(CscvisionError, ValueError):
    """A configuration that does not fit; the message names the key and the valid choices."""


_ADAPTER = TypeAdapter(TrainConfig)


def config_schema() -> dict[str, Any]:
    """The training config's JSON Schema (for editors and the manual's reference)."""
    schema = _ADAPTER.json_schema()
    schema["title"] = "cscvision training config"
    model = schema["properties"]["model"]  # the kinds' variants, and any registered later:
    model["anyOf"] = model.pop("oneOf")  # a tile config fits both TileModel and ModelSection
    return schema


def build_config(data: Any) -> TrainConfig:
    """A :class:`TrainConfig` from plain data (a parsed YAML document);
    :class:`ConfigError` naming the first key that does not fit."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping of keys at the top level, got {data!r}")
    try:
        return _ADAPTER.validate_python(_from_task(data))
    except ValidationError as e:
        raise ConfigError(describe_config_error(e)) from None


_UNKNOWN = ("extra_forbidden", "unexpected_keyword_argument")


def describe_config_error(error: ValidationError) -> str:
    """The first problem of ``error`` in one line: the dotted key, the value given and
    what is allowed; unknown keys listed with the section's valid ones."""
    problems = error.errors()
    first = problems[0]
    keys, section = _key_path(first["loc"])
    if first["type"] in _UNKNOWN:
        unknown = sorted(str(_key_path(p["loc"])[0][-1]) for p in problems
                         if p["type"] in _UNKNOWN
                         and _key_path(p["loc"])[0][:-1] == keys[:-1])  # fmt: skip
        where = f"section {'.'.join(keys[:-1])!r}" if len(keys) > 1 else "top level"
        valid = ", ".join(sorted(f.name for f in dataclasses.fields(section)))
        return f"unknown key(s) {unknown} at {where}; valid keys: {valid}"
    message = first["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    head = message.split(":", 1)[0]
    if ":" in message and " " not in head:  # the message names its own key
        return message
    key = ".".join(keys) or "config"
    given = first.get("input")
    shown = "" if isinstance(given, Mapping) or dataclasses.is_dataclass(given) else f" {given!r}"
    if message.startswith("Input "):
        message = "i" + message[1:]
    return f"{key}{shown}: {message}"


SECTIONS = {
    "cohort": CohortConfig, "grid": GridConfig, "data": DataConfig, "model": ModelSection,
    "optim": OptimConfig, "metrics": MetricsConfig, "regression": RegressionConfig,
    "mil": MILSection, "cv": CVConfig, "trainer": TrainerConfig, "card": CardConfig,
}  # fmt: skip


def _key_path(loc: Sequence[Any]) -> tuple[list[str], type]:
    """The dotted key of an error location (union tags and type names dropped) and the
    section it ends in."""
    keys: list[str] = []
    section: type = TrainConfig
    for part in loc:
        if keys == ["model"] and section is ModelSection:  # the union's tag: not a key
            section = MODEL_SECTIONS.get(str(part), ModelSection)
            continue
        if section is TrainConfig and part in SECTIONS:
            section = SECTIONS[str(part)]
        elif "[" in str(part):
            continue  # a union member's type name
        keys.append(str(part))
    return keys, section


def _set(data: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r}: write KEY=VALUE, e.g. trainer.max_epochs=3")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
    try:
        node[parts[-1]] = parse_yaml(raw, f"override {override!r}") if raw.strip() else None
    except ConfigFileError as e:
        raise ConfigError(str(e)) from None


def config_names() -> list[str]:
    """Names of the packaged configs (``default``, ``cpu_demo``, ...)."""
    return packaged_names("configs", ".yaml")


def resolve_config(name_or_path: str | Path) -> Path:
    """A config file: an existing file as given, else a packaged config by name.

    ``default`` and ``default.yaml`` both name the packaged ``default.yaml``; a file of that
    name in the working directory wins.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = str(name_or_path)
    packaged = packaged_dir("configs") / (name if name.endswith(".yaml") else f"{name}.yaml")
    if path.name == name and packaged.is_file():
        return packaged
    raise ConfigError(
        f"{name_or_path}: no such config file and no packaged config of that name; "
        f"pass a YAML file or one of: {', '.join(config_names())} (cscvision config list)"
    )


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A training config: the defaults, then a YAML file, then overrides.

    Parameters
    ----------
    path
        A YAML file, or a packaged config name (``default``, ``cpu_demo``, ``gpu``, ...);
        None for the defaults alone.
    overrides
        Dotted ``KEY=VALUE`` strings, values parsed as YAML (``trainer.max_epochs=3``).

    Returns
    -------
    TrainConfig
        The resolved, checked config.

    Raises
    ------
    ConfigError
        An unknown key (the message lists the valid ones), a value of the wrong type or
        range, or a file that cannot be read; the message names the file or the key.

    Examples
    --------
    >>> cfg = cscvision.load_config("cpu_demo", ["cohort.csv=cohort.csv", "trainer.max_epochs=1"])
    >>> cfg.grid.tile_px
    """
    data: Any = {}
    if path is not None:
        path = resolve_config(path)
        try:
            data = read_yaml(path)
        except ConfigFileError as e:
            raise ConfigError(str(e)) from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of keys, got {type(data).__name__}")
    for override in overrides:
        _set(data, override)
    try:
        return build_config(data)
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None


def _from_task(data: Any) -> Any:
    """A 0.1.0 config's ``task`` (classification | regression | mil) held the target type
    and, for ``mil``, the model kind: read it as ``kind: mil`` or ``target_type``."""
    if not isinstance(data, Mapping) or "task" not in data:
        return data
    from cscvision.models.card import split_task

    data = dict(data)
    for key, value in split_task(data.pop("task")).items():
        data.setdefault(key, value)
    return data


def with_absolute_paths(cfg: TrainConfig, base: str | Path | None = None) -> TrainConfig:
    """``cfg`` with its file and folder paths made absolute from ``base`` (default: cwd)."""
    base = Path(base or Path.cwd())

    def absolute(value: str | None) -> str | None:
        return None if value in (None, "") else str((base / Path(value).expanduser()).resolve())

    return dataclasses.replace(
        cfg,
        run_dir=absolute(cfg.run_dir or str(Path("runs") / cfg.name)),
        export_dir=absolute(cfg.export_dir or str(Path("models") / cfg.name)),
        cohort=dataclasses.replace(cfg.cohort, csv=absolute(cfg.cohort.csv) or ""),
        mil=dataclasses.replace(cfg.mil, labels=absolute(cfg.mil.labels) or ""),
        data=dataclasses.replace(cfg.data, cache_dir=absolute(cfg.data.cache_dir)),
        model=dataclasses.replace(
            cfg.model,
            pretrained=absolute(cfg.model.pretrained),
            weights=absolute(cfg.model.weights),
            features_dir=absolute(cfg.model.features_dir),
        ),
    )


def config_to_dict(cfg: Any) -> Any:
    """Plain dicts, lists and scalars (for YAML and JSON)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {str(k): config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    return cfg

"""Schemas for flags and files, checked before any slide is read (pydantic v2).

A command's flags are a pydantic model whose field ``min_tissue`` is the flag
``--min-tissue``; :func:`check_flags` builds it and turns a validation error into one
``ValueError`` that names the flag, the value and the allowed range.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from cscvision.core.errors import CscvisionError

FLAG_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)


class Flags(BaseModel):
    """Base of a flag schema: immutable, no unknown fields, no NaN or infinity (a pydantic
    dataclass with ``config=FLAG_CONFIG`` works the same with :func:`check_flags`)."""

    model_config = ConfigDict(frozen=True, **FLAG_CONFIG)


F = TypeVar("F")


class FlagError(CscvisionError, ValueError):
    """A flag's value that does not fit; the message names the flag, the value and the range."""


def check_flags(schema: type[F], **values: Any) -> F:  # a model or a pydantic dataclass
    """``schema(**values)``, or ``FlagError("--flag value: what is wrong (allowed ...)")``
    (a ``ValueError``)."""
    try:
        return schema(**values)
    except ValidationError as e:
        raise FlagError(describe_error(e, schema, flag=True)) from None


def describe_error(error: ValidationError, schema: type, *, flag: bool) -> str:
    """The first problem of ``error`` in one line: the field (as ``--flag`` or a dotted
    field path), the value given, what is wrong and the allowed range when there is one."""
    first = error.errors()[0]
    loc = [str(part) for part in first["loc"]]
    name = "--" + loc[0].replace("_", "-") if flag and loc else ".".join(loc) or "value"
    allowed = _allowed(schema, loc[0]) if loc else ""
    given = first.get("input")
    shown = "" if isinstance(given, dict) and not flag else f" {given!r}"
    message = first["msg"][0].lower() + first["msg"][1:]
    return f"{name}{shown}: {message}{allowed}"


def _allowed(schema: type, field: str) -> str:
    fields = getattr(schema, "model_fields", None) or getattr(schema, "__pydantic_fields__", {})
    info = fields.get(field)
    if info is None:
        return ""
    bounds = {}
    for item in info.metadata:
        for key in ("ge", "gt", "le", "lt"):
            if getattr(item, key, None) is not None:
                bounds[key] = getattr(item, key)
    if not bounds:
        return ""
    low = f"{'≥' if 'ge' in bounds else '>'} {bounds.get('ge', bounds.get('gt'))}"
    high = f"{'≤' if 'le' in bounds else '<'} {bounds.get('le', bounds.get('lt'))}"
    parts = [p for p, k in ((low, ("ge", "gt")), (high, ("le", "lt"))) if set(k) & set(bounds)]
    return f" (allowed: {' and '.join(parts)})"

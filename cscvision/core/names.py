"""Names read from files (slide ids, target, class, marker and encoder names) are data,
never paths.

The allowed set: a name is allowed when :func:`safe_name` returns it unchanged, that is it

- is 1 to :data:`MAX_NAME_CHARS` characters long;
- holds only printable characters and none of ``/ \\ : * ? " < > |``;
- neither starts with a dot or a space (no ``.``, ``..`` or hidden names) nor ends with one;
- is not a Windows device name (``con``, ``prn``, ``aux``, ``nul``, ``com0``-``com9``,
  ``lpt0``-``lpt9``, with or without an extension).

Such a name is one path component on every filesystem, so it can be joined to a folder
without leaving it. A name read from a file (a manifest, a sidecar, a model card, a
``summary.json``) that is not allowed is refused with :class:`UnsafeNameError`, naming the
file, the row or field, and a safe spelling (:func:`check_name`); nothing is renamed
silently. Names the tool makes itself (file stems of slides) are made safe with
:func:`safe_name` instead.

Collisions: two names of one kind that differ only in case (``A`` and ``a``) would write one
file on macOS and Windows, so a set of names with such a pair is refused
(:func:`check_distinct`); a stem cut to :data:`MAX_NAME_CHARS` ends with 8 hex digits of a
digest of the whole name, so two long names never collide by being cut.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from cscvision.core.errors import CscvisionError

MAX_NAME_CHARS = 100
_UNSAFE_CHARS = set('/\\:*?"<>|')
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)),
             *(f"lpt{i}" for i in range(10))}  # fmt: skip


class UnsafeNameError(CscvisionError, ValueError):
    """A name read from a file cannot name a file or folder (see the module's rule)."""


def name_digest(text: str | Path) -> str:
    """8 hex digits of SHA-256 of ``text``: a short, stable tag for a name or path."""
    return hashlib.sha256(str(text).encode("utf-8", "surrogateescape")).hexdigest()[:8]


def safe_name(text: str) -> str:
    """``text`` made safe as a folder and file name on every filesystem.

    Separators, control characters and ``: * ? " < > |`` become ``_``; leading dots and
    spaces (``.``, ``..``, hidden names) and trailing dots and spaces become ``_``; an empty
    name becomes ``slide``; Windows device names get a ``_`` prefix; a name longer than
    :data:`MAX_NAME_CHARS` is cut and ends with 8 hex digits of a digest of the whole name.
    An allowed name comes back unchanged.
    """
    chars = ["_" if c in _UNSAFE_CHARS or not c.isprintable() else c for c in text]
    name = "".join(chars)
    core = name.lstrip(". ")
    name = "_" * (len(name) - len(core)) + core
    core = name.rstrip(". ")
    name = core + "_" * (len(name) - len(core)) if core else name
    if not name.strip("_"):
        name = name or "slide"
    if name.split(".")[0].casefold() in _RESERVED:
        name = "_" + name
    if len(name) > MAX_NAME_CHARS:
        name = f"{name[: MAX_NAME_CHARS - 9]}-{name_digest(text)}"
    return name


def is_safe_name(text: object) -> bool:
    """True for a name of the allowed set (the module's rule)."""
    return isinstance(text, str) and bool(text) and safe_name(text) == text


def check_name(text: object, what: str, where: str) -> str:
    """``text`` if it is an allowed name; else :class:`UnsafeNameError` naming ``where``
    (the file and row or field), ``what`` (``slide_id``, ``target``, ...) and a safe
    spelling to use instead."""
    if is_safe_name(text):
        return str(text)
    hint = f"; use for example {safe_name(text)!r}" if isinstance(text, str) and text else ""
    raise UnsafeNameError(
        f"{where}: {what} {text!r} cannot name a file or folder (names are data, never "
        f'paths: no / \\ : * ? " < > |, no leading or trailing dot or space, at most '
        f"{MAX_NAME_CHARS} characters){hint}"
    )


def check_distinct(names: Iterable[str], what: str, where: str) -> None:
    """Refuse two ``what`` names of ``names`` that differ only in case (one file on macOS and
    Windows): :class:`UnsafeNameError` naming both."""
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(name.casefold(), name)
        if other != name:
            raise UnsafeNameError(
                f"{where}: {what} {other!r} and {name!r} differ only in case and would name "
                "one file; rename one of them"
            )


def child(folder: str | Path, name: str, suffix: str = "", *, what: str = "name") -> Path:
    """``folder/<name><suffix>`` for an allowed ``name`` (else :class:`UnsafeNameError`)."""
    return Path(folder) / f"{check_name(name, what, str(folder))}{suffix}"

"""Files the package carries: the demo model and the default training configs.

They live in ``cscvision/resources/`` (package data, so a wheel carries them); the clone's
``models/demo-synthetic`` and ``configs`` are links to these folders. Kinds are
subfolders (``models``, ``configs``, and whatever a later stage adds), found through
:mod:`importlib.resources`, so the same code serves a clone, an editable install and a wheel.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["packaged_dir", "packaged_names"]


def packaged_dir(kind: str) -> Path:
    """The folder of packaged ``kind`` resources (``models``, ``configs``, ...)."""
    root = files("cscvision") / "resources" / kind
    return Path(str(root))  # installed wheels and clones are plain folders, never zips


def packaged_names(kind: str, suffix: str = "") -> list[str]:
    """Names of the packaged ``kind`` resources: folders, or files ending in ``suffix``."""
    folder = packaged_dir(kind)
    if not folder.is_dir():
        return []
    if suffix:
        return sorted(p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}") if p.is_file())
    return sorted(p.name for p in folder.iterdir() if p.is_dir())

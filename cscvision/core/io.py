"""Atomic writers: every output is written under a temporary name in its folder, then renamed."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import secrets
import socket
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cscvision.core.errors import CscvisionError


def _umask_file_mode() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _umask_file_mode()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the suffix, so libraries that pick a format from it still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _create_temp(path)
    try:
        yield tmp_path
        # Some writers (safetensors) replace the file with a 0600 one of their own.
        os.chmod(tmp_path, _FILE_MODE)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


# Temporary names carry the writing process (host and pid), so that a clean-up never
# removes a file another live process is still writing: ``.<stem>.<host>-<pid>-<hex>.tmp<ext>``.
_HOST = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:32] or "host"


def _create_temp(path: Path) -> Path:
    """A new empty file beside ``path``, created with the umask's mode (mkstemp's is 0600,
    which would leave outputs unreadable by the group after the rename)."""
    while True:
        owner = f"{_HOST}-{os.getpid()}"
        tmp = path.parent / f".{path.stem}.{owner}-{secrets.token_hex(4)}.tmp{path.suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp


def is_stale_temp(path: Path) -> bool:
    """True for a temporary file of :func:`atomic_path` whose writer has ended: one of this
    host whose process is gone (killed mid-write), or one whose name does not say its writer
    (written before names did). Another host's, or a live process's, is never stale: that
    process may still rename it."""
    if ".tmp" not in path.name or not path.name.startswith("."):
        return False
    owner = path.name.rsplit(".tmp", 1)[0].rsplit(".", 1)[-1].split("-")  # host, pid, hex
    if len(owner) != 3 or not owner[1].isdigit():
        return True  # a name without its writer: from a version before names carried it
    host, pid = owner[0], int(owner[1])
    if host != _HOST or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def inside(root: str | Path, path: str | Path) -> Path:
    """``path`` resolved, if it lies inside ``root`` (resolved); else ``ValueError``.

    Every per-slide output path goes through this, so no slide id or file name can make a
    writer escape the output folder (``..``, absolute parts, symlinks out of it)."""
    root_r, path_r = Path(root).resolve(), Path(path).resolve()
    if path_r != root_r and root_r not in path_r.parents:
        raise ValueError(f"{path}: refusing to write outside the output folder {root}")
    return path_r


class NotWritable(CscvisionError, ValueError):
    """An output folder that cannot be written (read-only, full, not a folder)."""


def check_writable(folder: str | Path, flag: str = "--out") -> Path:
    """Create ``folder`` and write (then remove) a probe file in it, so a read-only or full
    output folder is one clear error before any slide is read; raises :class:`NotWritable`
    (a ``ValueError``)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = _create_temp(folder / ".cscvision-probe")  # a name of this process alone
        try:
            with probe.open("wb") as f:
                f.write(b"\0" * 65536)
                f.flush()
                os.fsync(f.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as e:
        reason = e.strerror or str(e)
        raise NotWritable(
            f"{flag} {folder}: cannot write there ({reason}); choose a writable folder with "
            "free space"
        ) from None
    return folder


def check_free_space(folder: str | Path, need_bytes: int, flag: str = "--out") -> None:
    """``ValueError`` naming ``flag`` when ``folder``'s filesystem has less than
    ``need_bytes`` free (an estimate of what the command will write), before any work."""
    import shutil

    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise ValueError(
            f"{flag} {folder}: {free / 2**20:.0f} MiB free, about {need_bytes / 2**20:.0f} MiB "
            "needed; free space or choose another folder"
        )


def file_sha256(path: str | Path) -> str:
    """The sha256 (hex) of a file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def write_csv(
    path: str | Path, header: Sequence[str] | None, rows: Iterable[Sequence[Any]]
) -> Path:
    """Write ``rows`` under ``header`` (``None``: no header line) atomically."""
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if header is not None:
            writer.writerow(header)
        writer.writerows(rows)
    return Path(path)


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with Path(path).open(newline="", encoding="utf-8-sig") as f:  # Excel writes a BOM
        return list(csv.DictReader(f))


def write_png(path: str | Path, rgb: np.ndarray, colours: int = 0) -> Path:
    """``rgb`` as a PNG; with ``colours`` (2-256), a palette of that many (a figure: about
    3x smaller; maximum coverage then k-means, so that flat colours such as a colour bar's
    stay within a few levels, where median cut moved them by up to 91)."""
    from PIL import Image

    image = Image.fromarray(rgb)
    if colours:
        image = image.quantize(colours, method=Image.Quantize.MAXCOVERAGE, kmeans=3)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)

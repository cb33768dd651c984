"""Guards for batches that share an output folder or get stopped: per-slide locks, signals.

A batch (``cscvision tile``/``infer``) takes a lock file in each slide's folder before it
looks at or writes that folder, so SLURM shards and other runs on the same ``--out`` never
write one slide at once. SIGTERM (a SLURM time limit) and SIGINT (Ctrl-C) end the batch
between or inside slides with an exception, so every ``finally`` runs (temporary files
are removed) and the batch writes its tables for what finished.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from cscvision.core.errors import CscvisionError

LOCK_FILE = ".cscvision.lock"
TABLES_LOCK_FILE = ".cscvision-tables.lock"
RUN_LOCK_FILE = ".cscvision-run.lock"


class SlideBusy(CscvisionError):
    """Another run holds the lock of this slide's folder."""


class Interrupted(BaseException):
    """The batch got SIGTERM or SIGINT; ``signum`` says which (exit status 128 + signum)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def slide_lock(folder: str | Path, *, wait: bool = False) -> Iterator[Path]:
    """Hold ``folder/.cscvision.lock`` (created with the folder) for the block
    (:func:`item_lock`)."""
    folder = Path(folder)
    with item_lock(folder / LOCK_FILE, wait=wait, busy=folder):
        yield folder


@contextlib.contextmanager
def item_lock(
    lock_file: str | Path, *, wait: bool = False, busy: str | Path | None = None
) -> Iterator[Path]:
    """Hold the lock file ``lock_file`` (its folder created) for the block.

    Raises :class:`SlideBusy` (naming ``busy``, default the lock file) at once when another
    process holds it, or waits for it with ``wait``. The lock is an ``fcntl`` lock
    (``filelock``): the kernel drops it when the process dies, so a killed run never leaves
    an item locked. The lock file stays (deleting it would let two runs lock two different
    files of one name).
    """
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_file, timeout=-1 if wait else 0, thread_local=False)
    try:
        lock.acquire(poll_interval=0.2)
    except Timeout:
        what = busy or lock_file
        raise SlideBusy(f"{what}: another run is processing this slide") from None
    try:
        yield lock_file
    finally:
        lock.release()


class OutBusy(CscvisionError):
    """Another run of a command whose outputs are one whole holds the output folder."""


@contextlib.contextmanager
def run_lock(out: str | Path, command: str) -> Iterator[None]:
    """Hold ``out/.cscvision-run.lock`` for a whole run of ``command``: for commands whose
    outputs belong together (``labels``: thresholds and quantiles chosen from every slide,
    one ``cohort.csv``), the run, not the slide, is what two runs must not share.
    :class:`OutBusy` at once when another run holds it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out / RUN_LOCK_FILE, timeout=0, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise OutBusy(
            f"--out {out}: another cscvision {command} run is writing there; wait for it to "
            "end, or give this run another --out"
        ) from None
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def table_lock(path: str | Path) -> Iterator[None]:
    """Hold the run tables' lock (one per folder) while the table ``path`` is read, merged
    and written."""
    with FileLock(Path(path).with_name(TABLES_LOCK_FILE), thread_local=False):
        yield


_LOST: list[int] = []  # signals whose Interrupted a finalizer swallowed, not yet raised
_STOPPING: list[int] = []  # signals raised as Interrupted by the current block


def raise_lost_signal() -> None:
    """Raise :class:`Interrupted` for a signal whose exception was lost (raised inside a
    finalizer or a weakref callback, where Python prints "Exception ignored" and goes on).
    Batch loops call it between items (:func:`cscvision.core.batch.run_items`); blocks of
    :func:`interrupt_on_signals` call it as they end. Not from a thread, a timer or the
    hook itself: a handler run there would be lost the same way, and a thread started
    from a finalizer can deadlock on the lock the collected code held."""
    if _LOST:
        signum = _LOST[0]
        _LOST.clear()
        raise Interrupted(signum)


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Interrupted` and SIGINT raises it too
    (instead of ``KeyboardInterrupt``), in the main thread; elsewhere a no-op. A signal whose
    exception was lost is noted and raised at the next item of a batch or when the block
    ends (:func:`raise_lost_signal`). Once a signal has stopped the block, an error in a
    finalizer is not printed (an object the signal left half-built), there and after the
    block, until the next block begins."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous_hook = sys.unraisablehook
    _STOPPING.clear()

    def handler(signum: int, _frame: object) -> None:
        _STOPPING.append(signum)
        raise Interrupted(signum)

    def unraisable(info: Any) -> None:
        if isinstance(info.exc_value, Interrupted):
            _LOST.append(info.exc_value.signum)
        elif not _STOPPING:
            previous_hook(info)
        # else the echo of the stop: the finalizer of an object the signal left half-built or
        # half-updated (seen: tqdm's __del__), run as the interrupted frames are freed;
        # printed, its traceback read as a crash (a fresh-clone run, 2026-12-07)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if not _STOPPING:  # else the frames are freed by the caller, after this block
            sys.unraisablehook = previous_hook
    raise_lost_signal()  # reached only when the block ended without an exception


@contextlib.contextmanager
def defer_signals() -> Iterator[None]:
    """Within the block SIGTERM and SIGINT are noted, not acted on; :class:`Interrupted` is
    raised when the block ends. For short phases that must finish as a whole (writing a
    cohort's tables after their shared thresholds), so a signal never leaves half of them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        got.append(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if got:
        raise Interrupted(got[0])


def interrupted_notice(command: str, signum: int, done: str) -> str:
    """The one line a command ended by a signal prints (to stderr): what was kept, and that
    the same command resumes."""
    name = signal.Signals(signum).name
    return f"cscvision {command}: stopped by {name}; {done}; re-run the same command to resume"

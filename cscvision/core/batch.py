"""The one per-item loop of every command that walks slides or samples.

``tile``, ``infer``, ``features``, ``cells`` (through :func:`cscvision.slides.batch.run_batch`)
and ``labels ihc|st|cells|mif`` run their items through :func:`run_items`, so each keeps the
same promises:

- an item is anything with a ``slide_id`` and a ``slide_path``; the ids must be allowed
  names (:mod:`cscvision.core.names`), checked again before the first item runs, so an id
  joined to ``--out`` names one file inside it;
- with ``lock_of`` each item runs under its own lock file (:func:`~cscvision.core.guard.item_lock`):
  an item another run holds is skipped as busy, or waited for;
- an item whose outputs are complete is skipped (resume) unless ``overwrite``;
- a failing item is recorded in :attr:`BatchReport.failed` and the batch goes on;
- SIGTERM and SIGINT end the loop with :attr:`BatchReport.interrupted` set, so the caller
  writes its tables for what finished and exits 128 + the signal's number;
- the tables the caller writes are merged by id with earlier runs' (:func:`merge_table`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cscvision.core.guard import (
    Interrupted,
    SlideBusy,
    interrupt_on_signals,
    item_lock,
    raise_lost_signal,
    table_lock,
)
from cscvision.core.io import read_csv, write_csv
from cscvision.core.names import check_distinct, check_name


class Item(Protocol):
    """What :func:`run_items` needs of an item."""

    @property
    def slide_id(self) -> str: ...

    @property
    def slide_path(self) -> Path: ...


T = TypeVar("T", bound=Item)


@dataclass(frozen=True)
class BatchItem:
    """An item of a command whose rows carry more than a slide (a manifest row's entry, its
    other input paths): ``data`` is what the command's ``process`` needs."""

    slide_id: str
    slide_path: Path
    data: Any = None


@dataclass
class BatchReport:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # id, path, reason
    busy: list[str] = field(default_factory=list)  # held by another run: not touched
    seconds: float = 0.0
    interrupted: int | None = None  # the signal that ended the batch early
    in_progress: str | None = None  # the item abandoned when it did
    results: dict[str, Any] = field(default_factory=dict)  # id -> what ``process`` returned

    @property
    def ok(self) -> bool:
        return not self.failed


def plain_reason(item: Item, error: BaseException, existed: bool) -> str:
    """``Type: message``, or that the slide file went away while the item ran."""
    gone = went_away_reason(item.slide_path, existed)
    return gone or f"{type(error).__name__}: {error}"


def run_items(
    items: Sequence[T],
    process: Callable[[T], Any],
    *,
    is_complete: Callable[[T], bool] | None = None,
    overwrite: bool = False,
    desc: str = "slides",
    record: tuple[type[BaseException], ...] = (Exception,),
    reason: Callable[[T, BaseException, bool], str] = plain_reason,
    lock_of: Callable[[T], Path] | None = None,
    wait: bool = False,
    check: Callable[[T], None] | None = None,
    on_error: Callable[[T, BaseException], None] | None = None,
) -> BatchReport:
    """Run ``process`` on each item with a progress bar; what it returns (not None) is kept
    in :attr:`BatchReport.results` by id, in item order.

    Every id must be an allowed name, no two differing only in case
    (:class:`~cscvision.core.names.UnsafeNameError` before any item runs). Per item, in
    order: ``check`` (raises for an input refused before anything opens it),
    the lock ``lock_of`` names (:class:`SlideBusy`: recorded as busy), ``is_complete``
    (skipped unless ``overwrite``), ``process``. An error of a ``record`` type is recorded as
    failed with ``reason(item, error, existed)`` (``existed``: the slide file was there when
    the item started) and the batch goes on; any other error propagates. SIGTERM or SIGINT
    stops the batch: the report says which, and the item abandoned.
    """
    from tqdm.auto import tqdm

    for item in items:  # ids name files: data, never paths (their readers check them first)
        check_name(item.slide_id, "slide_id", str(item.slide_path))
    check_distinct((item.slide_id for item in items), "slide_id", "this batch")
    report = BatchReport()
    start = time.perf_counter()
    bar = tqdm(items, desc=desc, unit="slide", dynamic_ncols=True)
    with interrupt_on_signals():
        try:
            for item in bar:
                raise_lost_signal()  # a signal a finalizer swallowed stops the batch here
                bar.set_postfix_str(item.slide_id)
                report.in_progress = item.slide_id
                existed = os.path.lexists(item.slide_path)
                try:
                    _run_one(item, process, is_complete, report, overwrite, lock_of, wait, check)
                except record as e:  # one bad item must not stop the batch
                    report.failed.append((item.slide_id, str(item.slide_path),
                                          reason(item, e, existed)))  # fmt: skip
                    if on_error is not None:
                        on_error(item, e)
            raise_lost_signal()
            report.in_progress = None
        except Interrupted as e:
            report.interrupted = e.signum
        finally:
            bar.close()
    report.seconds = time.perf_counter() - start
    return report


def _run_one(item, process, is_complete, report, overwrite, lock_of, wait, check) -> None:
    if check is not None:
        check(item)
    try:
        lock = item_lock(lock_of(item), wait=wait) if lock_of else contextlib.nullcontext()
        with lock:
            if not overwrite and is_complete is not None and is_complete(item):
                report.skipped.append(item.slide_id)
                return
            value = process(item)
    except SlideBusy:
        report.busy.append(item.slide_id)
        return
    report.done.append(item.slide_id)
    if value is not None:
        report.results[item.slide_id] = value


def went_away_reason(slide_path: str | Path, existed: bool = True) -> str | None:
    """The ``errors.csv`` reason for a slide whose file was there when its job started and is
    gone now (deleted or moved while the batch ran), whatever error the reader gave; None
    when the file is still there."""
    if not existed or os.path.lexists(slide_path):
        return None
    return (
        f"SlideError: {slide_path}: the slide file went away while it was read (deleted or "
        "moved during the run); put it back and re-run to resume"
    )


def out_of_memory_reason(slide_path: str | Path) -> str:
    """The ``errors.csv`` reason for a slide that ran out of memory (no traceback)."""
    return (
        f"MemoryError: {slide_path}: ran out of memory on this slide; check its size and "
        "µm/px, or lower --batch-size / --workers"
    )


def merge_table(
    path: Path, header: Sequence[str], rows: Iterable[Sequence[object]], drop: Iterable[str] = ()
) -> Path:
    """Write ``rows`` (keyed by their first column, ``slide_id``) to ``path`` and keep the
    rows of slides an earlier run wrote there that these rows and ``drop`` do not name: the
    newest row of a slide wins. Under a lock beside ``path``, so concurrent runs never drop
    each other's rows."""
    new = [list(r) for r in rows]
    with table_lock(path):
        old = read_csv(path) if path.is_file() else []
        gone = {str(r[0]) for r in new} | set(drop)
        kept = [[r.get(c) or "" for c in header] for r in old if r.get(header[0]) not in gone]
        write_csv(path, header, new + kept)
    return path

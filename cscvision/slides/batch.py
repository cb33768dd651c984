"""Batches of slides: input discovery, sharding, resume, error records and progress.

Used by ``cscvision tile``, ``infer``, ``features`` and ``cells``, through the one per-item
loop of :mod:`cscvision.core.batch`: one bad slide is recorded in ``errors.csv`` and skipped;
the others finish. Each slide is processed under a lock (another run's slide is skipped as
busy, or waited for); SIGTERM and SIGINT end the batch with
:attr:`BatchReport.interrupted` set, after the tables are written.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cscvision.core.batch import (
    BatchReport,
    merge_table,
    out_of_memory_reason,
    run_items,
    went_away_reason,
)
from cscvision.core.errors import CscvisionError
from cscvision.core.guard import LOCK_FILE
from cscvision.core.io import inside, read_csv
from cscvision.slides.grid import path_digest, safe_slide_id, slide_id_of

SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide",
    ".dcm", ".png", ".jpg", ".jpeg",
)  # fmt: skip
PLAIN_IMAGES = (".png", ".jpg", ".jpeg")  # slides only in a folder without whole-slide files


class BatchError(CscvisionError):
    """The batch itself cannot start (no inputs, clashing slide ids, bad shard)."""


@dataclass(frozen=True)
class SlideJob:
    slide_path: Path
    slide_id: str
    mpp: float | None = None  # level-0 µm/px override for this slide, if any


@dataclass(frozen=True)
class SlideInput:
    """A slide named on the command line, found in a folder, or listed in a manifest
    (whose ``slide_id`` column, when given, is the slide's id)."""

    path: Path
    slide_id: str | None = None


DICOM_SUFFIX = ".dcm"


def _has_slide_suffix(path: Path) -> bool:
    return path.suffix.lower() in SLIDE_SUFFIXES and not path.name.startswith(".")


def _is_slide_file(path: Path) -> bool:
    """A slide file of a folder listing; ``.dcm`` files are parts of a DICOM WSI's folder."""
    return path.is_file() and _has_slide_suffix(path) and path.suffix.lower() != DICOM_SUFFIX


def is_dicom_folder(path: Path) -> bool:
    """A folder holding ``.dcm`` files and no other slide files: one DICOM WSI."""
    if not path.is_dir() or path.name.startswith("."):
        return False
    names = [p for p in path.iterdir() if not p.name.startswith(".")]
    has_dcm = any(p.suffix.lower() == DICOM_SUFFIX and p.is_file() for p in names)
    return has_dcm and not any(_is_slide_file(p) for p in names)


def _folder_slides(folder: Path) -> list[Path]:
    """A folder's slides: its whole-slide files, subfolders that are DICOM WSIs (a folder of
    ``.dcm`` files is itself one), and directories named like a slide (reported as failed,
    not silently dropped); plain PNG/JPEG images only when the folder holds no whole-slide
    file (so ``cscvision synth``'s masks and thumbnails are not slides)."""
    if is_dicom_folder(folder):
        return [folder]
    named = sorted(
        p
        for p in folder.iterdir()
        if _is_slide_file(p) or is_dicom_folder(p) or (p.is_dir() and _has_slide_suffix(p))
    )
    whole = [p for p in named if p.suffix.lower() not in PLAIN_IMAGES]
    if whole:
        return whole
    return [p for p in named if not p.is_dir()]


def _from_manifest(csv_path: Path) -> list[SlideInput]:
    rows = read_csv(csv_path)
    column = next((c for c in ("slide_path", "slide", "path") if rows and c in rows[0]), None)
    if column is None:
        raise BatchError(f"{csv_path}: a slide manifest needs a 'slide_path' column")
    found = []
    for line, row in enumerate(rows, start=2):
        if not (row[column] or "").strip():
            continue
        slide_id = (row.get("slide_id") or "").strip() or None
        if slide_id is not None and safe_slide_id(slide_id) != slide_id:
            raise BatchError(
                f"{csv_path} line {line}: slide_id {slide_id!r} cannot name a folder; "
                f"use for example {safe_slide_id(slide_id)!r}"
            )
        path = Path(os.path.abspath(csv_path.parent / row[column].strip()))
        found.append(SlideInput(path, slide_id))
    return found


def collect_inputs(inputs: Sequence[str | Path]) -> list[SlideInput]:
    """Slides from files, folders (see :func:`_folder_slides`; not recursive; a folder of
    ``.dcm`` files is one DICOM WSI) and manifest CSVs. A path that does not exist is kept,
    so that it is reported as a failed slide."""
    slides: list[SlideInput] = []
    for item in map(Path, inputs):
        if item.is_dir() and (is_dicom_folder(item) or not _has_slide_suffix(item)):
            slides.extend(SlideInput(p) for p in _folder_slides(item))
        elif item.suffix.lower() == ".csv" and item.is_file():
            slides.extend(_from_manifest(item))
        else:
            slides.append(SlideInput(item))
    if not slides:
        raise BatchError(f"no slides found in {', '.join(map(str, inputs))}")
    return slides


def collect_slides(inputs: Sequence[str | Path]) -> list[Path]:
    """The paths of :func:`collect_inputs`."""
    return [s.path for s in collect_inputs(inputs)]


def input_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be a slide file before anything opens it, or None."""
    path = Path(path)
    try:
        path.stat()
    except OSError as e:
        if e.errno == 40:  # ELOOP
            return f"{path}: a symbolic link loop; point it at the slide file"
        return None  # missing files are reported by the reader
    if path.is_dir() and not is_dicom_folder(path):
        return (
            f"{path}: a directory, not a slide file; pass the slide files inside it, or "
            "rename the folder if it is not a slide"
        )
    return None


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` with 0 ≤ i < N (SLURM: ``--array=0-(N-1)``, ``$SLURM_ARRAY_TASK_ID/N``)."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise BatchError(f"--shard {text!r}: expected i/N, for example 0/4") from None
    if not (count >= 1 and 0 <= index < count):
        raise BatchError(f"--shard {text!r}: need 0 <= i < N")
    return index, count


def shard_jobs(jobs: Sequence[SlideJob], index: int, count: int) -> list[SlideJob]:
    """A deterministic partition: jobs sorted by slide id, every count-th from ``index``."""
    ordered = sorted(jobs, key=lambda j: j.slide_id)
    return ordered[index::count]


def make_jobs(
    slides: Sequence[Path | SlideInput],
    overrides: dict[str, float] | None = None,
    slide_mpp: float | None = None,
) -> list[SlideJob]:
    """One job per slide, with its id: the manifest's ``slide_id``, else the safe file stem.

    Two different files whose stems give one id (case-insensitively: one folder on macOS and
    Windows) both get ``<stem>-<8 hex digits of the resolved path>``, an id of the path
    alone; a manifest id that clashes is an error.
    """
    from cscvision.slides.slide import override_for

    items = [s if isinstance(s, SlideInput) else SlideInput(Path(s)) for s in slides]
    unique: dict[Path, SlideInput] = {}
    for item in items:  # the same file named twice (folder and manifest, say) is one job
        known = unique.setdefault(resolved_path(item.path), item)
        if item.slide_id and not known.slide_id:
            unique[resolved_path(item.path)] = item
    stems: dict[str, int] = {}
    for item in unique.values():
        if item.slide_id is None:
            key = slide_id_of(item.path).casefold()
            stems[key] = stems.get(key, 0) + 1
    jobs, seen = [], {}
    for resolved, item in unique.items():
        slide_id = item.slide_id or slide_id_of(item.path)
        if item.slide_id is None and stems[slide_id.casefold()] > 1:
            slide_id = f"{slide_id[:90]}-{path_digest(resolved)}"
        if slide_id.casefold() in seen:
            raise BatchError(
                f"two slides share the id {slide_id!r}: {seen[slide_id.casefold()]} and "
                f"{item.path}; give each its own slide_id in the manifest"
            )
        seen[slide_id.casefold()] = item.path
        mpp = slide_mpp if slide_mpp is not None else override_for(item.path, overrides or {})
        jobs.append(SlideJob(slide_path=item.path, slide_id=slide_id, mpp=mpp))
    return jobs


def resolved_path(path: Path) -> Path:
    """``path.resolve()``, or the absolute path where it cannot be resolved (a symlink loop)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: reported when the job runs
        return Path(os.path.abspath(path))


def slide_dir(out_dir: str | Path, slide_id: str) -> Path:
    """``out_dir/<slide_id>``, refused (``ValueError``) unless it lies inside ``out_dir``."""
    folder = Path(out_dir) / slide_id
    inside(out_dir, folder)
    if folder.resolve() == Path(out_dir).resolve():
        raise ValueError(f"slide id {slide_id!r} would write into the --out root {out_dir}")
    return folder


def shard_suffix(shard: tuple[int, int] | None) -> str:
    """What a shard adds to the name of a table it writes: ``_shard{i}of{N}``."""
    return "" if shard is None else f"_shard{shard[0]}of{shard[1]}"


def errors_name(shard: tuple[int, int] | None) -> str:
    return f"errors{shard_suffix(shard)}.csv"


def write_errors(out_dir: Path, report: BatchReport, shard: tuple[int, int] | None = None) -> Path:
    """``errors.csv``: this run's failures, and earlier failures of slides this run did not
    settle (a slide done or skipped as complete leaves it)."""
    path = out_dir / errors_name(shard)
    settled = [*report.done, *report.skipped]
    return merge_table(path, ["slide_id", "slide_path", "error"], report.failed, drop=settled)


def run_batch(
    jobs: Sequence[SlideJob],
    process: Callable[[SlideJob], None],
    is_complete: Callable[[SlideJob], bool],
    *,
    overwrite: bool = False,
    desc: str = "slides",
    on_error: Callable[[SlideJob, BaseException], None] | None = None,
    folder_of: Callable[[SlideJob], Path] | None = None,
    lock_of: Callable[[SlideJob], Path] | None = None,
    wait: bool = False,
) -> BatchReport:
    """:func:`~cscvision.core.batch.run_items` over slides: a path that cannot be a slide is
    failed before anything opens it; each job runs under the lock file ``lock_of`` names,
    or with ``folder_of`` the lock of its folder (one another run holds is skipped as busy,
    or, with ``wait``, waited for); an unexpected error's reason carries a short traceback."""
    if folder_of is not None:
        lock_of = lambda job: folder_of(job) / LOCK_FILE  # noqa: E731
    return run_items(jobs, process, is_complete=is_complete, overwrite=overwrite, desc=desc,
                     reason=_slide_reason, lock_of=lock_of, wait=wait, check=_check_input,
                     on_error=on_error)  # fmt: skip


def _check_input(job: SlideJob) -> None:
    problem = input_problem(job.slide_path)
    if problem is not None:
        from cscvision.slides.slide import SlideError

        raise SlideError(problem)


def _slide_reason(job: SlideJob, error: BaseException, existed: bool) -> str:
    reason = f"{type(error).__name__}: {error}"
    if isinstance(error, MemoryError):  # the last resort: reads over budget are refused
        return out_of_memory_reason(job.slide_path)
    if (gone := went_away_reason(job.slide_path, existed)) is not None:
        return gone
    if not _is_expected(error):
        reason += " | " + traceback.format_exc(limit=3).replace("\n", " ")
    return reason


def _is_expected(error: Exception) -> bool:
    from cscvision.slides.slide import SlideError

    return isinstance(error, (SlideError, OSError, ValueError))


def summary_lines(report: BatchReport, out_dir: Path, what: str, errors: Path) -> list[str]:
    lines = [
        f"{what}: {len(report.done)} done, {len(report.skipped)} skipped (complete), "
        f"{len(report.failed)} failed in {report.seconds:.1f} s",
        f"outputs: {out_dir}",
    ]
    if report.busy:
        lines.append(
            f"{len(report.busy)} slides left to the other run holding them (re-run, or "
            f"--wait, to check them): {', '.join(report.busy[:10])}"
        )
    if report.failed:
        lines.append(f"failed slides and reasons: {errors}")
        lines.extend(f"  {sid}: {reason.split(' | ')[0]}" for sid, _, reason in report.failed[:10])
    return lines


def interrupted_line(report: BatchReport, what: str) -> str:
    """The one line a batch ended by a signal prints (to stderr)."""
    import signal

    name = signal.Signals(report.interrupted).name if report.interrupted else "?"
    return (
        f"cscvision {what}: stopped by {name}; {len(report.done)} slides done, "
        f"{report.in_progress or 'no slide'} abandoned (no partial file kept); tables "
        "written for what finished; re-run the same command to resume"
    )

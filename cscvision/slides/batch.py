"""Batches of slides: input discovery, sharding, resume, error records and progress.

Used by ``cscvision tile`` and ``cscvision infer``: one bad slide is recorded in
``errors.csv`` and skipped; the others finish.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from cscvision.core.io import read_csv, write_csv
from cscvision.slides.grid import slide_id_of

SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide",
    ".dcm", ".png", ".jpg", ".jpeg",
)  # fmt: skip


class BatchError(Exception):
    """The batch itself cannot start (no inputs, clashing slide ids, bad shard)."""


@dataclass(frozen=True)
class SlideJob:
    slide_path: Path
    slide_id: str
    mpp: float | None = None  # level-0 µm/px override for this slide, if any


@dataclass
class BatchReport:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # id, path, reason
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


DICOM_SUFFIX = ".dcm"


def _is_slide_file(path: Path) -> bool:
    """A slide file of a folder listing; ``.dcm`` files are parts of a DICOM WSI's folder."""
    suffix = path.suffix.lower()
    return (
        path.is_file()
        and suffix in SLIDE_SUFFIXES
        and suffix != DICOM_SUFFIX
        and not path.name.startswith(".")
    )


def is_dicom_folder(path: Path) -> bool:
    """A folder holding ``.dcm`` files and no other slide files: one DICOM WSI."""
    if not path.is_dir() or path.name.startswith("."):
        return False
    names = [p for p in path.iterdir() if not p.name.startswith(".")]
    has_dcm = any(p.suffix.lower() == DICOM_SUFFIX and p.is_file() for p in names)
    return has_dcm and not any(_is_slide_file(p) for p in names)


def _list_folder(folder: Path) -> list[Path]:
    """Slide files of ``folder`` and its subfolders that are DICOM WSIs, sorted."""
    if is_dicom_folder(folder):
        return [folder]
    return sorted(p for p in folder.iterdir() if _is_slide_file(p) or is_dicom_folder(p))


def _from_manifest(csv_path: Path) -> list[Path]:
    rows = read_csv(csv_path)
    column = next((c for c in ("slide_path", "slide", "path") if rows and c in rows[0]), None)
    if column is None:
        raise BatchError(f"{csv_path}: a slide manifest needs a 'slide_path' column")
    return [(csv_path.parent / r[column]).resolve() for r in rows if r[column].strip()]


def collect_slides(inputs: Sequence[str | Path]) -> list[Path]:
    """Slides from files, folders (their slide files, not recursive) and manifest CSVs.

    A folder of ``.dcm`` files is one DICOM WSI; in a folder of slides, each subfolder that
    is a DICOM WSI is one slide, and loose ``.dcm`` files are not listed one by one. A path
    that does not exist is kept, so that it is reported as a failed slide.
    """
    slides: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            slides.extend(_list_folder(item))
        elif item.suffix.lower() == ".csv" and item.is_file():
            slides.extend(_from_manifest(item))
        else:
            slides.append(item)
    if not slides:
        raise BatchError(f"no slides found in {', '.join(map(str, inputs))}")
    return slides


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
    slides: Sequence[Path],
    overrides: dict[str, float] | None = None,
    slide_mpp: float | None = None,
) -> list[SlideJob]:
    """One job per slide; slide ids (file stems) must be unique, as they name output folders."""
    from cscvision.slides.slide import override_for

    jobs = []
    seen: dict[str, Path] = {}  # by case-folded id: one folder on macOS and Windows
    for path in slides:
        slide_id = slide_id_of(path)
        key = slide_id.casefold()
        if key in seen:
            if seen[key].resolve() == Path(path).resolve():
                continue  # the same file named twice (folder and manifest, say)
            raise BatchError(
                f"two slides share the id {slide_id!r}: {seen[key]} and {path}; "
                "rename one (outputs are named by slide id)"
            )
        seen[key] = path
        mpp = slide_mpp if slide_mpp is not None else override_for(path, overrides or {})
        jobs.append(SlideJob(slide_path=path, slide_id=slide_id, mpp=mpp))
    return jobs


def errors_name(shard: tuple[int, int] | None) -> str:
    return "errors.csv" if shard is None else f"errors_shard{shard[0]}of{shard[1]}.csv"


def write_errors(out_dir: Path, report: BatchReport, shard: tuple[int, int] | None = None) -> Path:
    path = out_dir / errors_name(shard)
    return write_csv(path, ["slide_id", "slide_path", "error"], report.failed)


def run_batch(
    jobs: Sequence[SlideJob],
    process: Callable[[SlideJob], None],
    is_complete: Callable[[SlideJob], bool],
    *,
    overwrite: bool = False,
    desc: str = "slides",
    on_error: Callable[[SlideJob, BaseException], None] | None = None,
) -> BatchReport:
    """Run ``process`` on each job with a progress bar; record failures and go on.

    A job whose outputs are complete is skipped unless ``overwrite``.
    """
    report = BatchReport()
    start = time.perf_counter()
    bar = tqdm(jobs, desc=desc, unit="slide", dynamic_ncols=True)
    for job in bar:
        bar.set_postfix_str(job.slide_id)
        if not overwrite and is_complete(job):
            report.skipped.append(job.slide_id)
            continue
        try:
            process(job)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # one bad slide must not stop the batch
            reason = f"{type(e).__name__}: {e}"
            if isinstance(e, MemoryError):  # the last resort: reads over budget are refused
                reason = out_of_memory_reason(job.slide_path)
            elif not _is_expected(e):
                reason += " | " + traceback.format_exc(limit=3).replace("\n", " ")
            report.failed.append((job.slide_id, str(job.slide_path), reason))
            if on_error is not None:
                on_error(job, e)
        else:
            report.done.append(job.slide_id)
    report.seconds = time.perf_counter() - start
    return report


def out_of_memory_reason(slide_path: str | Path) -> str:
    """The ``errors.csv`` reason for a slide that ran out of memory (no traceback)."""
    return (
        f"MemoryError: {slide_path}: ran out of memory on this slide; check its size and "
        "µm/px, or lower --batch-size / --workers"
    )


def _is_expected(error: Exception) -> bool:
    from cscvision.slides.slide import SlideError

    return isinstance(error, (SlideError, OSError, ValueError))


def summary_lines(report: BatchReport, out_dir: Path, what: str, errors: Path) -> list[str]:
    lines = [
        f"{what}: {len(report.done)} done, {len(report.skipped)} skipped (complete), "
        f"{len(report.failed)} failed in {report.seconds:.1f} s",
        f"outputs: {out_dir}",
    ]
    if report.failed:
        lines.append(f"failed slides and reasons: {errors}")
        lines.extend(f"  {sid}: {reason.split(' | ')[0]}" for sid, _, reason in report.failed[:10])
    return lines

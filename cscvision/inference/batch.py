"""One slide of an inference batch, the same wherever it runs.

``cscvision infer`` runs :func:`infer_job` for each slide in its own process; with
``--ray`` each Ray worker runs the very same function (:mod:`cscvision.inference.distributed`).
Either way the outputs are written by the same atomic writers into ``OUT/<slide_id>/``,
a slide counts as complete by the same test (:func:`job_complete`), and the driver writes
``errors.csv`` and ``results.csv`` the same way (:func:`write_results`).
"""

from __future__ import annotations

import dataclasses
import json
import traceback
from pathlib import Path
from typing import Any

import torch

from cscvision.inference.predict import PreparedSlide, predict_slide, prepare_slide
from cscvision.inference.prefetch import NextSlide
from cscvision.inference.settings import InferSettings
from cscvision.inference.trust import has_ood
from cscvision.models.export import LoadedModel
from cscvision.outputs.slide_folder import (
    SUMMARY,
    outputs_complete,
    run_settings,
    write_slide_outputs,
)
from cscvision.outputs.summary import DEFAULT_WITHIN_UM, result_columns, result_row
from cscvision.slides.batch import (
    BatchReport,
    SlideJob,
    merge_table,
    out_of_memory_reason,
    resolved_path,
    slide_dir,
)


def slide_settings(settings: InferSettings, job: SlideJob) -> dict[str, Any]:
    """What a slide's earlier outputs must match to count as complete."""
    return run_settings(
        overlap=settings.overlap,
        min_tissue=settings.min_tissue,
        mask_mpp=settings.mask_mpp,
        slide_mpp=job.mpp,
        within_um=settings.within_um,
        permutations=settings.permutations,
        asap_target=settings.asap_target,
        uncertainty=settings.uncertainty,
    )


def job_complete(
    job: SlideJob, out_dir: Path, model_info: dict[str, str], settings: InferSettings
) -> bool:
    """True when ``out_dir/<slide_id>/`` holds complete outputs of this model and settings."""
    return outputs_complete(
        slide_dir(out_dir, job.slide_id), model_info, slide_settings(settings, job)
    )


def prepare_job(job: SlideJob, model: LoadedModel, settings: InferSettings) -> PreparedSlide:
    """``job``'s slide opened, its tissue and grid found and (read by threads) its first
    batches read: what :class:`~cscvision.inference.prefetch.NextSlide` runs ahead."""
    read_ahead = 2 if settings.reader == "threads" else 0
    return prepare_slide(job.slide_path, model.card, settings, slide_mpp=job.mpp,
                         read_ahead=read_ahead)  # fmt: skip


def infer_job(
    job: SlideJob,
    model: LoadedModel,
    out_dir: Path,
    settings: InferSettings,
    *,
    model_info: dict[str, str],
    device: torch.device,
    progress: bool = False,
    prefetch: NextSlide | None = None,
) -> dict[str, Any]:
    """Score one slide and write its outputs into ``out_dir/<slide_id>/``; returns the
    summary. ``prefetch`` hands over the slide prepared ahead (and starts on the next).
    Raises what :func:`~cscvision.inference.predict.predict_slide` raises for a bad slide."""
    prepared = prefetch.take(job) if prefetch is not None else None
    on_device = dataclasses.replace(settings, device=str(device))  # resolved once, by the caller
    pred = predict_slide(job.slide_path, model, on_device, slide_mpp=job.mpp,
                         progress=progress, prepared=prepared)  # fmt: skip
    # The job's id (safe, or the manifest's) names the folder and the files in it.
    pred = dataclasses.replace(pred, grid=dataclasses.replace(pred.grid, slide_id=job.slide_id))
    return write_slide_outputs(
        pred,
        slide_dir(out_dir, job.slide_id),
        model.card,
        model_info=model_info,
        settings=slide_settings(settings, job),
    )


def failure_reason(error: BaseException) -> str:
    """The ``error`` column of ``errors.csv``: the message, plus a short traceback for
    errors that are not the usual bad-slide kind (as :func:`cscvision.slides.batch.run_batch`)."""
    from cscvision.slides.slide import SlideError

    reason = f"{type(error).__name__}: {error}"
    if isinstance(error, MemoryError):
        return out_of_memory_reason("this slide")
    if not isinstance(error, (SlideError, OSError, ValueError)):
        trace = traceback.format_exception(type(error), error, error.__traceback__, limit=3)
        reason += " | " + "".join(trace).replace("\n", " ")
    return reason


def write_results(
    path: Path,
    jobs: list[SlideJob],
    report: BatchReport,
    model: LoadedModel,
    *,
    within_um: float = DEFAULT_WITHIN_UM,
) -> Path:
    """``results.csv``: one row per slide of this run (done or skipped: from its summary;
    failed: the reason), merged with the rows earlier runs wrote for other slides (the
    newest row of a slide wins). Slides another run held (busy) or that the run did not
    reach before a signal keep their earlier row."""
    targets = model.card.targets
    failed = {sid: reason for sid, _, reason in report.failed}
    settled = set(report.done) | set(report.skipped)
    rows = []
    for job in jobs:
        if job.slide_id in failed:
            row = {"slide_id": job.slide_id, "slide_path": str(resolved_path(Path(job.slide_path)))}
            row.update(status="failed", error=failed[job.slide_id].split(" | ")[0])
        elif job.slide_id in settled:
            summary = json.loads((slide_dir(path.parent, job.slide_id) / SUMMARY).read_text())
            row = result_row(summary, targets)
        else:
            continue
        rows.append(row)
    columns = result_columns(targets, within_um, model.card.mil, ood=has_ood(model))
    return merge_table(path, columns, ([r.get(c, "") for c in columns] for r in rows))

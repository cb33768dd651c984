"""``cscvision infer``: score every tissue tile of a batch of slides and write maps.

Locally (one slide after another) or, with ``--ray``, on the workers of a Ray cluster;
both run :func:`cscvision.inference.batch.infer_job` on each slide.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cscvision.cli.common import (
    RayFlags,
    ThreadFlags,
    add_hardening_args,
    add_ray_args,
    add_settings_args,
    add_slide_args,
    check_batch_args,
    check_decode,
    corrupt_tiles_line,
    jobs_from_args,
    run_on_ray,
    settings_from_args,
)
from cscvision.core.validate import FlagError, check_flags
from cscvision.inference.settings import STATISTICS, InferSettings

if TYPE_CHECKING:
    from cscvision.models.export import LoadedModel
    from cscvision.slides.batch import BatchReport, SlideJob

__all__ = ["add_parser", "run"]

PER_SLIDE = (
    "tiles.csv, maps.npz, overlay_<target>.png, <id>_likelihood_map_<target>.tif, "
    "<id>.geojson, summary.json"
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "infer",
        help="score slides with an exported model and write heatmaps",
        description=(
            "Tile each slide at the model's µm/px and tile size, score every tissue tile, "
            "blend overlapping tiles into seamless maps and write OUT/<slide_id>/ "
            f"({PER_SLIDE}), plus OUT/results.csv (one row per slide) and OUT/errors.csv. "
            "Slides whose outputs are complete for this model and settings are skipped."
        ),
    )
    add_slide_args(p)
    p.add_argument(
        "--model",
        required=True,
        type=Path,
        action="append",
        metavar="DIR_OR_NAME",
        help="exported model folder, or a packaged model name: demo (synthetic data only); "
        "give it twice or more (or a folder holding several model folders) for an ensemble: "
        "the score is the members' mean, and --uncertainty ensemble adds their spread "
        "(members must share tile px, µm/px, normalisation and targets)",
    )
    add_settings_args(p, InferSettings, ["overlap", "batch_size", "workers", "reader", "device",
                                         "amp", "min_tissue", "mask_mpp"])  # fmt: skip
    add_settings_args(p, ThreadFlags, ["threads"])
    _add_encoder_args(p)
    _add_corrupt_tile_args(p)
    _add_statistics_args(p)
    _add_decode_args(p)
    add_hardening_args(p)
    _add_trust_args(p)
    add_ray_args(p)
    p.set_defaults(func=run)


def _add_encoder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--encoder-weights",
        type=Path,
        default=None,
        metavar="FILE",
        help="for a model that is a head on a foundation-model encoder (its card names the "
        "encoder): the encoder's local weights file; its sha256 must be the one the head was "
        "trained on (default: the file named at training, if it is still there)",
    )


def _add_corrupt_tile_args(p: argparse.ArgumentParser) -> None:
    add_settings_args(p, InferSettings, ["on_corrupt_tile"])


def _add_statistics_args(p: argparse.ArgumentParser) -> None:
    p.add_argument_group(
        STATISTICS,
        "Part of the settings a slide's outputs are complete for: changing one redoes "
        "the slides. See the README's Statistics section.",
    )
    add_settings_args(p, InferSettings, ["within_um", "permutations", "asap_target"])


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    add_settings_args(p, InferSettings, ["decode", "prefetch"], group="decoding and prefetch")


def _settings(args: argparse.Namespace) -> InferSettings:
    """The flags, checked before any slide or the model is read (:class:`FlagError`)."""
    settings_from_args(ThreadFlags, args)
    check_flags(RayFlags, ray_workers=args.ray_workers, ray_cpus=args.ray_cpus)
    return settings_from_args(InferSettings, args)


def _add_trust_args(p: argparse.ArgumentParser) -> None:
    """Per-tile uncertainty; the OOD score needs no flag (the model's card keeps it)."""
    p.add_argument_group(
        "trust",
        "A model whose card keeps an OOD record also writes an ood score per tile, an "
        "overlay_ood.png and an 'ood' verdict per slide (summary.json, results.csv, a "
        "warning line).",
    )
    add_settings_args(p, InferSettings, ["uncertainty"])


def run(args: argparse.Namespace) -> int:
    import torch

    from cscvision.inference.batch import write_results
    from cscvision.inference.predict import resolve_device
    from cscvision.inference.trust import check_uncertainty
    from cscvision.models.ensemble import LoadedEnsemble, load_models
    from cscvision.models.thresholds import threshold_warnings
    from cscvision.outputs.slide_folder import model_identity
    from cscvision.outputs.trust import ood_run_line
    from cscvision.slides.batch import (
        interrupted_line,
        shard_suffix,
        summary_lines,
        write_errors,
    )

    settings = _settings(args)  # bad input raises, before anything is written (cli.run_command)
    jobs, shard = jobs_from_args(args)
    if args.ray:
        from cscvision.inference.distributed import import_ray

        import_ray()  # before --out is made: without Ray nothing is written
    check_batch_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # With --ray the workers pick their own device; the driver only reads the card.
    device = resolve_device("cpu" if args.ray else settings.device)
    if not args.ray:
        check_decode(settings.decode, device.type)
    model = load_models(args.model, device, encoder_weights=args.encoder_weights)
    if args.ray and isinstance(model, LoadedEnsemble):
        raise FlagError("--ray: ensembles run on one machine; give --ray one --model")
    check_uncertainty(model, settings.uncertainty)
    for warning in threshold_warnings(model.card):
        print(f"warning: model {model.card.name}: {warning}", file=sys.stderr)
    if not model.card.ood:
        print(f"note: model {model.card.name} keeps no out-of-distribution record (exported "
              "before it existed): no ood scores or verdicts; add one with "
              "cscvision.training.refit.refit_ood (docs: how-to/trust)",
              file=sys.stderr)  # fmt: skip
    if settings.asap_target not in (None, *model.card.targets):
        raise FlagError(
            f"--asap-target {settings.asap_target!r}: the model's targets are "
            f"{', '.join(model.card.targets)}"
        )
    out: Path = args.out
    model_info = model_identity(model)
    if args.ray:
        report = _run_ray(args, jobs, model, settings, model_info)
        if report is None:
            return 2
        where = f"on Ray ({args.ray})"
    else:
        report = _run_local(args, jobs, model, settings, model_info, device)
        where = f"on {device}"
    errors = write_errors(out, report, shard)
    results = write_results(
        out / f"results{shard_suffix(shard)}.csv", jobs, report, model, within_um=settings.within_um
    )
    for line in summary_lines(report, out, "infer", errors):
        print(line)
    if skipped := corrupt_tiles_line(out, report.done, "summary.json"):
        print(skipped)
    if flagged := ood_run_line(out, [*report.done, *report.skipped]):
        print(flagged, file=sys.stderr)
    print(f"per slide, in {out}/<slide_id>/: {PER_SLIDE}")
    print(f"one row per slide: {results}")
    print(f"model {model.card.name} {where}{' with amp' if settings.amp else ''}")
    if report.interrupted:
        print(interrupted_line(report, "infer"), file=sys.stderr)
        return 128 + report.interrupted
    return 1 if report.failed else 0


def _run_local(args, jobs, model, settings, model_info, device) -> BatchReport:
    """One slide after another in this process, the next prepared while one is scored."""
    from cscvision.inference.batch import infer_job, job_complete, prepare_job
    from cscvision.inference.prefetch import NextSlide
    from cscvision.slides.batch import run_batch, slide_dir

    out: Path = args.out

    def pending(job: SlideJob) -> bool:
        return args.overwrite or not job_complete(job, out, model_info, settings)

    ahead = [] if not settings.prefetch else jobs
    with NextSlide(ahead, lambda job: prepare_job(job, model, settings), pending) as nxt:
        return run_batch(
            jobs,
            lambda job: infer_job(
                job,
                model,
                out,
                settings,
                model_info=model_info,
                device=device,
                progress=True,
                prefetch=nxt if settings.prefetch else None,
            ),
            lambda job: job_complete(job, out, model_info, settings),
            overwrite=args.overwrite,
            desc="infer",
            folder_of=lambda job: slide_dir(out, job.slide_id),
            wait=args.wait,
        )


def _run_ray(
    args: argparse.Namespace,
    jobs: list[SlideJob],
    model: LoadedModel,
    settings: InferSettings,
    model_info: dict[str, str],
) -> BatchReport | None:
    """The batch on Ray workers; None (after saying why) when it cannot start."""
    from cscvision.inference.batch import job_complete
    from cscvision.inference.distributed import infer_setup

    return run_on_ray(
        args,
        jobs,
        lambda job: job_complete(job, args.out, model_info, settings),
        infer_setup,
        (model, str(args.out), settings, model_info),
        command="infer",
    )

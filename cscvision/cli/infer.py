"""``cscvision infer``: score every tissue tile of a batch of slides and write maps."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cscvision.batch import (
    BatchError,
    BatchReport,
    SlideJob,
    run_batch,
    summary_lines,
    write_errors,
)
from cscvision.cli.common import add_slide_args, jobs_from_args
from cscvision.export import LoadedModel, ModelError, load_model
from cscvision.infer import READERS, predict_slide, resolve_device
from cscvision.io import write_csv
from cscvision.outputs import (
    SUMMARY,
    model_identity,
    outputs_complete,
    run_settings,
    write_slide_outputs,
)
from cscvision.slide import SlideError
from cscvision.writers.summary import result_columns, result_row

MAX_OVERLAP = 0.75
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
    p.add_argument("--model", required=True, type=Path, help="exported model folder")
    p.add_argument(
        "--overlap",
        type=float,
        default=0.0,
        help=f"fraction of a tile shared with its neighbour, 0 to {MAX_OVERLAP} (default 0); "
        "0.5 gives smoother maps for 4x the tiles",
    )
    p.add_argument("--batch-size", type=int, default=64, help="tiles per batch (default 64)")
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="readers working ahead of the model (default 2; 0 reads between batches)",
    )
    p.add_argument(
        "--reader",
        choices=READERS,
        default="threads",
        help="readers are threads of this process filling each batch (default; measured "
        "as fast or faster on CPU and GPU, memory flat), or DataLoader processes returning "
        "whole batches",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--amp",
        action="store_true",
        help="bfloat16 autocast on CPUs that support it, mixed precision on GPUs",
    )
    p.add_argument(
        "--min-tissue", type=float, default=0.5, help="score tiles with this tissue fraction"
    )
    p.add_argument(
        "--mask-mpp", type=float, default=8.0, help="µm/px of the tissue-detection thumbnail"
    )
    p.set_defaults(func=run)


def shard_suffix(shard: tuple[int, int] | None) -> str:
    return "" if shard is None else f"_shard{shard[0]}of{shard[1]}"


def _check(args: argparse.Namespace) -> None:
    if not 0 <= args.overlap <= MAX_OVERLAP:
        raise ValueError(f"--overlap {args.overlap}: choose a value from 0 to {MAX_OVERLAP}")
    if args.batch_size < 1 or args.workers < 0:
        raise ValueError("--batch-size must be ≥ 1 and --workers ≥ 0")


def run(args: argparse.Namespace) -> int:
    try:
        _check(args)
        jobs, shard = jobs_from_args(args)
        device = resolve_device(args.device)
        model = load_model(args.model, device)
    except (BatchError, SlideError, ModelError, ValueError, RuntimeError) as e:
        print(f"cscvision infer: {e}", file=sys.stderr)
        return 2
    model_info = model_identity(model)
    out: Path = args.out

    def settings(job: SlideJob) -> dict:
        return run_settings(
            overlap=args.overlap,
            min_tissue=args.min_tissue,
            mask_mpp=args.mask_mpp,
            slide_mpp=job.mpp,
        )

    def process(job: SlideJob) -> None:
        pred = predict_slide(
            job.slide_path,
            model,
            overlap=args.overlap,
            batch_size=args.batch_size,
            workers=args.workers,
            reader=args.reader,
            device=device,
            amp=args.amp,
            min_tissue=args.min_tissue,
            slide_mpp=job.mpp,
            mask_mpp=args.mask_mpp,
        )
        write_slide_outputs(
            pred, out / job.slide_id, model.card, model_info=model_info, settings=settings(job)
        )

    report = run_batch(
        jobs,
        process,
        lambda job: outputs_complete(out / job.slide_id, model_info, settings(job)),
        overwrite=args.overwrite,
        desc="infer",
    )
    errors = write_errors(out, report, shard)
    results = write_results(out / f"results{shard_suffix(shard)}.csv", jobs, report, model)
    for line in summary_lines(report, out, "infer", errors):
        print(line)
    print(f"per slide, in {out}/<slide_id>/: {PER_SLIDE}")
    print(f"one row per slide: {results}")
    print(f"model {model.card.name} on {device}{' with amp' if args.amp else ''}")
    return 1 if report.failed else 0


def write_results(
    path: Path, jobs: list[SlideJob], report: BatchReport, model: LoadedModel
) -> Path:
    """``results.csv``: one row per slide of this run (done or skipped: from its summary)."""
    targets = model.card.targets
    failed = {sid: reason for sid, _, reason in report.failed}
    rows = []
    for job in jobs:
        if job.slide_id in failed:
            row = {"slide_id": job.slide_id, "slide_path": str(Path(job.slide_path).resolve())}
            row.update(status="failed", error=failed[job.slide_id].split(" | ")[0])
        else:
            summary = json.loads((path.parent / job.slide_id / SUMMARY).read_text())
            row = result_row(summary, targets)
        rows.append(row)
    columns = result_columns(targets)
    return write_csv(path, columns, ([r.get(c, "") for c in columns] for r in rows))

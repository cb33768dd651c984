"""``cscvision features``: embed every tissue tile of a batch of slides into feature stores.

``cscvision encoders`` (:mod:`cscvision.cli.encoders`) lists the encoders this accepts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cscvision.cli.common import (
    RayFlags,
    ThreadFlags,
    add_hardening_args,
    add_ray_args,
    add_settings_args,
    add_slide_args,
    check_decode,
    jobs_from_args,
    run_on_ray,
    settings_from_args,
)
from cscvision.core.validate import check_flags
from cscvision.features.settings import ExtractSettings

if TYPE_CHECKING:
    from cscvision.features.extract import FeatureExtractor
    from cscvision.slides.batch import BatchReport, SlideJob

__all__ = ["WEIGHTS_DIR_ENV", "add_parser", "resolve_weights", "run"]

WEIGHTS_DIR_ENV = "CSCVISION_WEIGHTS_DIR"
RESULT_COLUMNS = ["slide_id", "slide_path", "status", "n_tiles", "dim", "store", "error"]
MIN_FREE_PER_SLIDE = 8 << 20  # a store of ~5,000 tiles × 768 features (float16), plus room


def add_weights_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"folder of encoder weights (default ${WEIGHTS_DIR_ENV}): DIR/<name>/<file as "
        "published>, or DIR/<name>.safetensors|.bin|.pth",
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "features",
        help="embed tissue tiles with an encoder into per-slide feature stores",
        description=(
            "Tile each slide at the encoder's µm/px and tile size, embed every tissue tile "
            "and write OUT/<slide_id>.h5 (xy_l0 int32[N,2], features float16[N,D], the "
            "encoder, weights sha256 and grid as attributes), plus OUT/results.csv and "
            "OUT/errors.csv. Weights come only from a local file; nothing is downloaded. "
            "Slides whose store is complete for this encoder and weights are skipped. "
            "Locally, or with --ray on the workers of a Ray cluster."
        ),
    )
    add_slide_args(p)
    add_hardening_args(p)
    p.add_argument("--encoder", required=True, help="encoder name (see cscvision encoders)")
    p.add_argument("--weights", type=Path, default=None, help="the encoder's weights file")
    add_weights_dir_arg(p)
    add_settings_args(p, ExtractSettings, FLAGS)
    add_settings_args(p, ThreadFlags, ["threads"])
    add_ray_args(p, holds="the encoder")
    p.set_defaults(func=run)


# the read settings features takes (no overlap: one embedding per tile; corrupt tiles fail)
FLAGS = ("batch_size", "workers", "reader", "device", "decode", "amp", "min_tissue", "mask_mpp")


def resolve_weights(name: str, weights: Path | None, weights_dir: Path | None) -> Path:
    """``--weights``, else the encoder's file in ``--weights-dir`` / $CSCVISION_WEIGHTS_DIR."""
    from cscvision.models.registry import EncoderError, configured_weights, get_encoder_spec

    if weights is not None:
        return weights
    spec = get_encoder_spec(name)
    folder = weights_dir or os.environ.get(WEIGHTS_DIR_ENV)
    found = configured_weights(spec, folder)
    if found is None:
        where = f" in {folder}" if folder else f" (no --weights-dir, ${WEIGHTS_DIR_ENV} unset)"
        raise EncoderError(
            f"encoder {name}: no weights file{where}; pass --weights FILE "
            f"({spec.weights_file}, published at {spec.weights_url or 'no URL'})"
        )
    return found


def _extractor(args: argparse.Namespace) -> FeatureExtractor:
    import torch

    from cscvision.core.io import file_sha256
    from cscvision.features.extract import FeatureExtractor
    from cscvision.features.store import import_h5py
    from cscvision.models.encoders import load_encoder

    import_h5py()  # say now, not once per slide, when the features extra is missing

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    weights = resolve_weights(args.encoder, args.weights, args.weights_dir)
    encoder = load_encoder(args.encoder, weights)
    digest = file_sha256(weights)
    # With --ray the workers pick their own device; the driver's copy only travels to them.
    device = "cpu" if args.ray else args.device
    extractor = FeatureExtractor(encoder, weights_sha256=digest, device=device, amp=args.amp)
    if not args.ray or args.device == "cpu":  # with --ray, auto/cuda: the workers' devices
        check_decode(args.decode, args.device if args.ray else extractor.device.type)
    return extractor


def _settings(args: argparse.Namespace) -> ExtractSettings:
    """The flags, checked once with the ranges every slide command has (:class:`FlagError`)."""
    settings_from_args(ThreadFlags, args)
    check_flags(RayFlags, ray_workers=args.ray_workers, ray_cpus=args.ray_cpus)
    return settings_from_args(ExtractSettings, args)


def run(args: argparse.Namespace) -> int:
    from cscvision.core.io import check_free_space, check_writable
    from cscvision.features.extract import (
        extract_slide,
        extraction_setup,
        store_lock_path,
        store_path,
    )
    from cscvision.features.store import STORE_SUFFIX, store_matches
    from cscvision.slides.batch import (
        interrupted_line,
        run_batch,
        shard_suffix,
        summary_lines,
        write_errors,
    )

    settings = _settings(args)  # bad input raises, before anything is written (cli.run_command)
    jobs, shard = jobs_from_args(args)
    if args.ray:
        from cscvision.inference.distributed import import_ray

        import_ray()  # before --out is made: without Ray nothing is written
    extractor = _extractor(args)
    out: Path = args.out
    if not args.ray:  # with --ray the workers write: the folder may be theirs alone
        check_writable(out)
        check_free_space(out, MIN_FREE_PER_SLIDE * len(jobs))
    spec = extractor.spec
    wanted = {"mpp": spec.mpp, "tile_px": spec.tile_px, "min_tissue": settings.min_tissue}
    wanted["mask_mpp"] = settings.mask_mpp

    def store_of(job: SlideJob) -> Path:
        return store_path(out, job.slide_id)

    def lock_of(job: SlideJob) -> Path:  # two runs on one --out never write one store
        return store_lock_path(out, job.slide_id)

    def complete(job: SlideJob) -> bool:
        digest = extractor.weights_sha256
        return store_matches(store_of(job), encoder=spec.name, weights_sha256=digest, grid=wanted)

    def process(job: SlideJob) -> None:
        extract_slide(job.slide_path, extractor, store_of(job), settings, slide_mpp=job.mpp)

    if args.ray:
        setup_args = (extractor.encoder, extractor.weights_sha256, str(out), settings)
        report = run_on_ray(args, jobs, complete, extraction_setup, setup_args, command="features")
        if report is None:
            return 2
        where = f"on Ray ({args.ray}), --decode {args.decode}"
    else:
        report = run_batch(jobs, process, complete, overwrite=args.overwrite, desc="features",
                           lock_of=lock_of, wait=args.wait)  # fmt: skip
        where = f"on {extractor.device}, --decode {args.decode}"
    errors = write_errors(out, report, shard)
    suffix = shard_suffix(shard)
    results = _write_results(out / f"results{suffix}.csv", jobs, report, store_of)
    for line in summary_lines(report, out, "features", errors):
        print(line)
    if report.interrupted:
        print(interrupted_line(report, "features"), file=sys.stderr)
        return 128 + report.interrupted
    print(f"per slide: {out}/<slide_id>{STORE_SUFFIX} ({spec.name}, {spec.dim} features per tile)")
    print(f"one row per slide: {results}")
    print(f"tiles of {spec.tile_px} px at {spec.mpp} µm/px {where}")
    return 1 if report.failed else 0


def _write_results(path: Path, jobs: list[SlideJob], report: BatchReport, store_of: Any) -> Path:
    """``results.csv``: a row per slide this run settled (done, skipped as complete, failed),
    merged by slide id with the rows earlier runs wrote (as ``infer``'s); slides another run
    held, or that a signal left unreached, keep their earlier row."""
    from cscvision.features.store import FeatureStoreError, read_store_attrs
    from cscvision.slides.batch import merge_table

    failed = {sid: reason.split(" | ")[0] for sid, _, reason in report.failed}
    skipped, done = set(report.skipped), set(report.done)
    rows = []
    for job in jobs:
        row = {"slide_id": job.slide_id, "slide_path": str(Path(job.slide_path).resolve())}
        if job.slide_id in failed:
            row.update(status="failed", error=failed[job.slide_id])
        elif job.slide_id in skipped or job.slide_id in done:
            try:
                attrs = read_store_attrs(store_of(job))
            except FeatureStoreError as e:  # removed since: say so, do not stop
                row.update(status="failed", error=str(e))
            else:
                status = "skipped" if job.slide_id in skipped else "done"
                row.update(status=status, n_tiles=attrs["n_tiles"], dim=attrs["dim"])
                row["store"] = str(store_of(job))
        else:
            continue
        rows.append(row)
    return merge_table(path, RESULT_COLUMNS, ([r.get(c, "") for c in RESULT_COLUMNS] for r in rows))

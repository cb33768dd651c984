"""Flags shared by the commands that read slides."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

from pydantic import Field

from cscvision.core.io import check_writable
from cscvision.core.validate import Flags, check_flags
from cscvision.slides.batch import SlideJob, collect_inputs, make_jobs, parse_shard, shard_jobs
from cscvision.slides.info import DECODERS, MPP_RANGE
from cscvision.slides.slide import load_mpp_overrides


def add_slide_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "slides",
        nargs="+",
        metavar="SLIDE_OR_DIR",
        help="slide files, folders of slides, or CSV manifests (column slide_path, optional "
        "slide_id); a file name starting with '-' goes after '--' or as ./-name",
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="output folder (one subfolder per slide)"
    )
    parser.add_argument(
        "--slide-mpp",
        type=float,
        default=None,
        metavar="UM_PER_PX",
        help="level-0 µm/px for slides whose metadata and TIFF tags give none "
        "(a slide that states its own µm/px keeps it, with a warning if they differ)",
    )
    parser.add_argument(
        "--mpp-override",
        type=Path,
        default=None,
        metavar="CSV",
        help="CSV with columns slide,mpp giving level-0 µm/px per slide file name, "
        "for slides whose metadata gives none",
    )
    parser.add_argument(
        "--shard",
        default=None,
        metavar="i/N",
        help="process only shard i of N (0 ≤ i < N), e.g. $SLURM_ARRAY_TASK_ID/N",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="redo slides whose outputs are complete"
    )


def add_decode_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--decode cpu|gpu|auto`` (``infer``, ``features``)."""
    parser.add_argument(
        "--decode",
        choices=DECODERS,
        default="cpu",
        help="where stored JPEG tiles are decoded: cpu (default), gpu (batched on the CUDA "
        "device, for JPEG-tiled TIFF/SVS slides; others fall back to cpu), or auto (gpu when "
        "CUDA is there and the slide supports it)",
    )


def check_decode(decode: str, device_type: str) -> None:
    """``--decode gpu`` needs the model on a CUDA device: ``ValueError`` naming the flag."""
    if decode == "gpu" and device_type != "cuda":
        raise ValueError(
            f"--decode gpu needs a CUDA device (the model runs on {device_type}); "
            "use --decode cpu or auto"
        )


def jobs_from_args(args: argparse.Namespace) -> tuple[list[SlideJob], tuple[int, int] | None]:
    overrides = load_mpp_overrides(args.mpp_override) if args.mpp_override else None
    jobs = make_jobs(collect_inputs(args.slides), overrides, args.slide_mpp)
    shard = parse_shard(args.shard) if args.shard else None
    if shard is not None:
        jobs = shard_jobs(jobs, *shard)
    return jobs, shard


def add_hardening_args(parser: argparse.ArgumentParser) -> None:
    """Flags for batches that share ``--out`` with other runs (SLURM shards, a second job)."""
    parser.add_argument(
        "--wait",
        action="store_true",
        help="wait for slides another run on the same --out is processing (default: skip "
        "them and report them as busy)",
    )


class BatchFlags(Flags):
    """The flags every slide batch shares (``--slide-mpp``), checked before any slide is read."""

    slide_mpp: float | None = Field(None, ge=MPP_RANGE[0], le=MPP_RANGE[1])


def check_batch_args(args: argparse.Namespace) -> None:
    """Validate the shared flags and probe-write ``--out``; ``ValueError`` naming the flag."""
    check_flags(BatchFlags, slide_mpp=args.slide_mpp)
    check_writable(args.out)


def corrupt_tiles_line(out: Path, slide_ids: Iterable[str], record: str) -> str | None:
    """One line naming the slides whose ``record`` (``summary.json``, ``tiles.json``) lists
    tiles skipped as corrupt; None when none were."""
    counts = {}
    for slide_id in slide_ids:
        try:
            count = json.loads((out / slide_id / record).read_text())["corrupt_tiles"]["count"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if count:
            counts[slide_id] = count
    if not counts:
        return None
    each = ", ".join(f"{sid} {n}" for sid, n in counts.items())
    return (
        f"corrupt tiles skipped: {sum(counts.values())} in {len(counts)} slide(s) ({each}); "
        f"their level-0 x, y are in OUT/<slide_id>/{record} (corrupt_tiles)"
    )

"""Flags shared by the commands that read slides."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

from cscvision.slides.batch import SlideJob, collect_slides, make_jobs, parse_shard, shard_jobs
from cscvision.slides.slide import load_mpp_overrides


def add_slide_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "slides",
        nargs="+",
        metavar="SLIDE_OR_DIR",
        help="slide files, folders of slides, or CSV manifests (column slide_path)",
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


def jobs_from_args(args: argparse.Namespace) -> tuple[list[SlideJob], tuple[int, int] | None]:
    overrides = load_mpp_overrides(args.mpp_override) if args.mpp_override else None
    jobs = make_jobs(collect_slides(args.slides), overrides, args.slide_mpp)
    shard = parse_shard(args.shard) if args.shard else None
    if shard is not None:
        jobs = shard_jobs(jobs, *shard)
    return jobs, shard


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

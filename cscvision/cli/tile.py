"""``cscvision tile``: tissue detection and tile grids for a batch of slides."""

from __future__ import annotations

import argparse
import sys

from pydantic import Field

from cscvision.cli.common import (
    add_hardening_args,
    add_settings_args,
    add_slide_args,
    check_batch_args,
    corrupt_tiles_line,
    jobs_from_args,
    settings_from_args,
)
from cscvision.core.validate import Flags
from cscvision.slides.batch import (
    interrupted_line,
    run_batch,
    slide_dir,
    summary_lines,
    write_errors,
)
from cscvision.slides.grid import GridSpec
from cscvision.slides.settings import Mpp, ReadSettings, TilePx
from cscvision.slides.tiling import tile_slide, tiling_complete


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tile",
        help="detect tissue and cut tile grids",
        description=(
            "Detect tissue on a thumbnail and cut a grid of tiles of --tile-px pixels at --mpp "
            "µm/px. Writes OUT/<slide_id>/tiles.csv (level-0 x, y, tissue fraction), tiles.json "
            "(resolution, level, provenance) and tissue.png; failures go to OUT/errors.csv."
        ),
    )
    add_slide_args(p)
    add_settings_args(p, TileFlags, ["mpp", "tile_px"])
    add_settings_args(p, ReadSettings, SHARED)
    p.add_argument("--export-tiles", action="store_true", help="also write every tile as a PNG")
    add_hardening_args(p)
    p.set_defaults(func=run)


SHARED = ("overlap", "min_tissue", "mask_mpp", "on_corrupt_tile")  # flags of ReadSettings


class TileFlags(Flags):
    """What tiles ``cscvision tile`` cuts (``infer`` and ``features`` take them from the
    model or the encoder)."""

    mpp: Mpp = Field(0.5, description="µm/px of the tiles (default %(default)s, '20x')")
    tile_px: TilePx = Field(224, description="tile side in pixels at --mpp")


def run(args: argparse.Namespace) -> int:
    flags = settings_from_args(TileFlags, args)
    read = settings_from_args(ReadSettings, args)
    tissue = {k: getattr(read, k) for k in ("overlap", "min_tissue", "mask_mpp")}
    spec = GridSpec(mpp=flags.mpp, tile_px=flags.tile_px, **tissue)
    jobs, shard = jobs_from_args(args)
    check_batch_args(args)
    n_tiles = 0

    def process(job):
        nonlocal n_tiles
        grid = tile_slide(
            job,
            args.out,
            spec,
            export_tiles=args.export_tiles,
            on_corrupt_tile=read.on_corrupt_tile,
        )
        n_tiles += len(grid)

    report = run_batch(
        jobs,
        process,
        lambda job: tiling_complete(job, args.out, spec, args.export_tiles),
        overwrite=args.overwrite,
        desc="tiling",
        folder_of=lambda job: slide_dir(args.out, job.slide_id),
        wait=args.wait,
    )
    errors = write_errors(args.out, report, shard)
    for line in summary_lines(report, args.out, "tile", errors):
        print(line)
    if skipped := corrupt_tiles_line(args.out, report.done, "tiles.json"):
        print(skipped)
    print(f"tiles kept in this run: {n_tiles} ({spec.tile_px} px at {spec.mpp} µm/px)")
    if report.interrupted:
        print(interrupted_line(report, "tile"), file=sys.stderr)
        return 128 + report.interrupted
    return 1 if report.failed else 0

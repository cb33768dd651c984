"""``cscvision tile``: tissue detection and tile grids for a batch of slides."""

from __future__ import annotations

import argparse
import sys

from cscvision.cli.common import add_slide_args, corrupt_tiles_line, jobs_from_args
from cscvision.slides.batch import BatchError, run_batch, summary_lines, write_errors
from cscvision.slides.grid import GridSpec
from cscvision.slides.info import ON_CORRUPT_TILE
from cscvision.slides.slide import SlideError
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
    p.add_argument("--mpp", type=float, default=0.5, help="µm/px of the tiles (default 0.5, '20x')")
    p.add_argument("--tile-px", type=int, default=224, help="tile side in pixels at --mpp")
    p.add_argument(
        "--overlap", type=float, default=0.0, help="fraction shared by neighbours, [0, 1)"
    )
    p.add_argument(
        "--min-tissue",
        type=float,
        default=0.5,
        help="keep tiles with at least this tissue fraction",
    )
    p.add_argument(
        "--mask-mpp", type=float, default=8.0, help="µm/px of the tissue-detection thumbnail"
    )
    p.add_argument("--export-tiles", action="store_true", help="also write every tile as a PNG")
    p.add_argument(
        "--on-corrupt-tile",
        choices=ON_CORRUPT_TILE,
        default="fail",
        help="with --export-tiles: a tile that cannot be decoded fails its slide (default) "
        "or is skipped: dropped from tiles.csv and listed in tiles.json (corrupt_tiles)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        spec = GridSpec(
            mpp=args.mpp,
            tile_px=args.tile_px,
            overlap=args.overlap,
            min_tissue=args.min_tissue,
            mask_mpp=args.mask_mpp,
        )
        jobs, shard = jobs_from_args(args)
    except (BatchError, SlideError, ValueError) as e:
        print(f"cscvision tile: {e}", file=sys.stderr)
        return 2
    n_tiles = 0

    def process(job):
        nonlocal n_tiles
        grid = tile_slide(
            job,
            args.out,
            spec,
            export_tiles=args.export_tiles,
            on_corrupt_tile=args.on_corrupt_tile,
        )
        n_tiles += len(grid)

    report = run_batch(
        jobs,
        process,
        lambda job: tiling_complete(job, args.out, spec, args.export_tiles),
        overwrite=args.overwrite,
        desc="tiling",
    )
    errors = write_errors(args.out, report, shard)
    for line in summary_lines(report, args.out, "tile", errors):
        print(line)
    if skipped := corrupt_tiles_line(args.out, report.done, "tiles.json"):
        print(skipped)
    print(f"tiles kept in this run: {n_tiles} ({spec.tile_px} px at {spec.mpp} µm/px)")
    return 1 if report.failed else 0

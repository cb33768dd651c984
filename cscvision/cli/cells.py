"""``cscvision cells``: per-tile cell features and density maps from cell tables."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cscvision.cli.common import add_hardening_args, add_slide_args, check_batch_args

__all__ = ["add_parser", "run"]

PER_SLIDE = (
    "tiles.csv, maps.npz, overlay_density_<type>.png, <id>_density_<type>.tif, <id>.geojson, "
    "summary.json"
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from cscvision.cells.readers import FORMATS
    from cscvision.outputs.cell_batch import DEFAULT_MAPS

    p = subparsers.add_parser(
        "cells",
        help="per-tile cell counts, densities, distances and mixing from cell tables",
        description=(
            "For each slide, find its tissue tiles (as cscvision tile does, no overlap), "
            "read its cells and write OUT/<slide_id>/ "
            f"({PER_SLIDE}), plus OUT/cells_results.csv and OUT/errors.csv. Slides are "
            "matched to cell tables by slide id: slide S (its file stem, or the manifest's "
            "slide_id) takes the file S.cells.parquet among --cells (with --format F, the "
            "tool's export S.geojson / S.json / S.parquet / S.csv). Densities are cells "
            "per mm² of tissue. Never writes into a cscvision infer folder."
        ),
    )
    add_slide_args(p)
    p.add_argument(
        "--cells",
        nargs="+",
        required=True,
        type=Path,
        metavar="TABLE_OR_DIR",
        help="cell tables (<slide_id>.cells.parquet), or folders of them",
    )
    p.add_argument(
        "--format",
        dest="fmt",
        choices=FORMATS,
        default="table",
        help="what --cells holds: cscvision cell tables (default) or a detector's export: "
        "qupath (GeoJSON), hovernet (JSON), cellvit (GeoJSON), histolytics (GeoParquet), "
        "csv (x, y, class in level-0 px)",
    )
    p.add_argument(
        "--class-map",
        default=None,
        metavar="NAME_OR_YAML",
        help="how the tool's classes map onto the cell types: a class map named in "
        "cell_types.yaml (pannuke, histolytics, consep, lizard, qupath, cscvision) or a YAML "
        "file of 'tool class: cell type' (default: the format's)",
    )
    p.add_argument("--mpp", type=float, default=0.5, help="tile µm/px (default 0.5)")
    p.add_argument("--tile-px", type=int, default=224, help="tile size in px (default 224)")
    p.add_argument(
        "--min-tissue", type=float, default=0.5, help="keep tiles with this tissue fraction"
    )
    p.add_argument(
        "--mask-mpp", type=float, default=8.0, help="µm/px of the tissue-detection thumbnail"
    )
    p.add_argument(
        "--radius-um",
        type=float,
        default=20.0,
        help="neighbour radius of the mixing index, µm (default 20)",
    )
    p.add_argument(
        "--maps",
        default=",".join(DEFAULT_MAPS),
        metavar="TYPE,...",
        help=f"cell types drawn as density maps (default {','.join(DEFAULT_MAPS)}; "
        "types with no cell on a slide are left out)",
    )
    add_hardening_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cscvision.cells.types import CellTypeError, cell_types
    from cscvision.outputs.cell_batch import CellSettings, mpp_overrides_from, run_cells
    from cscvision.slides.batch import BatchError, interrupted_line, parse_shard, summary_lines
    from cscvision.slides.slide import SlideError

    try:
        maps = tuple(m.strip() for m in args.maps.split(",") if m.strip())
        hierarchy = cell_types()
        for m in maps:
            hierarchy.check(m)
        settings = CellSettings(
            mpp=args.mpp,
            tile_px=args.tile_px,
            min_tissue=args.min_tissue,
            mask_mpp=args.mask_mpp,
            radius_um=args.radius_um,
            maps=maps,
            fmt=args.fmt,
            class_map=args.class_map,
        )
        check_batch_args(args)
        report, _ = run_cells(
            args.slides,
            args.cells,
            args.out,
            settings,
            slide_mpp=args.slide_mpp,
            mpp_overrides=mpp_overrides_from(args.mpp_override),
            shard=parse_shard(args.shard) if args.shard else None,
            overwrite=args.overwrite,
            wait=args.wait,
        )
    except (BatchError, SlideError, CellTypeError, ValueError) as e:
        print(f"cscvision cells: {e}", file=sys.stderr)
        return 2
    for line in summary_lines(report, args.out, "cells", args.out / "errors.csv"):
        print(line)
    print(f"per slide, in {args.out}/<slide_id>/: {PER_SLIDE}")
    if report.interrupted:
        print(interrupted_line(report, "cells"), file=sys.stderr)
        return 128 + report.interrupted
    return 1 if report.failed else 0

"""``cscvision cells``: per-tile cell features and density maps from cell tables."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cscvision.cli.common import (
    add_hardening_args,
    add_settings_args,
    add_slide_args,
    check_batch_args,
    settings_from_args,
)
from cscvision.core.validate import FlagError
from cscvision.slides.settings import ReadSettings

__all__ = ["add_parser", "run"]

PER_SLIDE = (
    "tiles.csv, maps.npz, overlay_density_<type>.png, <id>_density_<type>.tif, <id>.geojson, "
    "summary.json (with the immune phenotype)"
)
COHORT = "cells_results.csv (one row per slide), immune_phenotypes.csv (slide and regions)"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from cscvision.cells.readers import FORMATS
    from cscvision.outputs.cell_batch import DEFAULT_MAPS

    p = subparsers.add_parser(
        "cells",
        help="per-tile cell counts, densities, distances and mixing from cell tables",
        description=(
            "For each slide, find its tissue tiles (as cscvision tile does, no overlap), "
            "read its cells and write OUT/<slide_id>/ "
            f"({PER_SLIDE}), plus OUT/cells_results.csv, OUT/immune_phenotypes.csv and "
            "OUT/errors.csv. Slides are "
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
    add_settings_args(p, ReadSettings, ["min_tissue", "mask_mpp"])  # as tile, infer, features
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
    add_immune_args(p)
    add_hardening_args(p)
    p.set_defaults(func=run)


def add_immune_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "compartments, TIL score and immune phenotype",
        "Tumour, tumour-associated stroma and invasive margin per slide, the immune cells' "
        "density in each, the TIL score and a call inflamed / excluded / desert. The rule "
        "and its per-source thresholds: `cscvision config show immune_phenotype`.",
    )
    g.add_argument(
        "--immune-source",
        default="he_lymphocyte",
        help="whose thresholds and which immune cells: he_lymphocyte (default: lymphocytes "
        "and plasma cells), he_inflammatory (PanNuke 'inflammatory'), cd8 (cd8_t; set its "
        "cut-offs first), or a source of --phenotype-config",
    )
    g.add_argument(
        "--phenotype-config", default=None, metavar="YAML",
        help="immune-phenotype config (default: the packaged immune_phenotype.yaml)",
    )  # fmt: skip
    g.add_argument(
        "--margin-um", type=float, default=500.0,
        help="invasive-margin band, total width in µm centred on the tumour border (500)",
    )  # fmt: skip
    g.add_argument(
        "--stroma-reach-um", type=float, default=500.0,
        help="tumour-associated stroma: non-tumour tissue within this many µm of tumour (500)",
    )  # fmt: skip
    g.add_argument(
        "--tumour-cells-min", type=float, default=500.0, metavar="CELLS_PER_MM2",
        help="tumour from the cells: tumour cells the majority of non-immune cells and "
        "their smoothed density at least this (500 / mm²)",
    )  # fmt: skip
    g.add_argument(
        "--compartment-um", type=float, default=10.0,
        help="pixel of the compartment masks, µm (10)",
    )  # fmt: skip
    g.add_argument(
        "--annotations", default=None, metavar="DIR",
        help="take tumour (class tumour/tumor) and stroma from <slide_id>.geojson/.xml in "
        "DIR; every other class is a region with its own phenotype",
    )  # fmt: skip
    g.add_argument(
        "--infer", default=None, metavar="DIR",
        help="a cscvision infer --out folder: its --tumour-target map (>= --map-threshold) "
        "is the tumour where the model has one; its stemness map gets its own phenotype",
    )  # fmt: skip
    g.add_argument("--tumour-target", default="tumour", help="tumour map of --infer (tumour)")
    g.add_argument(
        "--stemness-target", default="stemness", help="stemness map of --infer (stemness)"
    )
    g.add_argument("--map-threshold", type=float, default=0.5, help="of the --infer maps")
    g.add_argument(
        "--no-phenotype", action="store_true", help="per-tile features only (part 1 outputs)"
    )


def immune_settings(args: argparse.Namespace):
    from cscvision.outputs.cell_immune import ImmuneSettings

    if args.no_phenotype:
        return None
    for flag, folder in (("--annotations", args.annotations), ("--infer", args.infer)):
        if folder is not None and not Path(folder).is_dir():
            raise FlagError(f"{flag} {folder}: no such folder")
    return ImmuneSettings(
        source=args.immune_source,
        config=args.phenotype_config,
        px_um=args.compartment_um,
        margin_um=args.margin_um,
        stroma_reach_um=args.stroma_reach_um,
        tumour_cells_min_mm2=args.tumour_cells_min,
        annotations=None if args.annotations is None else str(Path(args.annotations).resolve()),
        infer=None if args.infer is None else str(Path(args.infer).resolve()),
        tumour_target=args.tumour_target,
        stemness_target=args.stemness_target,
        map_threshold=args.map_threshold,
    )


def run(args: argparse.Namespace) -> int:
    from cscvision.cells.types import cell_types
    from cscvision.outputs.cell_batch import CellSettings, mpp_overrides_from, run_cells
    from cscvision.slides.batch import interrupted_line, parse_shard, summary_lines

    read = settings_from_args(ReadSettings, args)  # --min-tissue, --mask-mpp: their ranges
    maps = tuple(m.strip() for m in args.maps.split(",") if m.strip())
    hierarchy = cell_types()
    for m in maps:
        hierarchy.check(m)
    settings = CellSettings(
        mpp=args.mpp,
        tile_px=args.tile_px,
        min_tissue=read.min_tissue,
        mask_mpp=read.mask_mpp,
        radius_um=args.radius_um,
        maps=maps,
        fmt=args.fmt,
        class_map=args.class_map,
        immune=immune_settings(args),
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
    for line in summary_lines(report, args.out, "cells", args.out / "errors.csv"):
        print(line)
    print(f"per slide, in {args.out}/<slide_id>/: {PER_SLIDE}")
    print(f"cohort, in {args.out}/: {COHORT}")
    if report.interrupted:
        print(interrupted_line(report, "cells"), file=sys.stderr)
        return 128 + report.interrupted
    return 1 if report.failed else 0

"""``cscvision labels cells``: a per-tile cell feature → tile-label tables + cohort CSV.

A subcommand of ``labels`` (beside ``labels st`` and ``labels ihc``) rather than a flag of
``cscvision cells``: it makes training targets, reads the cohort manifest ``train`` reads and
writes the ``cohort.csv`` with ``label_path`` that ``train`` takes, while ``cscvision cells``
is a per-slide reporting batch (maps, phenotypes, resume) with its own output folder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cscvision.cli.common import (
    check_label_flags,
    label_cohort_row,
    measure_then_write,
    print_not_labelled,
    write_label_cohort,
)

HELP = """\
Turn a per-tile cell feature into training targets that `cscvision train` learns from H&E.

MANIFEST.csv is a cohort manifest (slide_id, patient_id, slide_path[, split]) plus cells_path:
each slide's cell table (<slide_id>.cells.parquet; `cscvision synth` writes this column) or,
with --format, a detector's export, relative to the CSV. The tiles are the slide's
non-overlapping tissue tiles, as `cscvision cells` finds them; each tile's label is the cell
feature (e.g. density_lymphocyte in cells / mm² of tissue; lymphocyte_density is the same),
or with --threshold T a 0/1 target <feature>_high. Writes into --out: <slide_id>.labels.csv
+ .labels.json per slide (the sidecar names the cell source, its class map and the feature)
and cohort.csv (slide_id, patient_id, slide_path, label_path, split) for `cscvision train`
(task: regression for a raw feature).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from cscvision.cells.readers import FORMATS

    p = subparsers.add_parser(
        "cells",
        help="a per-tile cell feature (density, share, marker-positive share) → tile labels",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("manifest", type=Path, metavar="MANIFEST.csv")
    p.add_argument(
        "--feature",
        required=True,
        help="a tiles.csv column of `cscvision cells` (density_lymphocyte, share_macrophage, "
        "nn_lymphocyte_to_tumour_um, ...; or lymphocyte_density) or share_<marker>_pos",
    )
    p.add_argument("--threshold", type=float, default=None, help="make a 0/1 target: feature >= T")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--format", dest="fmt", choices=FORMATS, default="table")
    p.add_argument("--class-map", default=None, metavar="NAME_OR_YAML")
    p.add_argument("--mpp", type=float, default=0.5, help="tile µm/px (default 0.5)")
    p.add_argument("--tile-px", type=int, default=224, help="tile size in px (default 224)")
    p.add_argument("--min-tissue", type=float, default=0.5)
    p.add_argument("--mask-mpp", type=float, default=8.0)
    p.add_argument("--slide-mpp", type=float, default=None, metavar="UM_PER_PX")
    p.add_argument("--overwrite", action="store_true", help="replace existing tables")
    p.set_defaults(func=run)


def _jobs(manifest: Path) -> list[tuple]:
    from cscvision.core.io import read_csv
    from cscvision.labels.cohort import CohortError, read_cohort

    entries = read_cohort(manifest)
    rows = read_csv(manifest)
    if "cells_path" not in rows[0]:
        raise CohortError(
            f"{manifest}: no cells_path column; add each slide's cell table "
            "(<slide_id>.cells.parquet) or detector export"
        )
    jobs = []
    for line, (entry, row) in enumerate(zip(entries, rows, strict=True), start=2):
        text = (row.get("cells_path") or "").strip()
        path = Path(text) if Path(text).is_absolute() else manifest.parent / text
        if not text or not path.is_file():
            raise CohortError(f"{manifest}: line {line}: cells_path {text!r} is not a file")
        jobs.append((entry, path.resolve()))
    return jobs


def label_slide(entry, cells_path: Path, args: argparse.Namespace):
    """One slide's tile-label table (the tiles and checks of ``cscvision cells``)."""
    import dataclasses

    from cscvision.cells.labels import CellLabelSpec, cell_label_table
    from cscvision.cells.readers import read_cells
    from cscvision.outputs.cell_batch import check_scale
    from cscvision.slides.grid import GridSpec, detect_tissue, make_grid
    from cscvision.slides.slide import open_slide

    table = read_cells(cells_path, args.fmt, class_map=args.class_map)
    spec = GridSpec(
        mpp=args.mpp, tile_px=args.tile_px, min_tissue=args.min_tissue, mask_mpp=args.mask_mpp
    )
    with open_slide(entry.slide_path, mpp=args.slide_mpp) as slide:
        _, mask = detect_tissue(slide, spec.mask_mpp)
        grid = dataclasses.replace(make_grid(slide, spec, mask), slide_id=entry.slide_id)
    check_scale(table, cells_path, entry.slide_path, grid)
    return cell_label_table(
        table,
        grid.xy_l0,
        grid.tissue,
        tile_l0=grid.plan.tile_l0,
        slide_mpp=grid.slide_mpp,
        tile_px=args.tile_px,
        mpp=args.mpp,
        spec=CellLabelSpec(args.feature, args.threshold),
        slide_id=entry.slide_id,
        provenance={"cells_path": str(cells_path), "slide_path": str(entry.slide_path)},
    )


def run(args: argparse.Namespace) -> int:
    from cscvision.core.guard import run_lock
    from cscvision.core.io import check_writable
    from cscvision.labels.table import table_path

    check_label_flags(args)  # before anything is read or written (cli.run_command: exit 2)
    t0 = time.perf_counter()
    jobs = _jobs(args.manifest)
    existing = [p for e, _ in jobs if (p := table_path(args.out, e.slide_id)).exists()]
    if existing and not args.overwrite:
        print(f"cscvision labels cells: {existing[0]} exists; pass --overwrite", file=sys.stderr)
        return 2
    check_writable(args.out)
    with run_lock(args.out, "labels cells"):  # one cohort.csv: one run at a time
        return _run_locked(args, jobs, t0)


def _run_locked(args: argparse.Namespace, jobs: list, t0: float) -> int:
    from cscvision.core.batch import BatchItem, run_items
    from cscvision.slides.slide import SlideError

    def label(item: BatchItem):
        entry, cells_path = item.data
        return entry, label_slide(entry, cells_path, args)

    items = [BatchItem(e.slide_id, e.slide_path, (e, p)) for e, p in jobs]

    def measure() -> tuple[tuple[list, list], int | None]:
        # tables are kept in memory until every slide is done
        report = run_items(items, label, desc="labelling",
                           record=(ValueError, SlideError, OSError))  # fmt: skip
        errors = [(slide_id, reason) for slide_id, _, reason in report.failed]
        return (list(report.results.values()), errors), report.interrupted

    def write(found: tuple[list, list]) -> int:
        return _write_all(args, jobs, *found, t0)

    unwritten = "no table written (tables are written once every slide is labelled)"
    return measure_then_write("labels cells", measure, write, unwritten=unwritten)


def _write_all(args: argparse.Namespace, jobs: list, labelled: list, errors: list, t0) -> int:
    from cscvision.labels.table import table_path, write_label_table

    rows, n_tiles, target = [], 0, None
    for entry, table in labelled:
        path = write_label_table(table_path(args.out, entry.slide_id), table)
        n_tiles, target = n_tiles + len(table), table.targets[0]
        rows.append(label_cohort_row(entry, path, args.out))
    cohort, errors_path = write_label_cohort(args.out, rows, errors)
    print(
        f"wrote {len(rows)} of {len(jobs)} tile-label tables ({n_tiles} tiles of "
        f"{args.tile_px} px at {args.mpp} µm/px; target {target or '-'}) to {args.out} in "
        f"{time.perf_counter() - t0:.1f} s\n  {cohort.name}  for cscvision train\n"
        f"  {errors_path.name}  {len(errors)} slide(s) not labelled"
    )
    print_not_labelled(errors)
    return 1 if errors else 0

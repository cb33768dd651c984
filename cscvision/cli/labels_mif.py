"""``cscvision labels mif``: multiplex IF images → cell phenotypes → H&E tile-label tables.

Thin on purpose: per slide it calls :func:`cscvision.cells.mif.mif_cell_table` (cells,
gating, phenotypes, registration) and :func:`cscvision.cells.labels.cell_label_table`
(the tile labels); the loop is the ``labels cells`` loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from cscvision.cli.common import (
    check_label_flags,
    label_cohort_row,
    print_not_labelled,
    write_label_cohort,
)

HELP = """\
Turn multiplex immunofluorescence (mIF) images of the H&E sections into training targets.

MANIFEST.csv: slide_id, patient_id, slide_path (the H&E) and mif_path (an OME-TIFF, a
.qptiff or a folder of one TIFF per channel), relative to the CSV; optional split, and
cells_path (a QuPath measurement export of the mIF cells, read with --cells qupath).
PANEL.yaml maps the image's channels to markers and compartments and gives the phenotype
rules (docs/reference/mif-panel.md). Per slide: nuclei segmented on the nuclear marker
(or the export read), each marker's compartment mean gated per slide (Otsu or a Gaussian
mixture on log intensities, guarded for rare positives, or the panel's threshold),
phenotypes by the panel's rules, the mIF registered onto the H&E (nuclear stain against
haematoxylin) and the cells carried into H&E level-0 px. Writes into --out:
cells/<slide_id>.cells.parquet (+ .json; the cell table, `cscvision cells` reads it),
cells/<slide_id>_mif.json (thresholds, guarded markers, registration),
<slide_id>.labels.csv + .json (one column per --feature) and cohort.csv for `cscvision train`.
"""


GATING = ("otsu", "gmm", "negative")  # cscvision.cells.mif_gating.METHODS, default first


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "mif",
        help="multiplex IF (OME-TIFF, qptiff) → phenotypes → H&E tile labels",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("manifest", type=Path, metavar="MANIFEST.csv")
    p.add_argument("--panel", type=Path, required=True, help="the panel YAML")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--feature",
        action="append",
        default=None,
        help="a per-tile cell feature (repeatable; default density_treg): density_<type>, "
        "share_<type>, share_<marker>_pos, ... (as `labels cells`)",
    )
    p.add_argument("--threshold", type=float, default=None, help="0/1 targets: feature >= T")
    p.add_argument(
        "--gating",
        choices=GATING,
        default=GATING[0],
        help="per-marker threshold on the log intensities, per slide: otsu (default), gmm "
        "(where a two-Gaussian mixture changes its mind) or negative (the negative peak's "
        "mode + 3 robust SDs); a panel threshold wins",
    )
    p.add_argument(
        "--gate-guard",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replace an otsu/gmm split that cuts the negative peak (the cells it calls "
        "positive have their median under 2 robust SDs above the negatives' mode: rare "
        "positives) by the negative peak's mode + 3 robust SDs (default: on)",
    )
    p.add_argument(
        "--cells",
        choices=("segment", "qupath"),
        default="segment",
        help="segment nuclei on the nuclear marker (default) or read cells_path",
    )
    p.add_argument(
        "--compensate",
        action="store_true",
        help="remove spillover between neighbouring channels before gating (estimated per "
        "slide on the cells a first gate calls positive for the source channel and "
        "negative for the target)",
    )
    p.add_argument("--expand-um", type=float, default=4.0,
                   help="nucleus → cell body growth, µm (default 4)")  # fmt: skip
    p.add_argument("--mif-mpp", type=float, default=None, help="µm/px of mIF images without one")
    p.add_argument("--mpp", type=float, default=0.5, help="tile µm/px (default 0.5)")
    p.add_argument("--tile-px", type=int, default=224, help="tile size in px (default 224)")
    p.add_argument("--min-tissue", type=float, default=0.5)
    p.add_argument("--mask-mpp", type=float, default=8.0)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="redo slides whose table exists (default: keep them; a re-run resumes)",
    )
    p.set_defaults(func=run)


def _jobs(manifest: Path, cells: str) -> list[tuple]:
    from cscvision.core.io import read_csv
    from cscvision.labels.cohort import CohortError, read_cohort

    entries, rows = read_cohort(manifest), read_csv(manifest)
    need = ["mif_path"] + (["cells_path"] if cells == "qupath" else [])
    for col in need:
        if col not in rows[0]:
            raise CohortError(f"{manifest}: no {col} column; add each slide's {col}")
    jobs = []
    for line, (entry, row) in enumerate(zip(entries, rows, strict=True), start=2):
        paths = []
        for col in need:
            text = (row.get(col) or "").strip()
            path = Path(text) if Path(text).is_absolute() else manifest.parent / text
            if not text or not path.exists():
                raise CohortError(f"{manifest}: line {line}: {col} {text!r} does not exist")
            paths.append(path.resolve())
        jobs.append((entry, *paths, *([None] * (2 - len(paths)))))
    return jobs


def label_slide(entry, mif_path: Path, cells_path: Path | None, panel, args):
    """One slide: its mIF cell table in H&E px, the record, and its tile-label table."""
    from cscvision.cells.labels import CellLabelSpec, cell_label_table
    from cscvision.cells.mif import mif_cell_table, read_qupath_measurements
    from cscvision.cells.mif_read import open_mif
    from cscvision.cells.mif_segment import SegmentParams
    from cscvision.slides.grid import GridSpec, detect_tissue, make_grid
    from cscvision.slides.slide import open_slide

    image = open_mif(mif_path, mpp=args.mif_mpp)
    measured = read_qupath_measurements(cells_path, image, panel) if cells_path else None
    spec = GridSpec(mpp=args.mpp, tile_px=args.tile_px, min_tissue=args.min_tissue,
                    mask_mpp=args.mask_mpp)  # fmt: skip
    with open_slide(entry.slide_path) as slide:
        result = mif_cell_table(
            image, panel, he_slide=slide, slide_id=entry.slide_id, method=args.gating,
            guard=args.gate_guard, segment=SegmentParams(expand_um=args.expand_um),
            measured=measured, compensate=args.compensate,
        )  # fmt: skip
        _, mask = detect_tissue(slide, spec.mask_mpp)
        grid = dataclasses.replace(make_grid(slide, spec, mask), slide_id=entry.slide_id)
    tables = [
        cell_label_table(
            result.table, grid.xy_l0, grid.tissue, tile_l0=grid.plan.tile_l0,
            slide_mpp=grid.slide_mpp, tile_px=args.tile_px, mpp=args.mpp,
            spec=CellLabelSpec(f, args.threshold), slide_id=entry.slide_id,
            provenance={"mif_path": str(mif_path), "panel": str(args.panel)},
        )
        for f in args.feature or ["density_treg"]
    ]  # fmt: skip
    import numpy as np

    merged = dataclasses.replace(
        tables[0],
        targets=tuple(t.targets[0] for t in tables),
        values=np.hstack([t.values for t in tables]),
        source="mif",
        provenance={**tables[0].provenance, "features": [t.provenance["feature"] for t in tables]},
    )
    record = {
        "slide_id": entry.slide_id, "mif_path": str(mif_path), "kind": image.kind,
        "channels": list(image.channels), "mif_mpp": image.mpp, "gating": args.gating,
        "gate_guard": args.gate_guard, "guarded": list(result.guarded),
        "thresholds": result.thresholds, "compensated": args.compensate,
        "cells_found": result.n_cells,
        "cells_on_he": len(result.table), "type_counts": result.table.counts(),
        "registration": result.registration.to_dict(),
    }  # fmt: skip
    return result.table, record, merged


def run(args: argparse.Namespace) -> int:
    from cscvision.cells.mif_panel import read_panel
    from cscvision.core.guard import run_lock
    from cscvision.core.io import check_writable

    check_label_flags(args)  # before anything is read or written (cli.run_command: exit 2)
    t0 = time.perf_counter()
    panel = read_panel(args.panel)
    jobs = _jobs(args.manifest, args.cells)
    check_writable(args.out)
    with run_lock(args.out, "labels mif"):  # one cohort.csv: one run at a time
        return _run_locked(args, panel, jobs, t0)


def _run_locked(args: argparse.Namespace, panel, jobs: list, t0: float) -> int:
    from cscvision.core.batch import BatchItem, run_items
    from cscvision.core.guard import interrupted_notice
    from cscvision.labels.table import table_path
    from cscvision.slides.slide import SlideError

    items = [BatchItem(e.slide_id, e.slide_path, (e, m, c)) for e, m, c in jobs]
    report = run_items(
        items,
        lambda item: _label_and_write(item.data, panel, args),
        is_complete=lambda item: table_path(args.out, item.slide_id).exists(),
        overwrite=args.overwrite,
        desc="labelling",
        record=(ValueError, SlideError, OSError),
    )
    rows = [label_cohort_row(e, table_path(args.out, e.slide_id), args.out) for e, *_ in jobs
            if e.slide_id in report.done or e.slide_id in report.skipped]  # fmt: skip
    errors = [(slide_id, reason) for slide_id, _, reason in report.failed]
    cohort, errors_path = write_label_cohort(args.out, rows, errors)
    if report.interrupted is not None:
        done = f"{len(rows)} slide(s) labelled and in {cohort.name}"
        print(interrupted_notice("labels mif", report.interrupted, done), file=sys.stderr)
        return 128 + report.interrupted
    kept = f" ({len(report.skipped)} kept from an earlier run)" if report.skipped else ""
    print(
        f"wrote {len(report.done)} of {len(jobs)} tile-label tables{kept} "
        f"({sum(report.results.values())} mIF cells on the H&E; "
        f"targets {', '.join(args.feature or ['density_treg'])}) to {args.out} in "
        f"{time.perf_counter() - t0:.1f} s\n  {cohort.name}  for cscvision train\n"
        f"  {errors_path.name}  {len(errors)} slide(s) not labelled"
    )
    print_not_labelled(errors)
    return 1 if errors else 0


def _label_and_write(job: tuple, panel, args: argparse.Namespace) -> int:
    """One slide's cell table, record and tile-label table written (the label table last:
    its presence marks the slide done); the number of cells."""
    from cscvision.cells.table import write_cell_table
    from cscvision.core.io import write_json
    from cscvision.core.names import child
    from cscvision.labels.table import table_path, write_label_table

    entry, mif_path, cells_path = job
    table, record, labels = label_slide(entry, mif_path, cells_path, panel, args)
    cells = args.out / "cells"
    write_cell_table(child(cells, entry.slide_id, ".cells.parquet", what="slide_id"), table)
    write_json(child(cells, entry.slide_id, "_mif.json", what="slide_id"), record)
    write_label_table(table_path(args.out, entry.slide_id), labels)
    return len(table)

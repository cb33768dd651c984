"""``cscvision labels st``: panel scores of Visium / HEST spots → tile-label tables + cohort CSV."""

from __future__ import annotations

import argparse
import math
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
Score gene programmes per spatial-transcriptomics spot and write training targets.

MANIFEST.csv is a cohort manifest (slide_id, patient_id, slide_path[, split]) plus st_path:
each slide's Space Ranger outs/ folder or HEST .h5ad (relative to the CSV). Optional
columns st_scale, st_offset_x, st_offset_y map full-resolution image pixels to slide
level-0 pixels (level0 = fullres * scale + offset) when the slide is not the image Space
Ranger saw; by default they are the same pixels.

--panels CONFIG (YAML, or the packaged st_panels: `cscvision config show st_panels`) names
the gene panels, the score (score_genes | zscore), the tile size (tile_px at mpp, centred on
each spot) and an optional binarize_quantile. Writes into --out: <slide_id>.labels.csv +
.labels.json per slide and cohort.csv (the manifest's columns plus label_path) for
`cscvision train`.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "st",
        help="spatial transcriptomics (Space Ranger outs/, HEST .h5ad) → tile-label tables",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("manifest", type=Path, metavar="MANIFEST.csv")
    parser.add_argument(
        "--panels",
        type=Path,
        default=None,
        metavar="CONFIG",
        help="panel config (YAML); default: the built-in panels",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--slide-mpp",
        type=float,
        default=None,
        metavar="UM_PER_PX",
        help="level-0 µm/px for slides whose metadata gives none",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing tables")
    parser.set_defaults(func=run)


def _float(row: dict, name: str, default: float, where: str) -> float:
    from cscvision.labels.cohort import CohortError

    text = (row.get(name) or "").strip()
    try:
        value = float(text) if text else default
    except ValueError:
        raise CohortError(f"{where}: {name} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise CohortError(f"{where}: {name} {text!r} is not a finite number; give a number")
    return value


def _jobs(manifest: Path) -> list[dict]:
    from cscvision.core.io import read_csv
    from cscvision.labels.cohort import CohortError, read_cohort

    entries = read_cohort(manifest)
    rows = read_csv(manifest)
    if "st_path" not in rows[0]:
        raise CohortError(f"{manifest}: no st_path column (Space Ranger outs/ or HEST .h5ad)")
    jobs = []
    for line, (entry, row) in enumerate(zip(entries, rows, strict=True), start=2):
        where = f"{manifest}: line {line}"
        text = (row.get("st_path") or "").strip()
        if not text:
            raise CohortError(f"{where}: st_path is empty")
        st_path = Path(text) if Path(text).is_absolute() else manifest.parent / text
        if not st_path.exists():
            raise CohortError(f"{where}: st_path {st_path} not found")
        offset = (_float(row, "st_offset_x", 0.0, where), _float(row, "st_offset_y", 0.0, where))
        scale = _float(row, "st_scale", 1.0, where)
        if scale <= 0:
            raise CohortError(f"{where}: st_scale {scale:g} must be > 0 (level-0 px per image px)")
        jobs.append(
            {"entry": entry, "st_path": st_path.resolve(), "scale": scale, "offset": offset}
        )
    return jobs


def run(args: argparse.Namespace) -> int:
    try:
        import anndata  # noqa: F401
        import scanpy  # noqa: F401
    except ImportError:
        hint = 'pip install "cscvision[st]"'
        print(f"cscvision labels st: needs anndata and scanpy: {hint}", file=sys.stderr)
        return 2
    from cscvision.core.guard import run_lock
    from cscvision.core.io import check_writable
    from cscvision.labels.programmes import load_programme_config

    check_label_flags(args)  # before anything is read or written (cli.run_command: exit 2)
    t0 = time.perf_counter()
    config = load_programme_config(str(args.panels) if args.panels else None)
    jobs = _jobs(args.manifest)
    check_writable(args.out)
    with run_lock(args.out, "labels st"):  # quantiles over every sample: one run at a time
        return _run_locked(args, config, jobs, t0)


def _run_locked(args: argparse.Namespace, config, jobs: list[dict], t0: float) -> int:
    from cscvision.labels.table import table_path

    existing = [table_path(args.out, j["entry"].slide_id) for j in jobs]
    existing = [p for p in existing if p.exists()]
    if existing and not args.overwrite:
        print(f"cscvision labels st: {existing[0]} exists; pass --overwrite", file=sys.stderr)
        return 2

    def measure() -> tuple[tuple[list, list], int | None]:
        scored, errors, signum = _score_all(jobs, config, args.slide_mpp)
        return (scored, errors), signum

    def write(found: tuple[list, list]) -> int:
        return _write_all(args, config, jobs, *found, t0)

    unwritten = "no table written (tables are written once every sample is scored)"
    return measure_then_write("labels st", measure, write, unwritten=unwritten)


def _score_all(jobs: list[dict], config, slide_mpp: float | None) -> tuple[list, list, int | None]:
    """Each sample's spot-score table (:func:`cscvision.core.batch.run_items`); a failing
    sample is recorded and skipped. The tables, the failures and the signal that stopped the
    loop, if one did."""
    from cscvision.core.batch import BatchItem, run_items
    from cscvision.labels.st_labels import st_label_table
    from cscvision.slides.info import SlideError

    def score(item: BatchItem):
        job = item.data
        return job, st_label_table(item.slide_path, job["st_path"], config,
                                   slide_id=item.slide_id, mpp_override=slide_mpp,
                                   scale=job["scale"], offset_px=job["offset"])  # fmt: skip

    items = [BatchItem(j["entry"].slide_id, j["entry"].slide_path, j) for j in jobs]
    record = (ValueError, SlideError, OSError, KeyError)  # one bad sample: go on
    report = run_items(items, score, desc="scoring spots", record=record)
    errors = [(slide_id, reason) for slide_id, _, reason in report.failed]
    return list(report.results.values()), errors, report.interrupted


def _write_all(args, config, jobs, scored, errors, t0) -> int:
    from cscvision.labels.st_labels import binarize
    from cscvision.labels.table import table_path, write_label_table

    tables = [t for _, t in scored]
    if config.binarize_quantile is not None and tables:  # quantiles of the samples scored
        tables = binarize(tables, config.binarize_quantile)
    rows = []
    for (job, _), table in zip(scored, tables, strict=True):
        e = job["entry"]
        path = write_label_table(table_path(args.out, e.slide_id), table)
        rows.append(label_cohort_row(e, path, args.out))
    cohort, errors_path = write_label_cohort(args.out, rows, errors)
    n = sum(len(t) for t in tables)
    print(
        f"wrote {len(tables)} of {len(jobs)} tile-label tables ({n} spot tiles of "
        f"{config.tile_px} px at {config.mpp} µm/px; targets "
        f"{', '.join(tables[0].targets) if tables else '-'}) to {args.out} in "
        f"{time.perf_counter() - t0:.1f} s\n"
        f"  {cohort.name}  slide_id,patient_id,slide_path,label_path,split (for cscvision "
        f"train)\n  {errors_path.name}  {len(errors)} sample(s) not labelled"
    )
    print_not_labelled(errors)
    return 1 if errors else 0

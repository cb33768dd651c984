"""``cscvision labels ihc MANIFEST.csv --markers CONFIG --out DIR``: tile targets from IHC."""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

from cscvision.cli.common import check_label_flags, measure_then_write
from cscvision.cli.register import add_registration_args, registration_params
from cscvision.core.guard import run_lock

MANIFEST_COLUMNS = ("slide_id", "patient_id", "slide_path", "ihc_path", "marker")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ihc",
        help="register IHC slides to their H&E slides and turn DAB into tile targets",
        description=(
            "MANIFEST.csv: slide_id,patient_id,slide_path,ihc_path,marker[,split] (one row per "
            "IHC slide; several per H&E slide for several markers; paths relative to the CSV). "
            "Writes per slide <slide_id>.labels.csv/.labels.json (tile-label table), "
            "<slide_id>.ihc.geojson (QuPath, positive regions), registration/ JSON + QC PNG; "
            "qc/<marker>_density.png/.csv (densities and the marker's threshold); and "
            "cohort.csv (label_path column, split kept) that `cscvision train` reads as is."
        ),
    )
    parser.add_argument("manifest", type=Path, help="CSV: " + ",".join(MANIFEST_COLUMNS))
    parser.add_argument(
        "--markers",
        required=True,
        type=Path,
        metavar="CONFIG",
        help="YAML: markers -> targets (see the README)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--mpp", type=float, default=0.5, help="tile µm/px (default 0.5)")
    parser.add_argument("--tile-px", type=int, default=224, help="tile side (default 224)")
    parser.add_argument(
        "--min-tissue",
        type=float,
        default=0.5,
        help="H&E tissue fraction a tile needs (default 0.5)",
    )
    parser.add_argument("--overwrite", action="store_true", help="redo finished slides")
    add_registration_args(parser)
    parser.set_defaults(func=run)  # fmt: skip


def read_manifest(path: Path) -> dict[str, dict]:
    """slide_id -> {patient_id, slide_path, pairs: [(marker, ihc_path)]}; paths resolved."""
    from cscvision.core.io import read_csv
    from cscvision.core.names import check_name
    from cscvision.labels.cohort import CohortError

    rows = read_csv(path)
    missing = [c for c in MANIFEST_COLUMNS if rows and c not in rows[0]]
    if not rows or missing:
        raise CohortError(f"{path}: needs columns {','.join(MANIFEST_COLUMNS)} (missing {missing})")
    slides: dict[str, dict] = defaultdict(lambda: {"pairs": []})
    for line, row in enumerate(rows, start=2):
        paths = {k: Path(row[k].strip()) for k in ("slide_path", "ihc_path")}
        paths = {k: p if p.is_absolute() else (path.parent / p).resolve() for k, p in paths.items()}
        for k, p in paths.items():
            if not p.exists():
                raise CohortError(f"{path}: line {line}: {k} {p} not found")
        where = f"{path}: line {line}"
        slide_id = check_name(row["slide_id"].strip(), "slide_id", where)
        marker = check_name(row["marker"].strip(), "marker", where)
        entry = slides[slide_id]
        entry.update(patient_id=row["patient_id"].strip(), slide_path=paths["slide_path"])
        if (row.get("split") or "").strip():
            entry["split"] = row["split"].strip()
        entry["pairs"].append((marker, paths["ihc_path"]))
    return dict(slides)


def _write_slide(out: Path, slide_id: str, result) -> Path | None:
    from cscvision.core.io import write_json, write_png
    from cscvision.labels.table import table_path, write_label_table

    for m in result.markers:
        stem = out / "registration" / f"{slide_id}_{m.marker}"
        write_json(stem.with_suffix(".json"), m.registration.to_dict())
        write_png(stem.with_name(stem.name + "_qc.png"), m.qc, colours=256)
    if result.table is None:
        return None
    write_json(out / f"{slide_id}.ihc.geojson", result.geojson)
    return write_label_table(table_path(out, slide_id), result.table)


def _write_threshold_qc(out: Path, measures, cfg, spec, thresholds) -> None:
    from cscvision.core.io import write_csv, write_png
    from cscvision.labels.ihc_threshold import histogram, histogram_png, pooled

    for name, thr in thresholds.items():
        x = pooled([m.densities(name, spec, cfg.map_mpp) for m in measures])
        counts, edges = histogram(x, thr.value)
        title = f"{name}: {len(x)} cells"
        picture = histogram_png(counts, edges, thr.value, title)
        write_png(out / "qc" / f"{name}_density.png", picture)
        bins = zip(edges[:-1], edges[1:], counts, strict=True)
        rows = [(f"{a:.4f}", f"{b:.4f}", int(c)) for a, b, c in bins]
        write_csv(out / "qc" / f"{name}_density.csv", ("density_from", "density_to", "cells"), rows)


def run(args: argparse.Namespace) -> int:
    from cscvision.core.config_files import read_yaml
    from cscvision.core.io import check_writable
    from cscvision.labels.ihc import MarkerConfigError, marker_config
    from cscvision.slides.grid import GridSpec

    check_label_flags(args)  # before anything is read or written (cli.run_command: exit 2)
    raw = read_yaml(args.markers) or {}
    if not isinstance(raw, dict):
        raise MarkerConfigError(f"{args.markers}: needs 'markers:' mapping marker names to targets")
    cfg = marker_config(raw, str(args.markers))
    slides = read_manifest(args.manifest)
    params = registration_params(args)  # its flags checked before any slide is read
    check_writable(args.out)
    spec = GridSpec(mpp=args.mpp, tile_px=args.tile_px, min_tissue=args.min_tissue)
    with run_lock(args.out, "labels ihc"):  # the tables share thresholds: one run at a time
        return _run_locked(args, slides, cfg, spec, params)


def _run_locked(args: argparse.Namespace, slides: dict, cfg, spec, params) -> int:
    from cscvision.labels.table import table_path

    t0 = time.perf_counter()
    todo = {k: v for k, v in slides.items()
            if args.overwrite or not table_path(args.out, k).exists()}  # fmt: skip

    def measure() -> tuple[tuple[list, list], int | None]:
        measures, errors, signum = _measure_all(args, todo, cfg, spec, params)
        return (measures, errors), signum

    def write(found: tuple[list, list]) -> int:
        measures, errors = found
        counts, warned = _label_all(args, measures, cfg, spec, errors)
        rows = [(k, v["patient_id"], str(v["slide_path"]), table_path(args.out, k).name,
                 v.get("split", "")) for k, v in slides.items()
                if table_path(args.out, k).exists()]  # fmt: skip
        return _summary(args, slides, rows, errors, counts, warned, t0)

    unwritten = "no table written (the density thresholds are chosen from all slides together)"
    return measure_then_write("labels ihc", measure, write, unwritten=unwritten)


def _measure_all(args, todo: dict, cfg, spec, params) -> tuple[list, list, int | None]:
    """Register and measure every slide to do (:func:`cscvision.core.batch.run_items`); a
    failing slide is recorded and skipped. The measures, the failures and the signal that
    stopped the loop, if one did."""
    from cscvision.core.batch import BatchItem, run_items
    from cscvision.labels.ihc_labels import measure_slide

    def measure(item: BatchItem):
        entry = item.data
        return measure_slide(item.slide_id, item.slide_path, entry["pairs"], cfg, spec, params,
                             slide_mpp=args.slide_mpp)  # fmt: skip

    items = [BatchItem(k, v["slide_path"], v) for k, v in todo.items()]
    report = run_items(items, measure, desc="registering")
    errors = [(slide_id, reason) for slide_id, _, reason in report.failed]
    return list(report.results.values()), errors, report.interrupted


def _label_all(args, measures: list, cfg, spec, errors: list):
    """Choose the thresholds from every measured slide, then write the tables."""
    from cscvision.labels.ihc_labels import label_slide, slide_thresholds, thresholds_for
    from cscvision.labels.ihc_threshold import positive_share_warning

    thresholds = thresholds_for(measures, cfg, spec) if measures else {}
    if measures:
        _write_threshold_qc(args.out, measures, cfg, spec, thresholds)
    counts, positive, tiles = defaultdict(int), defaultdict(float), defaultdict(int)
    slide_warnings = []
    for measure in measures:
        slide_warnings += _qc_warnings(args.out, measure)
        own = slide_thresholds(measure, thresholds, cfg, spec)
        result = label_slide(measure, cfg, spec, own)
        written = _write_slide(args.out, measure.slide_id, result)
        if result.reason:
            errors.append((measure.slide_id, result.reason))
        if written is None:
            continue
        for k, v in result.counts.items():
            counts[k] += v
        for name, share in result.positive_share.items():
            n = int(result.counts.get("valid", 0))
            line = positive_share_warning(name, share, n) if share == share else None
            if line:
                slide_warnings.append(f"{measure.slide_id}: {line}")
            positive[name] += share * n if share == share else 0.0
            tiles[name] += n
    warned = [w for name in tiles if (w := positive_share_warning(
        name, positive[name] / max(tiles[name], 1), tiles[name]))] + slide_warnings  # fmt: skip
    counts["thresholds"] = {k: round(v.value, 4) for k, v in thresholds.items()}
    return counts, warned


def _qc_warnings(out: Path, measure) -> list[str]:
    """One line per accepted pair whose registration QC warns (never refused for it)."""
    lines = []
    for m in measure.accepted:
        reg = m.registration
        if reg.qc == "warn":
            bound = reg.params.get("max_local_error_um")
            lines.append(
                f"{measure.slide_id} {m.marker}: registration QC warn ({reg.qc_reason}); labels "
                f"kept, tiles with a local error (measured or extrapolated) > {bound} µm "
                f"excluded; check {out}/registration/{measure.slide_id}_{m.marker}_qc.png "
                "near tissue edges, folds and tears"
            )  # fmt: skip
    return lines


def _summary(args, slides, rows, errors, counts, warned, t0) -> int:
    from cscvision.core.io import write_csv

    header = ("slide_id", "patient_id", "slide_path", "label_path", "split")
    if not any(r[4] for r in rows):
        header, rows = header[:4], [r[:4] for r in rows]
    cohort = write_csv(args.out / "cohort.csv", header, rows)
    errors_path = write_csv(args.out / "errors.csv", ("slide_id", "reason"), errors)
    thresholds = ", ".join(f"{k} {v}" for k, v in counts.get("thresholds", {}).items())
    print(
        f"labelled {len(rows)} of {len(slides)} slides in {time.perf_counter() - t0:.0f} s "
        f"(tiles: {counts['valid']} valid, {counts['excluded']} excluded as uncertain, "
        f"{counts.get('excluded_registration', 0)} of them where the registration is unsure)\n"
        f"  density thresholds  {thresholds or '-'}  (QC: {args.out}/qc/<marker>_density.png)\n"
        f"  tables    {args.out}/<slide_id>.labels.csv (+ .labels.json)\n"
        f"  QuPath    {args.out}/<slide_id>.ihc.geojson\n"
        f"  QC        {args.out}/registration/<slide_id>_<marker>_qc.png\n"
        f"  cohort    {cohort}  (cscvision train cohort.csv={cohort})\n"
        f"  errors    {errors_path} ({len(errors)} slide(s) with a refused or failed marker)"
    )
    for line in warned:
        print(f"  WARNING: {line}", file=sys.stderr)
    for slide_id, reason in errors:
        print(f"  not labelled (all or part): {slide_id}: {reason}", file=sys.stderr)
    return 1 if errors else 0

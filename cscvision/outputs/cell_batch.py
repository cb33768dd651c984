"""``cscvision cells``: a batch of slides and their cell tables → per-tile cell features and maps.

Each slide is matched to its cell table by slide id (``<slide_id>.cells.parquet``; with a
detector ``fmt``, ``<slide_id>.<ext>`` of that tool's export). Per slide: tissue and the
tile grid as ``cscvision tile`` finds them (no overlap), then
:func:`~cscvision.cells.tiles.tile_cell_features` and
:func:`~cscvision.outputs.cell_maps.write_cell_outputs`, through the shared batch runner
(resume, ``errors.csv``, per-slide locks, nothing outside ``out_dir``). It never writes
into a ``cscvision infer`` folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cscvision.cells.readers import FORMATS, TABLE_FORMAT, read_cells, source_suffixes
from cscvision.cells.table import CellTable
from cscvision.cells.tiles import CellFeatureSpec, tile_cell_features
from cscvision.cells.types import cell_types
from cscvision.outputs.cell_immune import (
    CellSettingsError,
    ImmuneSettings,
    immune_inputs,
    slide_immune,
)
from cscvision.outputs.cell_maps import SUMMARY, cell_outputs_complete, write_cell_outputs
from cscvision.slides.batch import (
    BatchError,
    BatchReport,
    SlideJob,
    collect_inputs,
    make_jobs,
    merge_table,
    resolved_path,
    run_batch,
    shard_jobs,
    slide_dir,
    write_errors,
)
from cscvision.slides.grid import GridSpec, detect_tissue, make_grid

RESULTS = "cells_results.csv"
DEFAULT_MAPS = ("inflammatory", "lymphocyte", "macrophage", "tumour")
MPP_TOLERANCE = 0.02  # relative: a cell table's µm/px and the slide's must agree this well
MAX_OUTSIDE = 0.01  # share of cells allowed outside the slide (detections on its very edge)


@dataclass(frozen=True)
class CellSettings:
    """Everything a slide's cell outputs depend on (besides the slide and its table)."""

    mpp: float = 0.5
    tile_px: int = 224
    min_tissue: float = 0.5
    mask_mpp: float = 8.0
    radius_um: float = 20.0
    maps: tuple[str, ...] = DEFAULT_MAPS
    fmt: str = TABLE_FORMAT
    class_map: str | None = None
    immune: ImmuneSettings | None = dataclasses.field(default_factory=ImmuneSettings)

    def __post_init__(self) -> None:
        GridSpec(
            mpp=self.mpp, tile_px=self.tile_px, min_tissue=self.min_tissue, mask_mpp=self.mask_mpp
        )  # raises on a bad value
        if self.fmt not in FORMATS:
            raise CellSettingsError(f"--format {self.fmt!r}: one of {', '.join(FORMATS)}")
        try:
            CellFeatureSpec(radius_um=self.radius_um)
        except ValueError as e:
            raise CellSettingsError(f"--radius-um: {e}") from None

    def as_dict(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


def match_tables(
    jobs: Sequence[SlideJob], cells: Sequence[str | Path], fmt: str
) -> dict[str, Path]:
    """Cell table (or detector export) of each job's slide id, from files and folders."""
    suffixes = source_suffixes(fmt)
    files: list[Path] = []
    for item in map(Path, cells):
        if item.is_dir():
            files.extend(sorted(p for p in item.iterdir() if p.is_file()))
        elif item.exists():
            files.append(item)
        else:
            raise BatchError(f"--cells {item}: no such file or folder")
    by_id: dict[str, Path] = {}
    for path in files:
        suffix = next((s for s in suffixes if path.name.lower().endswith(s)), None)
        if suffix is not None and not path.name.startswith("."):
            by_id.setdefault(path.name[: -len(suffix)], path)
    folded = {k.casefold(): v for k, v in by_id.items()}
    return {
        j.slide_id: by_id.get(j.slide_id) or folded.get(j.slide_id.casefold())
        for j in jobs
        if j.slide_id in by_id or j.slide_id.casefold() in folded
    }


def check_out_dir(out_dir: Path) -> None:
    """Refuse an ``--out`` that holds ``cscvision infer`` outputs."""
    if (out_dir / "results.csv").is_file():
        raise BatchError(
            f"--out {out_dir} holds cscvision infer outputs (results.csv); give "
            "cscvision cells its own folder"
        )
    if out_dir.is_dir():
        for summary in out_dir.glob(f"*/{SUMMARY}"):
            try:
                kind = json.loads(summary.read_text()).get("kind")
            except (OSError, ValueError, AttributeError):
                continue
            if kind != "cscvision cells":
                raise BatchError(
                    f"--out {out_dir}: {summary.parent.name}/ holds another "
                    "command's outputs; give cscvision cells its own folder"
                )


def table_identity(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime": stat.st_mtime}


def slide_record(job: SlideJob, table_path: Path, settings: CellSettings) -> dict[str, Any]:
    """What earlier outputs of the slide must match to count as complete."""
    return {
        "settings": settings.as_dict(),
        "slide_mpp_override": job.mpp,
        "cell_table": table_identity(table_path),
        "immune_inputs": {
            k: table_identity(p) for k, p in immune_inputs(settings.immune, job.slide_id).items()
        },
    }


def check_scale(table: CellTable, table_path: Path, slide_path: Path, grid) -> None:
    """The table's µm/px and extent must fit the slide: else its x, y are not this slide's
    level-0 pixels (``ValueError`` naming both files and the fix)."""
    if table.mpp is not None and abs(table.mpp / grid.slide_mpp - 1) > MPP_TOLERANCE:
        raise ValueError(
            f"{table_path}: cells at {table.mpp:g} µm/px, but {slide_path} is "
            f"{grid.slide_mpp:g} µm/px at level 0; rescale the cells' x, y to the slide's "
            "level-0 pixels (or fix the table's mpp)"
        )
    w, h = grid.dimensions
    if len(table):
        outside = ((table.x < 0) | (table.y < 0) | (table.x >= w) | (table.y >= h)).mean()
        if outside > MAX_OUTSIDE:
            raise ValueError(
                f"{table_path}: {outside:.0%} of the cells lie outside {slide_path} "
                f"({w} x {h} px); is it this slide's table, in level-0 pixels?"
            )


def cell_job(job: SlideJob, table_path: Path, out_dir: Path, settings: CellSettings) -> dict:
    """One slide: read its cells, find its tissue tiles, write its outputs; the summary."""
    from cscvision.slides.slide import open_slide

    table = read_cells(table_path, settings.fmt, class_map=settings.class_map)
    spec = GridSpec(
        mpp=settings.mpp,
        tile_px=settings.tile_px,
        min_tissue=settings.min_tissue,
        mask_mpp=settings.mask_mpp,
    )
    with open_slide(job.slide_path, mpp=job.mpp) as slide:
        thumb, mask = detect_tissue(slide, spec.mask_mpp)
        grid = make_grid(slide, spec, mask)
    grid = dataclasses.replace(grid, slide_id=job.slide_id)
    check_scale(table, table_path, job.slide_path, grid)
    extra = {}
    if settings.immune is not None:
        extra["immune"] = slide_immune(
            table, grid.dimensions, grid.slide_mpp, job.slide_id, settings.immune, cell_types()
        )
    feats = tile_cell_features(
        table,
        grid.xy_l0,
        grid.tissue,
        grid.plan.tile_l0,
        grid.slide_mpp,
        CellFeatureSpec(radius_um=settings.radius_um),
    )
    return write_cell_outputs(
        slide_dir(out_dir, job.slide_id),
        grid,
        feats,
        table,
        thumb=thumb,
        mask=mask,
        map_nodes=settings.maps,
        record=slide_record(job, table_path, settings),
        extra=extra,
    )


def run_cells(
    slides: Sequence[str | Path],
    cells: Sequence[str | Path],
    out_dir: str | Path,
    settings: CellSettings | None = None,
    *,
    slide_mpp: float | None = None,
    mpp_overrides: dict[str, float] | None = None,
    shard: tuple[int, int] | None = None,
    overwrite: bool = False,
    wait: bool = False,
) -> tuple[BatchReport, list[SlideJob]]:
    """The Python API of ``cscvision cells``: every slide's features and maps into
    ``out_dir/<slide_id>/``, then ``errors.csv`` and ``cells_results.csv``."""
    settings = settings or CellSettings()
    out = Path(out_dir)
    check_out_dir(out)
    jobs = make_jobs(collect_inputs(slides), mpp_overrides, slide_mpp)
    if shard is not None:
        jobs = shard_jobs(jobs, *shard)
    tables = match_tables(jobs, cells, settings.fmt)
    if not tables:
        raise BatchError(
            f"no cell table matches any slide id (e.g. {jobs[0].slide_id}"
            f"{source_suffixes(settings.fmt)[0]}) in --cells {', '.join(map(str, cells))}"
        )
    out.mkdir(parents=True, exist_ok=True)

    def process(job: SlideJob) -> None:
        if job.slide_id not in tables:
            raise ValueError(
                f"{job.slide_path}: no cell table named {job.slide_id}"
                f"{source_suffixes(settings.fmt)[0]} in --cells"
            )
        cell_job(job, tables[job.slide_id], out, settings)

    def complete(job: SlideJob) -> bool:
        path = tables.get(job.slide_id)
        return path is not None and cell_outputs_complete(
            slide_dir(out, job.slide_id), slide_record(job, path, settings)
        )

    report = run_batch(
        jobs,
        process,
        complete,
        overwrite=overwrite,
        desc="cells",
        folder_of=lambda job: slide_dir(out, job.slide_id),
        wait=wait,
    )
    write_errors(out, report, shard)
    write_results(
        out / (RESULTS if shard is None else f"cells_results_shard{shard[0]}of{shard[1]}.csv"),
        jobs,
        report,
        settings,
    )
    return report, jobs


RESULT_COLUMNS = ("slide_id", "slide_path", "status", "n_cells", "n_tiles", "tissue_mm2_tiles")


def write_results(
    path: Path, jobs: Sequence[SlideJob], report: BatchReport, settings: CellSettings
) -> Path:
    """One row per slide: counts, and density per mm² of each mapped type (or the error)."""
    density_cols = [f"density_{n}" for n in ("all", *settings.maps)]
    columns = [*RESULT_COLUMNS, *density_cols, *IMMUNE_COLUMNS, "error"]
    failed = {sid: reason for sid, _, reason in report.failed}
    settled = set(report.done) | set(report.skipped)
    rows, scope_rows = [], []
    for job in jobs:
        base = {"slide_id": job.slide_id, "slide_path": str(resolved_path(Path(job.slide_path)))}
        if job.slide_id in failed:
            base.update(status="failed", error=failed[job.slide_id].split(" | ")[0])
        elif job.slide_id in settled:
            s = json.loads((slide_dir(path.parent, job.slide_id) / SUMMARY).read_text())
            base.update(
                status="done",
                n_cells=s["cells"]["n_cells"],
                n_tiles=s["n_tiles"],
                tissue_mm2_tiles=s["tissue_mm2_tiles"],
            )
            dens = s["density_per_mm2"]
            area = s["tissue_mm2_tiles"]
            base["density_all"] = round(s["cells"]["in_tiles"] / area, 3) if area else None
            base.update({f"density_{n}": dens.get(n) for n in settings.maps})
            base.update(immune_columns(s.get("immune") or {}))
            scope_rows.extend(immune_rows(job.slide_id, s.get("immune") or {}))
        else:
            continue
        rows.append(base)
    merge_table(
        path.with_name(path.name.replace("cells_results", "immune_phenotypes")),
        SCOPE_COLUMNS,
        ([_cell(r.get(c)) for c in SCOPE_COLUMNS] for r in scope_rows),
    )
    return merge_table(path, columns, ([_cell(r.get(c)) for c in columns] for r in rows))


IMMUNE_COLUMNS = (
    "phenotype", "immune_source", "compartments_from", "til_density_mm2", "til_area_pct",
    "immune_density_tumour", "immune_density_stroma", "immune_density_margin",
    "tumour_mm2", "stroma_mm2", "margin_mm2", "phenotype_stemness_rich",
)  # fmt: skip
SCOPE_COLUMNS = ("slide_id", "scope", *IMMUNE_COLUMNS[:-1])


def _scope_columns(rep: dict) -> dict[str, Any]:
    dens, areas = rep.get("immune_density_mm2", {}), rep.get("areas_mm2", {})
    out = {k: rep.get(k) for k in ("phenotype", "til_density_mm2", "til_area_pct")}
    out["immune_source"] = rep.get("immune_source")
    out["compartments_from"] = rep.get("compartments_from")
    for c in ("tumour", "stroma", "margin"):
        out[f"immune_density_{c}"] = dens.get(c)
        out[f"{c}_mm2"] = areas.get(c)
    return out


def immune_columns(immune: dict) -> dict[str, Any]:
    """The slide's phenotype columns of cells_results.csv (empty where none was called)."""
    if "slide" not in immune:
        return {"phenotype": "none" if immune else None}
    out = _scope_columns(immune["slide"])
    stem = (immune.get("regions") or {}).get("stemness_rich")
    out["phenotype_stemness_rich"] = stem["phenotype"] if stem else None
    return out


def immune_rows(slide_id: str, immune: dict) -> list[dict[str, Any]]:
    """Rows of immune_phenotypes.csv: the slide, then each region phenotyped on its own."""
    if "slide" not in immune:
        return []
    scopes = {"slide": immune["slide"], **(immune.get("regions") or {})}
    return [{"slide_id": slide_id, "scope": k, **_scope_columns(v)} for k, v in scopes.items()]


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return ""
    return value


def mpp_overrides_from(path: str | os.PathLike | None) -> dict[str, float] | None:
    from cscvision.slides.slide import load_mpp_overrides

    return load_mpp_overrides(path) if path else None

"""Write synthetic slides with their truth, one at a time or as a cohort of patients."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from cscvision.core.errors import CscvisionError
from cscvision.core.io import atomic_path, write_csv
from cscvision.synth.cells import (
    INFILTRATION_MODES,
    Infiltration,
    draw_infiltration,
    write_slide_cells,
)
from cscvision.synth.ihc import IhcOptions, write_ihc_slide
from cscvision.synth.layout import REGION_CLASSES, REGION_SHARE, SlideLayout, make_layout
from cscvision.synth.pyramid import LEVEL_FACTOR, PyramidSpec, write_pyramid
from cscvision.synth.render import SlideRenderer
from cscvision.synth.stain import StainProfile, sample_lab_profile, sample_slide_profile
from cscvision.synth.truth import (
    LABEL_BITS,
    geojson,
    label_mask,
    outlined_thumbnail,
    write_geojson,
    write_png,
)
from cscvision.synth.visium import VisiumSpec, write_visium

COHORT_COLUMNS = ("slide_id", "patient_id", "slide_path", "annotation_path", "cells_path")
IHC_COLUMNS = ("slide_id", "patient_id", "slide_path", "ihc_path", "marker")
SLIDE_SUFFIX = ".tiff"
THUMB_MAX_PX = 1024
NICHE = "niche"


class CohortExistsError(CscvisionError, FileExistsError):
    """The cohort's output files exist already and ``overwrite`` is off."""


@dataclass(frozen=True)
class SlideTruth:
    """What was written for one slide and what it holds (areas in µm²)."""

    slide_id: str
    seed: int
    slide_path: Path
    annotation_path: Path
    labels_path: Path
    thumbnail_path: Path
    truth_path: Path
    width_px: int
    height_px: int
    mpp: float
    level_count: int
    label_mpp: float
    tissue_um2: float
    area_um2: dict[str, float] = field(default_factory=dict)  # REGION_CLASSES and "niche"
    artefacts: tuple[str, ...] = ()

    def fraction(self, name: str) -> float:
        """Area of ``name`` as a fraction of the tissue."""
        return self.area_um2[name] / self.tissue_um2 if self.tissue_um2 else 0.0


def slide_paths(slide_path: Path, slide_id: str) -> dict[str, Path]:
    folder = slide_path.parent
    return {
        "slide": slide_path,
        "annotation": folder / f"{slide_id}.geojson",
        "labels": folder / f"{slide_id}_labels.png",
        "thumbnail": folder / f"{slide_id}_thumb.png",
        "truth": folder / f"{slide_id}_truth.json",
        "cells": folder / f"{slide_id}.cells.parquet",
        "cells_sidecar": folder / f"{slide_id}.cells.json",
        "cells_truth": folder / f"{slide_id}_cells_truth.csv",
    }


def _size(size_px: int | tuple[int, int]) -> tuple[int, int]:
    w, h = (size_px, size_px) if isinstance(size_px, int) else size_px
    if w < 64 or h < 64:
        raise ValueError(f"slide size {w}x{h} px is too small; use at least 64 px a side")
    return int(w), int(h)


def write_slide(
    path: str | Path,
    *,
    size_px: int | tuple[int, int],
    seed: int,
    mpp: float = 0.5,
    tile_px: int = 256,
    quality: int = 85,
    label_mpp: float = 8.0,
    lab: StainProfile | None = None,
    artefact_rate: float = 1.0,
    slide_id: str | None = None,
    on_row: Callable[[], None] | None = None,
    ihc_markers: tuple[str, ...] = (),
    visium: bool = False,
    region_share: tuple[float, float] = REGION_SHARE,
    visium_layout: str = "2.0",
    infiltration: Infiltration | None = None,
    ihc_options: IhcOptions | None = None,
    mif: bool = False,
) -> SlideTruth:
    """Render one slide to ``path`` (a pyramidal TIFF) with its truth files beside it.

    ``lab`` is the stain profile of the lab batch (shared by a patient's slides); without it
    one is drawn from ``seed``. The same arguments write the same bytes. Each of
    ``ihc_markers`` adds a paired IHC slide ``<id>_<marker>.tiff`` (see cscvision.synth.ihc;
    ``ihc_options`` how far it departs from the H&E section);
    ``visium`` adds ``<slide_id>_visium/outs/`` (Space Ranger layout ``visium_layout``,
    "2.0" or "1.x": cscvision.synth.visium).
    Every slide gets its cell table ``<slide_id>.cells.parquet`` and per-tile density truth
    ``<slide_id>_cells_truth.csv``; ``infiltration`` adds infiltrating lymphocytes to tumour
    and stroma (cscvision.synth.cells), without it the slide's pixels are as before.
    ``mif`` adds ``<slide_id>_mif.ome.tiff`` and its truth (cscvision.synth.mif).
    """
    path = Path(path)
    slide_id = slide_id or path.stem
    width, height = _size(size_px)
    layout = make_layout(
        np.random.default_rng([seed, 1]),
        width_px=width,
        height_px=height,
        mpp=mpp,
        artefact_rate=artefact_rate,
        region_share=region_share,
    )
    lab = lab or sample_lab_profile(np.random.default_rng([seed, 2]))
    stain = sample_slide_profile(np.random.default_rng([seed, 3]), lab)
    extra = (infiltration.population(),) if infiltration is not None else ()
    renderer = SlideRenderer(layout, stain, seed=seed, extra_populations=extra)
    spec = PyramidSpec(width, height, mpp, tile_px=tile_px, quality=quality)
    paths = slide_paths(path, slide_id)
    description = f"cscvision synthetic slide {slide_id}; seed {seed}; {mpp} um/px at level 0"
    with atomic_path(paths["slide"]) as tmp:
        levels = write_pyramid(tmp, spec, renderer.render, description=description, on_row=on_row)
    write_geojson(paths["annotation"], geojson(layout, np.random.default_rng([seed, 4])))
    write_png(paths["labels"], label_mask(layout, label_mpp))
    write_png(paths["thumbnail"], _thumbnail(layout, levels))
    truth = _truth(layout, stain, paths, slide_id, seed, len(levels) + 1, label_mpp)
    _write_truth_json(truth, stain, infiltration)
    write_slide_cells(renderer, slide_id, paths["cells"], paths["cells_truth"])
    for k, marker in enumerate(ihc_markers):
        ihc_path = path.with_name(f"{slide_id}_{marker}{SLIDE_SUFFIX}")
        write_ihc_slide(ihc_path, he_id=slide_id, layout=layout, he_renderer=renderer,
                        marker=marker, seed=seed + 101 * (k + 1), lab=lab, tile_px=tile_px,
                        quality=quality, options=ihc_options)  # fmt: skip
    if mif:
        from cscvision.synth.mif import SUFFIX, write_mif_slide

        write_mif_slide(path.with_name(slide_id + SUFFIX), he_id=slide_id, renderer=renderer,
                        seed=seed + 7919, tile_px=tile_px)  # fmt: skip
    if visium:
        write_visium(paths["slide"].parent / f"{slide_id}_visium", layout, seed=seed,
                     levels=levels, spec=VisiumSpec(layout=visium_layout))  # fmt: skip
    return truth


def _thumbnail(layout: SlideLayout, levels: list[np.ndarray]) -> np.ndarray:
    downsample = max(layout.width_px, layout.height_px) / THUMB_MAX_PX
    source, source_ds = levels[0], LEVEL_FACTOR
    for i, level in enumerate(levels):
        if LEVEL_FACTOR ** (i + 1) <= max(downsample, LEVEL_FACTOR):
            source, source_ds = level, LEVEL_FACTOR ** (i + 1)
    downsample = max(downsample, source_ds)
    size = (
        max(1, round(layout.width_px / downsample)),
        max(1, round(layout.height_px / downsample)),
    )
    rgb = np.asarray(Image.fromarray(source).resize(size, Image.Resampling.BOX))
    return outlined_thumbnail(layout, rgb, downsample)


def _truth(layout, stain, paths, slide_id, seed, level_count, label_mpp) -> SlideTruth:
    um2 = layout.mpp**2
    area = {name: layout.regions[name].area * um2 for name in REGION_CLASSES}
    area[NICHE] = layout.niche.area * um2
    return SlideTruth(
        slide_id=slide_id,
        seed=seed,
        slide_path=paths["slide"],
        annotation_path=paths["annotation"],
        labels_path=paths["labels"],
        thumbnail_path=paths["thumbnail"],
        truth_path=paths["truth"],
        width_px=layout.width_px,
        height_px=layout.height_px,
        mpp=layout.mpp,
        level_count=level_count,
        label_mpp=label_mpp,
        tissue_um2=layout.tissue.area * um2,
        area_um2=area,
        artefacts=tuple(layout.artefacts.named()),
    )


def _write_truth_json(
    truth: SlideTruth, stain: StainProfile, infiltration: Infiltration | None = None
) -> None:
    record = {
        "slide_id": truth.slide_id,
        "seed": truth.seed,
        "width_px": truth.width_px,
        "height_px": truth.height_px,
        "mpp": truth.mpp,
        "level_count": truth.level_count,
        "tissue_um2": round(truth.tissue_um2, 1),
        "area_um2": {k: round(v, 1) for k, v in truth.area_um2.items()},
        "fraction_of_tissue": {k: round(truth.fraction(k), 4) for k in truth.area_um2},
        "artefacts": list(truth.artefacts),
        "label_mask": {"mpp": truth.label_mpp, "bits": LABEL_BITS},
        "stain": stain.as_dict(),
    }
    if infiltration is not None:
        record["lymphocyte_infiltration"] = infiltration.as_dict()
    with atomic_path(truth.truth_path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


# -- cohorts -------------------------------------------------------------------------------
@dataclass(frozen=True)
class CohortSlide:
    slide_id: str
    patient_id: str
    patient: int
    seed: int
    lab: StainProfile


def plan_cohort(n_slides: int, n_patients: int, seed: int) -> list[CohortSlide]:
    """Slides dealt to patients in turn (counts differ by at most one); seeds from ``seed``."""
    if n_slides < 1 or not 1 <= n_patients <= n_slides:
        raise ValueError(f"need 1 <= patients ({n_patients}) <= slides ({n_slides})")
    labs = [sample_lab_profile(np.random.default_rng([seed, p, 0])) for p in range(n_patients)]
    counts = [0] * n_patients
    plan = []
    for i in range(n_slides):
        p = i % n_patients
        counts[p] += 1
        slide_seed = int(np.random.SeedSequence([seed, p, counts[p]]).generate_state(1)[0])
        patient_id = f"SYN-P{p + 1:03d}"
        plan.append(
            CohortSlide(f"{patient_id}-S{counts[p]:02d}", patient_id, p, slide_seed, labs[p])
        )
    return sorted(plan, key=lambda s: s.slide_id)


def _cohort_outputs(out_dir: Path, plan: list[CohortSlide]) -> list[Path]:
    files = [out_dir / "cohort.csv"]
    for s in plan:
        files += slide_paths(out_dir / f"{s.slide_id}{SLIDE_SUFFIX}", s.slide_id).values()
    return files


def write_cohort(
    out_dir: str | Path,
    *,
    n_slides: int,
    n_patients: int,
    size_px: int | tuple[int, int],
    seed: int,
    mpp: float = 0.5,
    tile_px: int = 256,
    quality: int = 85,
    artefact_rate: float = 1.0,
    overwrite: bool = False,
    workers: int = 1,
    progress: bool = False,
    ihc_markers: tuple[str, ...] = (),
    visium: bool = False,
    region_share: tuple[float, float] = REGION_SHARE,
    visium_layout: str = "2.0",
    infiltration: bool | str = False,
    ihc_options: IhcOptions | None = None,
    mif: bool = False,
) -> Path:
    """Write a synthetic cohort with its ground truth: slides, annotations and ``cohort.csv``.

    Parameters
    ----------
    out_dir
        The folder to write.
    n_slides, n_patients
        How many slides, spread over how many patients.
    size_px
        Slide side in pixels (or width, height).
    seed
        Same seed, same bytes.
    mpp, tile_px, quality
        Level-0 µm/px, stored tile size and JPEG quality of the pyramidal TIFFs.
    artefact_rate
        Scales how many pen marks, folds, bubbles and blurred areas are drawn.
    overwrite
        Rewrite slides that exist.
    workers
        Processes writing slides in parallel (same bytes as one worker).
    progress
        Show progress bars (slides, and rows of tiles within a slide).
    ihc_markers
        Add paired IHC slides of these markers and ``ihc_manifest.csv``.
    ihc_options
        How far the IHC sections depart from the H&E (``synth.ihc.IhcOptions``: the mild
        default, or the realistic preset of ``synth --ihc realistic``).
    visium
        Add a synthetic Space Ranger folder per slide and an ``st_path`` column.
    visium_layout
        Its Space Ranger layout: "2.0" (``tissue_positions.csv`` with a header) or "1.x"
        (``tissue_positions_list.csv``, no header).
    infiltration
        Draw each slide's lymphocyte infiltration of tumour and stroma independently of its
        regions (cscvision.synth.cells): ``True`` or ``"uniform"`` draws the two levels
        uniformly, ``"phenotype"`` draws a design per slide (inflamed, excluded or desert,
        recorded in its ``_truth.json``). Every slide gets its cell table either way
        (``cohort.csv``'s ``cells_path``).
    mif
        Add a multiplex IF OME-TIFF per slide, ``mif_panel.yaml`` and ``mif_manifest.csv``
        (cscvision.synth.mif).
    region_share
        Range each slide's stemness-rich and immunosuppressive shares of tissue are drawn
        from (widen it for slide-label cohorts).

    Returns
    -------
    pathlib.Path
        The path of ``cohort.csv``.

    Examples
    --------
    >>> csv = cscvision.write_cohort("cohort", n_slides=2, n_patients=2, size_px=2048, seed=0)
    """
    out_dir = Path(out_dir)
    plan = plan_cohort(n_slides, n_patients, seed)
    existing = [p for p in _cohort_outputs(out_dir, plan) if p.exists()]
    if existing and not overwrite:
        raise CohortExistsError(
            f"{out_dir}: {len(existing)} output files exist already (e.g. {existing[0].name}); "
            "pass --overwrite (overwrite=True) or choose another folder"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {"size_px": size_px, "mpp": mpp, "tile_px": tile_px, "quality": quality}
    kwargs["artefact_rate"], kwargs["visium"] = artefact_rate, visium
    if visium:
        kwargs["visium_layout"] = VisiumSpec(layout=visium_layout).layout  # checked up front
    kwargs["ihc_markers"], kwargs["ihc_options"] = tuple(ihc_markers), ihc_options
    kwargs["region_share"], kwargs["mif"] = tuple(region_share), mif
    kwargs["infiltration"] = (
        ("uniform" if infiltration is True else str(infiltration)) if infiltration else None
    )
    if kwargs["infiltration"] not in (None, *INFILTRATION_MODES):
        raise ValueError(
            f"infiltration {infiltration!r}: one of {', '.join(INFILTRATION_MODES)} (or False)"
        )
    jobs = [(out_dir / f"{s.slide_id}{SLIDE_SUFFIX}", s) for s in plan]
    with tqdm(total=len(jobs), desc="slides", unit="slide", disable=not progress) as bar:
        if workers > 1:
            truths = _write_parallel(jobs, kwargs, workers, bar.update)
        else:
            n_rows = -(-_size(size_px)[1] // tile_px)
            truths = {}
            for path, s in jobs:
                rows = tqdm(total=n_rows, desc=s.slide_id, unit="row", leave=False,
                            disable=not progress)  # fmt: skip
                with rows:
                    truths[s.slide_id] = _write_planned(path, s, kwargs, rows.update)
                bar.update()
    records = [
        (
            s.slide_id,
            s.patient_id,
            truths[s.slide_id].slide_path.name,
            truths[s.slide_id].annotation_path.name,
            f"{s.slide_id}.cells.parquet",
        )
        for s in plan
    ]
    if ihc_markers:
        ihc_rows = [(*r[:3], f"{r[0]}_{m}{SLIDE_SUFFIX}", m) for r in records for m in ihc_markers]
        write_csv(out_dir / "ihc_manifest.csv", IHC_COLUMNS, ihc_rows)
    if mif:
        from cscvision.synth.mif import SUFFIX, write_panel

        write_panel(out_dir / "mif_panel.yaml")
        mif_rows = [(*r[:3], f"{r[0]}{SUFFIX}") for r in records]
        write_csv(out_dir / "mif_manifest.csv", (*IHC_COLUMNS[:3], "mif_path"), mif_rows)
    if visium:
        records = [(*r, f"{r[0]}_visium/outs") for r in records]
        return write_csv(out_dir / "cohort.csv", (*COHORT_COLUMNS, "st_path"), records)
    return write_csv(out_dir / "cohort.csv", COHORT_COLUMNS, records)


def _write_parallel(
    jobs: list[tuple[Path, CohortSlide]], kwargs: dict, workers: int, done: Callable[[], object]
) -> dict[str, SlideTruth]:
    truths = {}
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_write_planned, path, s, kwargs) for path, s in jobs]
        for future in as_completed(futures):
            truth = future.result()
            truths[truth.slide_id] = truth
            done()
    return truths


def _write_planned(
    path: Path, s: CohortSlide, kwargs: dict, on_row: Callable[[], None] | None = None
) -> SlideTruth:
    kwargs = dict(kwargs)
    mode = kwargs.pop("infiltration")
    drawn = draw_infiltration(np.random.default_rng([s.seed, 9]), mode) if mode else None
    return write_slide(
        path,
        seed=s.seed,
        lab=s.lab,
        slide_id=s.slide_id,
        on_row=on_row,
        infiltration=drawn,
        **kwargs,
    )

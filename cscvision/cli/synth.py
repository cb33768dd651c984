"""``cscvision synth``: write a synthetic cohort of H&E-like slides with ground truth."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cscvision.core.validate import FlagError
from cscvision.synth import write_cohort
from cscvision.synth.layout import REGION_SHARE
from cscvision.synth.slide_labels import COLUMNS, TERCILE_COLUMN, write_slide_labels
from cscvision.synth.writer import SLIDE_SUFFIX


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="write synthetic H&E-like slides with known ground truth (demo, tests, benchmarks)",
        description=(
            "Write N synthetic whole-slide images (tiled JPEG pyramidal TIFFs that OpenSlide "
            "opens, 0.5 µm/px at level 0) with QuPath GeoJSON annotations, label masks, "
            "outlined thumbnails and cohort.csv (slide_id,patient_id,slide_path,annotation_path)."
        ),
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--slides", type=int, default=8, help="number of slides (default 8)")
    parser.add_argument(
        "--patients", type=int, default=4, help="number of patients; slides are dealt in turn"
    )
    parser.add_argument(
        "--size", type=int, default=4096, metavar="PX", help="slide side in level-0 px"
    )
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    parser.add_argument("--tile", type=int, default=256, metavar="PX", help="stored tile size")
    parser.add_argument("--quality", type=int, default=85, help="JPEG quality (1-100)")
    parser.add_argument(
        "--mpp", type=float, default=0.5, help="level-0 µm/px written in the TIFF (default 0.5)"
    )
    parser.add_argument(
        "--artefact-rate",
        type=float,
        default=1.0,
        metavar="R",
        help="scale the chance of pen marks, folds, bubbles and blur (0 turns them off)",
    )
    parser.add_argument(
        "--visium",
        action="store_true",
        help="also write a synthetic Space Ranger outs/ folder per slide (<id>_visium/outs: "
        "spot counts from the ground truth) and an st_path column in cohort.csv",
    )
    parser.add_argument(
        "--visium-layout",
        choices=("2.0", "1.x"),
        default="2.0",
        help="Space Ranger layout of --visium: 2.0 (tissue_positions.csv with a header, "
        "default) or 1.x (tissue_positions_list.csv, no header)",
    )
    parser.add_argument("--workers", type=int, default=1, help="slides written in parallel")
    parser.add_argument(
        "--ihc",
        nargs="?",
        const="mild",
        choices=("mild", "realistic"),
        default=None,
        help="add paired IHC slides (<id>_CD44.tiff membranous, <id>_FOXP3.tiff nuclear DAB), "
        "their truth (<id>_<marker>_truth.json, _pointmap.npz) and ihc_manifest.csv for "
        "`cscvision labels ihc`; 'realistic': another scanner (0.2527 µm/px, tinted glass), "
        "scale ±3 %%, a 20-40 µm elastic warp, a fold, an air bubble, more missing tissue "
        "and 10-20 %% of unmarked cells stained for CD44",
    )
    parser.add_argument(
        "--ihc-warp-um",
        type=float,
        nargs=2,
        default=None,
        metavar=("LO", "HI"),
        help="sd of the IHC elastic warp, drawn per pair in [LO, HI] µm (default 4 4 for "
        "--ihc, 20 40 for --ihc realistic)",
    )
    parser.add_argument(
        "--mif",
        action="store_true",
        help="add a multiplex IF image of each section (<id>_mif.ome.tiff: DAPI and 7 "
        "markers, under a small known transform), its truth (<id>_mif_truth.json, "
        "<id>_mif_truth.cells.parquet: true phenotypes), mif_panel.yaml and "
        "mif_manifest.csv for `cscvision labels mif`",
    )
    parser.add_argument(
        "--slide-labels",
        action="store_true",
        help="also write slide_labels.csv: each slide's true stemness-rich and "
        "immunosuppressive fractions of tissue plus noise, and a stemness tercile class "
        "(slide-level labels for cscvision train with kind mil, or cscvision mil)",
    )
    parser.add_argument(
        "--label-noise",
        type=float,
        default=0.02,
        metavar="SD",
        help="sd of the Gaussian noise added to the slide labels (default 0.02)",
    )
    parser.add_argument(
        "--region-share",
        type=float,
        nargs=2,
        default=list(REGION_SHARE),
        metavar=("LO", "HI"),
        help="range each slide's stemness-rich and immunosuppressive shares of tissue are "
        f"drawn from (default {REGION_SHARE[0]} {REGION_SHARE[1]}); widen it (e.g. 0.02 0.5) "
        "for a cohort whose slides differ enough to learn slide labels from",
    )
    parser.add_argument(
        "--infiltration",
        nargs="?",
        const="uniform",
        default=None,
        choices=("uniform", "phenotype"),
        help="add infiltrating lymphocytes to tumour and stroma, at densities drawn per slide "
        "independently of the regions (the cell tables and _cells_truth.csv record them): "
        "uniform (the default when given bare) draws both independently; phenotype draws a "
        "design per slide (inflamed, excluded, desert; in _truth.json) and densities to fit",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace outputs that exist in --out"
    )
    parser.set_defaults(func=run)


def _check(args: argparse.Namespace) -> str | None:
    if args.tile % 16 or args.tile < 16:
        return f"--tile {args.tile}: use a multiple of 16 (JPEG 4:2:0 blocks), e.g. 256"
    if not 1 <= args.quality <= 100:
        return f"--quality {args.quality}: use 1-100"
    if args.size < 64:
        return f"--size {args.size}: use at least 64 px"
    if not 1 <= args.patients <= args.slides:
        return f"--patients {args.patients}: use 1 to --slides ({args.slides})"
    if args.mpp <= 0:
        return f"--mpp {args.mpp}: must be positive"
    lo, hi = args.region_share
    if not 0 <= lo <= hi <= 0.8:
        return f"--region-share {lo:g} {hi:g}: use 0 <= LO <= HI <= 0.8"
    if args.ihc_warp_um and not 0 <= args.ihc_warp_um[0] <= args.ihc_warp_um[1]:
        return f"--ihc-warp-um {args.ihc_warp_um}: use 0 <= LO <= HI"
    if not 0 <= args.label_noise < 1:
        return f"--label-noise {args.label_noise:g}: use a standard deviation in [0, 1)"
    return None


def _ihc_options(args: argparse.Namespace):
    import dataclasses

    from cscvision.synth.ihc import REALISTIC, IhcOptions

    options = REALISTIC if args.ihc == "realistic" else IhcOptions()
    if args.ihc_warp_um:
        options = dataclasses.replace(options, warp_um=tuple(args.ihc_warp_um))
    return options


def run(args: argparse.Namespace) -> int:
    problem = _check(args)
    if problem:
        raise FlagError(problem)
    t0 = time.perf_counter()
    csv_path = write_cohort(
        args.out,
        n_slides=args.slides,
        n_patients=args.patients,
        size_px=args.size,
        seed=args.seed,
        mpp=args.mpp,
        tile_px=args.tile,
        quality=args.quality,
        artefact_rate=args.artefact_rate,
        overwrite=args.overwrite,
        workers=max(1, args.workers),
        progress=True,
        visium=args.visium,
        visium_layout=args.visium_layout,
        ihc_markers=("CD44", "FOXP3") if args.ihc else (),
        ihc_options=_ihc_options(args),
        region_share=tuple(args.region_share),
        infiltration=args.infiltration,
        mif=args.mif,
    )
    labels = None
    if args.slide_labels:
        labels = write_slide_labels(csv_path, noise_sd=args.label_noise, seed=args.seed)
    seconds = time.perf_counter() - t0
    slides = sorted(args.out.glob(f"SYN-*{SLIDE_SUFFIX}"))
    mib = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file()) / 2**20
    print(
        f"wrote {args.slides} slides of {args.size}x{args.size} px ({args.patients} patients, "
        f"{args.mpp} µm/px) to {args.out} in {seconds:.1f} s, {mib:.1f} MiB:\n"
        f"  {csv_path.name}  slide_id,patient_id,slide_path,annotation_path,cells_path\n"
        f"  per slide: {SLIDE_SUFFIX} pyramid, .geojson (QuPath), _labels.png (bit mask), "
        f"_thumb.png (outlined), _truth.json (areas, stain), .cells.parquet (cell table), "
        f"_cells_truth.csv (per-tile densities)\n"
        f"  e.g. {slides[0].name if slides else '-'}"
        + (
            "\n  per slide: <id>_visium/outs/ (Space Ranger layout) and <id>_visium/spot_truth.csv"
            if args.visium
            else ""
        )
        + (
            f"\n  {labels.name}  slide_id,patient_id,{','.join(COLUMNS)},{TERCILE_COLUMN} "
            f"(true fractions + N(0, {args.label_noise:g}) noise)"
            if labels
            else ""
        )
    )
    return 0

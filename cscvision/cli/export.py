"""``cscvision export anndata|spatialdata OUT_DIR --out FILE``: a batch's outputs for scverse
(scanpy, squidpy, spatialdata); see :mod:`cscvision.outputs.anndata` and
:mod:`cscvision.outputs.spatialdata`. Needs the ``scverse`` extra."""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a batch's outputs as AnnData (.h5ad) or SpatialData (.zarr)",
        description="Export the outputs of cscvision infer for scanpy, squidpy and spatialdata "
        '(needs pip install "cscvision[scverse]").',
    )
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    a = kinds.add_parser(
        "anndata",
        help="tiles as one AnnData (.h5ad): obsm['spatial'] in µm, scores, thumbnails",
        description="One observation per scored tile: slide, patient, tile centre (level-0 "
        "px and µm), tissue, every score and per-tile column; X = --features embeddings, "
        "else the scores; uns['spatial'] per slide for squidpy.pl.spatial_scatter.",
    )
    _common(a)
    a.add_argument("--out", type=Path, required=True, help="the .h5ad file (--per-slide: folder)")
    a.add_argument("--per-slide", action="store_true", help="one <slide_id>.h5ad per slide")
    a.add_argument("--no-image", action="store_true", help="no slide thumbnails in uns")
    a.add_argument(
        "--cells-out", type=Path, default=None, help="with --cells: write the cells as this .h5ad"
    )
    a.set_defaults(func=run)
    s = kinds.add_parser(
        "spatialdata",
        help="slide images, tile squares, score maps, cells and the tile table as .zarr",
        description="A SpatialData zarr: per slide the image, tile squares (µm), score maps, "
        "cell points, and the tile AnnData as table; coordinate systems <slide>_um and "
        "<slide>_level0. --image full copies every pyramid level (gigabytes per slide), read "
        "tile by tile.",
    )
    _common(s)
    s.add_argument("--out", type=Path, required=True, help="the .zarr folder to write")
    s.add_argument("--image", choices=("none", "thumbnail", "full"), default="thumbnail")
    s.set_defaults(func=run)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="the --out folder of infer")
    p.add_argument(
        "--features",
        type=Path,
        nargs="+",
        default=None,
        metavar="STORE",
        help="feature stores (.h5 files or folders, cscvision features): X = embeddings",
    )
    p.add_argument("--cells", type=Path, default=None, help="the --out folder of cscvision cells")
    p.add_argument(
        "--cohort", type=Path, default=None, help="manifest (slide_path, patient_id[, slide_id])"
    )
    p.add_argument(
        "--model",
        default=None,
        help="the model that made the outputs (folder or packaged name): its whole card "
        "goes into the AnnData's uns, under cscvision / model_card",
    )


def _stores(items: list[Path] | None) -> dict | None:
    from cscvision.features.store import STORE_SUFFIX, read_feature_store

    if items is None:
        return None
    files = [f for i in items for f in (sorted(i.glob(f"*{STORE_SUFFIX}")) if i.is_dir() else [i])]
    stores = {}
    for path in files:
        store = read_feature_store(path)
        stores[store.slide_id or path.stem] = store
    return stores


def run(args: argparse.Namespace) -> int:
    from cscvision.core.errors import CscvisionError

    try:
        written = _export(args)
    except (CscvisionError, OSError) as e:
        print(f"cscvision export {args.kind}: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


def _export(args: argparse.Namespace) -> list[Path]:
    from cscvision.models.card import read_card
    from cscvision.outputs.anndata import ExportError
    from cscvision.outputs.cohort_stats import read_patients
    from cscvision.outputs.read import read_outputs

    outputs = read_outputs(args.out_dir)
    if not outputs:
        raise ExportError(f"{args.out_dir}: no complete slide outputs (no */summary.json)")
    if args.cells is not None and (args.cells / "results.csv").is_file():
        raise ExportError(f"--cells {args.cells}: an infer folder; give cscvision cells' --out")
    kw = {
        "stores": _stores(args.features),
        "patients": None if args.cohort is None else read_patients(args.cohort),
        "cells": None if args.cells is None else read_outputs(args.cells),
        "card": None if args.model is None else read_card(args.model),
    }
    if args.kind == "anndata":
        return _anndata(args, outputs, kw)
    return [_spatialdata(args, outputs, kw)]


def _anndata(args: argparse.Namespace, outputs, kw: dict) -> list[Path]:
    from cscvision.outputs.anndata import cells_anndata, outputs_anndata, write_h5ad
    from cscvision.outputs.read import BatchOutputs

    images = not args.no_image
    if args.per_slide:
        return [
            write_h5ad(
                outputs_anndata(BatchOutputs({sid: one}), images=images, **kw),
                args.out / f"{sid}.h5ad",
            )
            for sid, one in outputs.items()
        ]
    adata = outputs_anndata(outputs, images=images, **kw)
    written = [write_h5ad(adata, args.out)]
    if args.cells_out is not None and kw["cells"]:
        spatial = adata.uns["spatial"]
        cells = cells_anndata(kw["cells"], patients=kw["patients"], spatial=spatial)
        written.append(write_h5ad(cells, args.cells_out))
    return written


def _spatialdata(args: argparse.Namespace, outputs, kw: dict) -> Path:
    from cscvision.outputs.spatialdata import outputs_spatialdata, write_spatialdata
    from cscvision.slides.slide import open_slide

    with ExitStack() as stack:
        slides = None
        if args.image == "full":
            slides = {
                sid: stack.enter_context(
                    open_slide(
                        one.summary["slide_path"],
                        mpp=one.summary.get("settings", {}).get("slide_mpp_override"),
                    )
                )
                for sid, one in outputs.items()
            }
        sdata = outputs_spatialdata(outputs, image=args.image, slides=slides, **kw)
        return write_spatialdata(sdata, args.out)

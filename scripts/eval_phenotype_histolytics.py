"""Compartments, TIL score and immune phenotype on histolytics' real whole-slide cells.

``hgsc_nuclei_wsi.parquet`` (592,349 nuclei of a high-grade serous ovarian carcinoma slide,
classified by a model, not a pathologist) and ``hgsc_tissue_wsi.parquet`` (tissue polygons
of the same slide, also a model's: tumor, stroma, omental_fat, hemorragia, necrosis, serum),
read from the histolytics 0.3.0 wheel (BSD-3; ``pip download --no-deps histolytics==0.3.0 -d
/tmp/wheels``). The package states no µm/px: 0.5 is assumed (nucleus sizes suggest it; part
1 did the same), so every density here scales with 1 / mpp².

Side by side: (a) compartments from the cells alone (tumour = where neoplastic cells are the
majority of non-immune cells; :mod:`cscvision.cells.compartments`), (b) tumour and stroma
from the tissue polygons (tumour-associated stroma = the polygons' stroma within reach of
their tumour). Both use the same tissue (where the cells are), margin band and the
``he_inflammatory`` source
(PanNuke classes: "inflammatory" holds lymphocytes, plasma cells, neutrophils and
macrophages; histolytics' macrophage_cell is kept apart, its macrophage_nucleus dropped), so
the TIL score is an upper bound. Its thresholds are cscvision's synthetic working values:
the call shows how the rule behaves on real cells, it is not a validated phenotype.

    .venv/bin/python scripts/eval_phenotype_histolytics.py \
        --wheel /tmp/wheels/histolytics-0.3.0-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

MPP = 0.5  # assumed, see the module doc


def _extract(wheel: Path, names: list[str], folder: Path) -> list[Path]:
    with zipfile.ZipFile(wheel) as z:
        return [Path(z.extract(f"histolytics/data/{n}", folder)) for n in names]


def _polygons(path: Path) -> dict[str, object]:
    import pyarrow.parquet as pq
    import shapely

    t = pq.read_table(path, columns=["geometry", "class_name"])
    geoms = shapely.from_wkb(t.column("geometry").to_numpy(zero_copy_only=False))
    names = np.array(t.column("class_name").to_pylist())
    return {n: shapely.make_valid(shapely.union_all(geoms[names == n])) for n in np.unique(names)}


def _line(name: str, rep: dict, seconds: float) -> str:
    a, d = rep["areas_mm2"], rep["immune_density_mm2"]
    return (
        f"  {name:22s} {a['tumour']:7.2f} {a['stroma']:7.2f} {a['margin']:7.2f}   "
        f"{_n(d['tumour'])} {_n(d['stroma'])} {_n(d['margin'])}   "
        f"{_n(rep['til_density_mm2'])} {rep['til_area_pct'] or 0:6.1f}   "
        f"{rep['phenotype']:9s} {seconds:5.1f} s cpu"
    )


def _n(v: float | None) -> str:
    return f"{v:7.0f}" if v is not None else f"{'-':>7s}"


def main() -> None:
    from cscvision.cells.compartments import (
        CompartmentSpec,
        compartments_from_cells,
        compartments_from_masks,
        polygon_mask,
        raster_for,
    )
    from cscvision.cells.phenotype import immune_report, source_rule, til_rule
    from cscvision.cells.readers import read_cells
    from cscvision.cells.types import cell_types

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wheel", type=Path, required=True)
    p.add_argument("--source", default="he_inflammatory")
    p.add_argument("--margin-um", type=float, default=500.0)
    args = p.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="histolytics_"))
    nuclei, tissue = _extract(
        args.wheel, ["hgsc_nuclei_wsi.parquet", "hgsc_tissue_wsi.parquet"], folder
    )
    t0 = time.process_time()
    table = read_cells(nuclei, "histolytics", mpp=MPP)
    hierarchy = cell_types()
    t1 = time.process_time()

    def mask(nodes):
        member = hierarchy.membership(table.types, list(nodes)).any(axis=1)
        return member[table.codes]

    spec = CompartmentSpec(margin_um=args.margin_um)
    dims = (int(table.x.max()) + 200, int(table.y.max()) + 200)
    raster = raster_for(dims, MPP, spec.px_um)
    rule, til = source_rule(args.source), til_rule(source=args.source)
    xy = np.column_stack([table.x, table.y])
    xy_immune, xy_til = xy[mask(rule.cells)], xy[mask(til.cells)]
    t2 = time.process_time()
    cells = compartments_from_cells(
        raster, table.x, table.y, mask(["tumour"]), spec, None, mask(["inflammatory"])
    )
    t3 = time.process_time()
    polys = _polygons(tissue)
    tumour = polygon_mask(raster, polys["tumor"])
    stroma = polygon_mask(raster, polys["stroma"])
    annotated = compartments_from_masks(raster, cells.tissue, tumour, spec, "polygons", stroma)
    t4 = time.process_time()
    inter = (cells.tumour & annotated.tumour).sum()
    dice = 2 * inter / (cells.tumour.sum() + annotated.tumour.sum())
    counts = {k: v for k, v in table.counts().items() if v}
    print(
        f"histolytics hgsc whole slide: {len(table):,} cells kept ({counts}); assumed "
        f"{MPP} µm/px; extent {dims[0] * MPP / 1000:.1f} x {dims[1] * MPP / 1000:.1f} mm; "
        f"raster {raster.shape[1]} x {raster.shape[0]} px of {spec.px_um:g} µm; read "
        f"{t1 - t0:.1f} s cpu\nsource {rule.name}: immune cells {', '.join(rule.cells)} "
        f"({len(xy_immune):,}); TILs {', '.join(til.cells)}; cut-offs tumour "
        f"{rule.tumour_min_mm2:g}, stroma {rule.stroma_min_mm2:g} / mm²; margin "
        f"{spec.margin_um:g} µm total; stroma within {spec.stroma_reach_um:g} µm of tumour\n"
    )
    print(
        "  compartments from       tumour  stroma  margin  (mm²)   immune / mm² in tumour, "
        "stroma, margin   TIL/mm²  TIL %   phenotype  time"
    )
    for name, comp, secs in (("cells alone", cells, t3 - t2), ("tissue polygons", annotated,
                                                                 t4 - t3)):  # fmt: skip
        rep = immune_report(comp, xy_immune, xy_til, rule, til).as_dict()
        print(_line(name, rep, secs))
    print(
        f"\ntumour masks agree: Dice {dice:.3f} (cells {cells.areas_mm2()['tumour']:.2f} mm², "
        f"polygons {annotated.areas_mm2()['tumour']:.2f} mm²); polygon tumour area in all "
        f"{polygon_mask(raster, polys['tumor']).sum() * raster.px_mm2:.2f} mm² (before the "
        "cells' tissue cut). Labels and polygons come from models, not pathologists."
    )


if __name__ == "__main__":
    main()

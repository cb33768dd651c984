r"""Score `cscvision labels mif` on a `cscvision synth --mif` cohort against the generator's truth.

    cscvision synth --out C --slides 4 --patients 4 --size 3072 --seed 3 --mif \
        --infiltration phenotype
    cscvision labels mif C/mif_manifest.csv --panel C/mif_panel.yaml --out L \
        --feature density_treg --feature density_cd8_t --feature density_t_cell \
        --feature density_m2_macrophage --feature density_macrophage --feature density_csc_like
    python scripts/eval_mif.py C L

Prints, pooled over the slides:

1. cell detection: share of the tool's cells within 3 µm of a true cell (one-to-one,
   closest first) and share of true cells found;
2. per phenotype, on matched cells: balanced accuracy and F1 of the tool's call against the
   true phenotype (true fibroblasts and debris count as ``other``), and the strict F1 where
   every missed true cell counts as a wrong call;
3. registration: distance (µm) between where the tool's registration puts the true cells'
   mIF positions on the H&E and where they truly are (every true cell is on tissue), median
   and p90, per slide: against the TRUE transform, not the tool's held-out estimate;
4. tile labels: Pearson of each ``density_<type>`` label against the true density of the
   same 112 µm tile (true cells of the type and below it in the hierarchy / the tile's true
   tissue area from ``<id>_cells_truth.csv``);
5. negative control: the Treg labels remade with FOXP3 given at random within the tool's
   T cells (same count per slide), against the true Treg density, beside the T-cell
   (parent) density's own Pearson; the control should not beat the parent, the real
   labels should beat both. Keeping each slide's Treg count hands the control each slide's
   Treg share of its T cells, slide-level truth that pooled Pearson rewards; a second
   control gives every T cell FOXP3 at the cohort's one rate and keeps none of it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from cscvision.cells.mif_register import mif_to_he_l0
from cscvision.cells.table import read_cell_table
from cscvision.cells.types import cell_types
from cscvision.core.io import read_csv
from cscvision.labels.registration import Registration
from cscvision.labels.table import read_label_table
from cscvision.synth.mif import MifTransform

PHENOTYPES = ("treg", "cd8_t", "t_cell", "m2_macrophage", "macrophage", "csc_like", "tumour",
              "other")  # fmt: skip
MATCH_UM = 3.0


def match(
    tool_xy: np.ndarray, true_xy: np.ndarray, radius_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one pairs (tool index, truth index) within ``radius_px``, closest first."""
    pairs = cKDTree(tool_xy).sparse_distance_matrix(
        cKDTree(true_xy), radius_px, output_type="ndarray"
    )
    order = np.argsort(pairs["v"], kind="stable")
    used_a, used_b, a_out, b_out = set(), set(), [], []
    for a, b in zip(pairs["i"][order], pairs["j"][order], strict=True):
        if a not in used_a and b not in used_b:
            used_a.add(a)
            used_b.add(b)
            a_out.append(a)
            b_out.append(b)
    return np.array(a_out, int), np.array(b_out, int)


def true_kind(types: np.ndarray) -> np.ndarray:
    return np.where(np.isin(types, ["stroma", "dead"]), "other", types)


def scores(called: np.ndarray, true: np.ndarray, kind: str) -> tuple[float, float]:
    a, b = called == kind, true == kind
    sens = (a & b).sum() / max(b.sum(), 1)
    spec = (~a & ~b).sum() / max((~b).sum(), 1)
    f1 = 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)
    return (sens + spec) / 2, f1


def tile_truth(cohort: Path, slide: str, truth, node: str, xy: np.ndarray, tile_l0: float):
    rows = {(int(r["x"]), int(r["y"])): float(r["tissue_um2"])
            for r in read_csv(cohort / f"{slide}_cells_truth.csv")}  # fmt: skip
    member = cell_types().membership(list(truth.types), [node])[:, 0][truth.codes]
    col = (truth.x[member] // tile_l0).astype(int)
    row = (truth.y[member] // tile_l0).astype(int)
    counts = {}
    for key in zip(col, row, strict=True):
        counts[key] = counts.get(key, 0) + 1
    out = []
    for x, y in xy:
        area = rows.get((int(x), int(y)), np.nan)
        key = (round(x / tile_l0), round(y / tile_l0))
        out.append(counts.get(key, 0) / (area / 1e6) if area > 0 else np.nan)
    return np.array(out)


def tile_density(table, node_mask: np.ndarray, xy: np.ndarray, tile_l0: float, area_um2):
    col = (table.x[node_mask] // tile_l0).astype(int)
    row = (table.y[node_mask] // tile_l0).astype(int)
    index = {(round(x / tile_l0), round(y / tile_l0)): i for i, (x, y) in enumerate(xy)}
    counts = np.zeros(len(xy))
    for key in zip(col, row, strict=True):
        if key in index:
            counts[index[key]] += 1
    return counts / (area_um2 / 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cohort", type=Path)
    parser.add_argument("labels", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    slides = [r["slide_id"] for r in read_csv(args.labels / "cohort.csv")]
    called_all, true_all, missed, n_tool, n_true, n_match = [], [], 0, 0, 0, 0
    tiles: dict[str, list] = {}
    rate = _cohort_treg_rate(args.labels, slides)
    print(f"cohort {args.cohort}, labels {args.labels}: {len(slides)} slides")
    for slide in slides:
        truth = read_cell_table(args.cohort / f"{slide}_mif_truth.cells.parquet")
        tool = read_cell_table(args.labels / "cells" / f"{slide}.cells.parquet")
        record = json.loads((args.labels / "cells" / f"{slide}_mif.json").read_text())
        true_rec = json.loads((args.cohort / f"{slide}_mif_truth.json").read_text())
        mpp = float(true_rec["he_mpp"])
        a, b = match(np.column_stack([tool.x, tool.y]), np.column_stack([truth.x, truth.y]),
                     MATCH_UM / mpp)  # fmt: skip
        n_tool, n_true, n_match = n_tool + len(tool), n_true + len(truth), n_match + len(a)
        called_all.append(tool.cell_type[a].astype(str))
        true_all.append(true_kind(truth.cell_type[b].astype(str)))
        missed_mask = np.ones(len(truth), bool)
        missed_mask[b] = False
        missed += int(missed_mask.sum())
        true_all.append(true_kind(truth.cell_type[missed_mask].astype(str)))
        called_all.append(np.full(missed_mask.sum(), "missed"))
        reg = Registration.from_dict(record["registration"])
        true_map = MifTransform(np.asarray(true_rec["transform"]["matrix"]))
        mx, my = true_map.inverse(truth.x, truth.y)
        est = mif_to_he_l0(reg, np.column_stack([mx, my]))
        err = np.hypot(est[:, 0] - truth.x, est[:, 1] - truth.y) * mpp
        print(f"  {slide}: registration error on tissue vs the true transform: median "
              f"{np.median(err):.2f} µm, p90 {np.percentile(err, 90):.2f} µm, max {err.max():.2f} "
              f"(tool's own held-out estimate: {reg.error_um})")  # fmt: skip
        tiles.setdefault("registration_p90", []).append(np.percentile(err, 90))
        labels = read_label_table(args.labels / f"{slide}.labels.csv")
        tile_l0 = labels.tile_px * labels.mpp / mpp
        for k, target in enumerate(labels.targets):
            if target.startswith("density_"):
                node = target[len("density_") :]
                t = tile_truth(args.cohort, slide, truth, node, labels.xy_l0, tile_l0)
                tiles.setdefault(target, []).append((labels.values[:, k], t))
        _control(tiles, tool, truth, labels, tile_l0, rng, args.cohort, slide, rate)
    _report(called_all, true_all, n_tool, n_true, n_match, missed, tiles)


def _cohort_treg_rate(labels: Path, slides: list[str]) -> float:
    """The tool's Tregs over its T cells, pooled over the cohort's slides."""
    tregs = t_cells = 0
    for slide in slides:
        kinds = read_cell_table(labels / "cells" / f"{slide}.cells.parquet").cell_type.astype(str)
        tregs += int((kinds == "treg").sum())
        t_cells += int(np.isin(kinds, cell_types().below("t_cell")).sum())
    return tregs / max(t_cells, 1)


def _control(tiles, tool, truth, labels, tile_l0, rng, cohort, slide, rate) -> None:
    """Treg, random-FOXP3 and T-cell densities per tile from the tool's cells, all over the
    tile's true tissue area, against the true Treg density."""
    true_treg = tile_truth(cohort, slide, truth, "treg", labels.xy_l0, tile_l0)
    areas = {(int(r["x"]), int(r["y"])): float(r["tissue_um2"])
             for r in read_csv(cohort / f"{slide}_cells_truth.csv")}  # fmt: skip
    area = np.array([areas.get((int(x), int(y)), np.nan) for x, y in labels.xy_l0])
    kinds = tool.cell_type.astype(str)
    parent = np.isin(kinds, cell_types().below("t_cell"))
    fake = np.zeros(len(kinds), bool)
    fake[rng.choice(np.flatnonzero(parent), size=int((kinds == "treg").sum()), replace=False)] = 1
    at_rate = parent & (rng.random(len(kinds)) < rate)
    masks = {"real": kinds == "treg", "control": fake, "control_rate": at_rate, "parent": parent}
    for name, mask in masks.items():
        tiles.setdefault(name, []).append(
            (tile_density(tool, mask, labels.xy_l0, tile_l0, area), true_treg)
        )


def _pearson(pairs) -> tuple[float, int]:
    x = np.concatenate([p[0] for p in pairs])
    y = np.concatenate([p[1] for p in pairs])
    ok = np.isfinite(x) & np.isfinite(y)
    return float(np.corrcoef(x[ok], y[ok])[0, 1]), int(ok.sum())


def _report(called_all, true_all, n_tool, n_true, n_match, missed, tiles) -> None:
    called, true = np.concatenate(called_all), np.concatenate(true_all)
    found = called != "missed"
    print(f"cells: {n_tool} found, {n_true} true; {n_match / n_tool:.3f} of found within "
          f"{MATCH_UM} µm of a true cell (one-to-one), {n_match / n_true:.3f} of true cells "
          f"found")  # fmt: skip
    head = f"{'phenotype':<15}{'true n':>8}{'bal.acc':>9}{'F1':>7}{'strict F1':>11}"
    print(head + "  (targets: bal.acc ≥ 0.9, F1 ≥ 0.8)")
    for kind in PHENOTYPES:
        bacc, f1 = scores(called[found], true[found], kind)
        _, strict = scores(called, true, kind)
        print(f"{kind:<15}{(true[found] == kind).sum():>8}{bacc:>9.3f}{f1:>7.3f}{strict:>11.3f}")
    p90 = tiles.pop("registration_p90", [])
    print(f"registration p90 over slides: worst {max(p90):.2f} µm (target ≤ 5 µm)")
    control, parent = tiles.pop("control", None), tiles.pop("parent", None)
    at_rate = tiles.pop("control_rate", None)
    real = tiles.pop("real", None)
    for target, pairs in tiles.items():
        r, n = _pearson(pairs)
        print(
            f"tile labels {target}: Pearson {r:.3f} vs the true density ({n} tiles; target ≥ 0.9)"
        )
    if control:
        print(f"negative control, Pearson with the true Treg density per tile (all over the "
              f"true tissue area): FOXP3 at random within the tool's T cells "
              f"{_pearson(control)[0]:.3f} (each slide's count kept), "
              f"{_pearson(at_rate)[0]:.3f} (the cohort's one rate); the parent T-cell density "
              f"{_pearson(parent)[0]:.3f}; the tool's Tregs {_pearson(real)[0]:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()

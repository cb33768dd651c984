"""Check the within-radius figure of ``summary.json`` against an exact edge-to-edge answer.

For every slide folder of an inference output, recompute "share of stemness area within
R µm of the immunosuppressive region" independently with exact geometry (shapely: the
immunosuppressive region's pixel squares buffered by R, intersected with each stemness
pixel, tissue-weighted) and print it beside the summary's raster figure, the old
centre-to-centre figure and niche/stemness area (what the old figure degenerated to).

    python scripts/check_colocalisation.py OUT_DIR
    python scripts/check_colocalisation.py --demo /tmp/demo   # the demo's held-out slides

``--demo`` writes the demo cohort (``cscvision synth``, 16 slides of 8 patients, seed 0),
takes the held-out test slides of the demo's split and scores them with the committed
``models/demo-synthetic`` model (synthetic data only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import shapely
from scipy import ndimage
from shapely.geometry import box

ROOT = Path(__file__).resolve().parents[1]


def exact_within(a: np.ndarray, b: np.ndarray, weight: np.ndarray, cell_um: float, r: float):
    if not a.any() or not b.any():
        return None
    squares = [box(c, y, c + 1, y + 1) for y, c in zip(*np.nonzero(b), strict=True)]
    zone = shapely.affinity.scale(shapely.union_all(squares), cell_um, cell_um, origin=(0, 0))
    zone = zone.buffer(r, quad_segs=64)
    near = 0.0
    for y, c in zip(*np.nonzero(a), strict=True):
        square = box(c * cell_um, y * cell_um, (c + 1) * cell_um, (y + 1) * cell_um)
        near += weight[y, c] * square.intersection(zone).area / cell_um**2
    return near / float((weight * a).sum())


def centre_to_centre(a, b, weight, cell_um, r):
    if not a.any() or not b.any():
        return None
    distance = ndimage.distance_transform_edt(~b, sampling=cell_um)
    return float((weight * (a & (distance <= r))).sum() / (weight * a).sum())


def check(out_dir: Path) -> None:
    import shapely.affinity  # noqa: F401  (used through shapely.affinity above)

    from cscvision.outputs.read import read_outputs
    from cscvision.outputs.regions import region_masks, tissue_weights

    print(f"{'slide':<14}{'summary':>9}{'exact':>9}{'diff':>9}{'centre':>9}{'niche/stem':>11}")
    for slide_id, out in sorted(read_outputs(out_dir).items()):
        s = out.summary
        targets = list(out.maps)
        maps = np.stack([out.maps[t] for t in targets])
        thresholds = [s["targets"][t]["threshold"] for t in targets]
        regions = region_masks(maps, out.tissue_map, targets, thresholds)
        weight = tissue_weights(maps, out.tissue_map)
        cell_um = s["resolution"]["map_um_per_px"]
        r = s["niche"]["within_um"]
        a, b = regions[targets[0]], regions[targets[1]]
        reported = s["niche"][f"{targets[0]}_within_{r:g}um_of_{targets[1]}"]
        exact = exact_within(a, b, weight, cell_um, r)
        old = centre_to_centre(a, b, weight, cell_um, r)
        stem = s["targets"][targets[0]]["area_mm2"]
        ratio = s["niche"]["area_mm2"] / stem if stem else None
        diff = None if exact is None else reported - exact
        cells = [reported, exact, diff, old, ratio]
        print(f"{slide_id:<14}" + "".join(_fmt(v, 9 if i < 4 else 11) for i, v in enumerate(cells)))
    print(f"map pixel {cell_um:g} µm, radius {r:g} µm; exact = shapely buffer of the pixel squares")


def _fmt(value, width: int) -> str:
    return f"{'—':>{width}}" if value is None else f"{value:>{width}.4f}"


def demo(folder: Path) -> Path:
    from cscvision.cli import main as cli_main
    from cscvision.labels.annotations import DEFAULT_CLASS_MAP
    from cscvision.labels.cohort import annotation_strata, read_cohort, split_by_patient
    from cscvision.synth import write_cohort
    from cscvision.training.config import load_config

    cohort_csv = folder / "cohort" / "cohort.csv"
    if not cohort_csv.exists():
        write_cohort(folder / "cohort", n_slides=16, n_patients=8, size_px=4096, seed=0)
    cfg = load_config(ROOT / "configs" / "cpu_demo.yaml", [f"cohort.csv={cohort_csv}"])
    entries = read_cohort(cohort_csv)
    strata = annotation_strata(entries, DEFAULT_CLASS_MAP) if cfg.cohort.stratify else None
    splits = split_by_patient(entries, fractions=cfg.cohort.split_fractions,
                              seed=cfg.cohort.split_seed, strata=strata)  # fmt: skip
    test = [str(e.slide_path) for e in entries if splits[e.slide_id] == "test"]
    out = folder / "infer"
    model = ROOT / "models" / "demo-synthetic"
    code = cli_main(["infer", *test, "--model", str(model), "--out", str(out), "--threads", "1"])
    if code:
        sys.exit(code)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", type=Path, help="an infer --out folder")
    parser.add_argument("--demo", type=Path, help="build and score the demo's held-out slides here")
    args = parser.parse_args()
    if args.demo is None and args.out_dir is None:
        parser.error("give OUT_DIR or --demo FOLDER")
    check(demo(args.demo) if args.demo else args.out_dir)


if __name__ == "__main__":
    main()

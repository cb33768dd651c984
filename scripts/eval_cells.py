"""``cscvision cells`` densities against the generator's truth, on held-out synthetic slides.

Writes a cohort whose slides each draw a lymphocyte infiltration of tumour and of stroma
independently of their region classes (``write_cohort(infiltration=True)``, seed 101: no
test uses it), runs :func:`~cscvision.outputs.cell_batch.run_cells` (the code behind
``cscvision cells``) on it and compares every tile's density (cells per mm² of tissue)
with ``<id>_cells_truth.csv`` (the generator's count of the cells it placed in the tile,
over the tile's exact tissue area from the tissue polygon). Prints Pearson r per type over
all tiles of all slides (target ≥ 0.99), the slides' infiltration settings beside their
region shares (independence), and per-slide densities.

What it checks and what it cannot: the cells in the table are the generator's own (no
detector in between), so this tests the tile assignment, units and the tissue area the
tool detects from the thumbnail, not detection accuracy. Tiles on the tissue edge differ
most: the tool's tissue fraction comes from an 8 µm/px mask, the truth's from the polygon.

    .venv/bin/python scripts/eval_cells.py --slides 6 --size 4096
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np

TYPES = ("lymphocyte", "macrophage", "inflammatory", "tumour", "csc_like", "stroma", "dead", "all")


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def main() -> None:
    from cscvision.outputs.cell_batch import CellSettings, run_cells
    from cscvision.synth import write_cohort

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slides", type=int, default=6)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=101)
    p.add_argument("--out", type=Path, default=None, help="keep the cohort and outputs here")
    args = p.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="eval_cells_"))
    t0 = time.perf_counter()
    cohort = write_cohort(
        root / "cohort",
        n_slides=args.slides,
        n_patients=args.slides,
        size_px=args.size,
        seed=args.seed,
        infiltration=True,
        overwrite=True,
    )
    t1 = time.perf_counter()
    settings = CellSettings(maps=("lymphocyte",))
    report, jobs = run_cells(
        [cohort.parent], [cohort.parent], root / "out", settings, overwrite=True
    )
    t2 = time.perf_counter()
    assert not report.failed, report.failed
    ours, truth, per_slide = {t: [] for t in TYPES}, {t: [] for t in TYPES}, []
    for job in jobs:
        sid = job.slide_id
        true = {(r["x"], r["y"]): r for r in _rows(cohort.parent / f"{sid}_cells_truth.csv")}
        meta = json.loads((cohort.parent / f"{sid}_truth.json").read_text())
        tiles = _rows(root / "out" / sid / "tiles.csv")
        for t in tiles:
            row = true.get((t["x"], t["y"]))
            if row is None:
                continue  # a tile the tool keeps on glass the truth calls tissue-free
            for kind in TYPES:
                ours[kind].append(float(t.get(f"density_{kind}") or 0.0))
                truth[kind].append(float(row[f"density_{kind}"]))
        summary = json.loads((root / "out" / sid / "summary.json").read_text())
        frac = meta["fraction_of_tissue"]
        per_slide.append(
            (
                sid,
                meta["lymphocyte_infiltration"],
                frac,
                summary["density_per_mm2"].get("lymphocyte"),
                len(tiles),
            )
        )
    print(
        f"{len(jobs)} held-out slides of {args.size}² px at 0.5 µm/px (seed {args.seed}); "
        f"{len(ours['all'])} tiles of 224 px; synth {t1 - t0:.0f} s, cells {t2 - t1:.1f} s"
    )
    print("\nPearson r, tool density vs truth density per tile (cells / mm² of tissue):")
    for kind in TYPES:
        a, b = np.array(ours[kind]), np.array(truth[kind])
        r = np.corrcoef(a, b)[0, 1] if a.std() > 0 and b.std() > 0 else float("nan")
        mae = np.mean(np.abs(a - b))
        print(f"  {kind:13s} r = {r:.4f}   mean |diff| = {mae:8.1f}   mean truth = {b.mean():8.1f}")
    print(
        "\nslide          infiltration tumour / stroma   tumour+stem share   immuno share   "
        "lymphocytes / mm²   tiles"
    )
    settings_t, shares_t = [], []
    for sid, inf, frac, dens, n in per_slide:
        tumour_share = frac["Tumor"] + frac["Stemness-rich"]
        settings_t.append(inf["tumour"])
        shares_t.append(tumour_share)
        print(
            f"  {sid}   {inf['tumour']:.3f} / {inf['stroma']:.3f}            "
            f"{tumour_share:.3f}              {frac['Immunosuppressive']:.3f}          "
            f"{dens:9.1f}        {n}"
        )
    if len(per_slide) > 2:
        r = np.corrcoef(settings_t, shares_t)[0, 1]
        print(
            f"\ncorrelation of tumour infiltration with tumour share over slides: r = {r:.2f} "
            f"(independent draws; n = {len(per_slide)})"
        )


if __name__ == "__main__":
    main()

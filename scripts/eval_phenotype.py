"""``cscvision cells`` immune phenotypes against the generator's design, on held-out slides.

Writes a synthetic cohort with ``infiltration="phenotype"`` (seed 606: no test uses it;
seeds 202, 303 and 404 were the pilots the he_lymphocyte thresholds and the design's
ranges were set on):
each slide is drawn inflamed, excluded or desert, independently of its region classes, and
its infiltrating-lymphocyte densities in tumour and stroma follow the design
(:data:`cscvision.synth.cells.PHENOTYPE_DESIGN`). Runs
:func:`~cscvision.outputs.cell_batch.run_cells` (the code behind ``cscvision cells``; tumour
compartment from the cells, thresholds of the ``he_lymphocyte`` source) and prints the
confusion table design × call, with each slide's compartment densities and TIL score.

What it can and cannot show: the cells are the generator's own (no detector), so this scores
the compartments and the rule, not cell detection. The he_lymphocyte thresholds were set by
looking at pilots (seeds 202, 303, 404; documented in immune_phenotype.yaml), not on
these slides; the immunosuppressive regions' own lymphocytes (present on every slide) are
what could push a desert slide's stroma over the excluded threshold.

    .venv/bin/python scripts/eval_phenotype.py --slides 12 --size 3072 --workers 2
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

PHENOTYPES = ("inflamed", "excluded", "desert")


def main() -> None:
    from cscvision.outputs.cell_batch import CellSettings, run_cells
    from cscvision.synth import write_cohort

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slides", type=int, default=9)
    p.add_argument("--size", type=int, default=3072)
    p.add_argument("--seed", type=int, default=606)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="keep the cohort and outputs here")
    args = p.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="eval_phenotype_"))
    t0 = time.perf_counter()
    cohort = write_cohort(
        root / "cohort",
        n_slides=args.slides,
        n_patients=args.slides,
        size_px=args.size,
        seed=args.seed,
        infiltration="phenotype",
        overwrite=True,
        workers=args.workers,
    )
    t1 = time.perf_counter()
    report, jobs = run_cells(
        [cohort.parent], [cohort.parent], root / "out", CellSettings(maps=("lymphocyte",)),
        overwrite=True,
    )  # fmt: skip
    t2 = time.perf_counter()
    assert not report.failed, report.failed
    with (root / "out" / "cells_results.csv").open(newline="") as f:
        called = {r["slide_id"]: r for r in csv.DictReader(f)}
    table = {(d, c): 0 for d in PHENOTYPES for c in (*PHENOTYPES, "none")}
    print(
        f"{len(jobs)} held-out slides of {args.size}² px at 0.5 µm/px (seed {args.seed}); "
        f"synth {t1 - t0:.0f} s, cells {t2 - t1:.1f} s\n"
    )
    print("slide          design     call       lymph/mm² tumour  stroma  margin   TIL/mm²  TIL %")
    for job in sorted(jobs, key=lambda j: j.slide_id):
        truth = json.loads((cohort.parent / f"{job.slide_id}_truth.json").read_text())
        design = truth["lymphocyte_infiltration"]["design"]
        row = called[job.slide_id]
        table[design, row["phenotype"] or "none"] += 1
        print(
            f"  {job.slide_id}  {design:9s}  {row['phenotype']:9s}  "
            f"{_f(row['immune_density_tumour'])}  {_f(row['immune_density_stroma'])}  "
            f"{_f(row['immune_density_margin'])}  {_f(row['til_density_mm2'])}  "
            f"{_f(row['til_area_pct'], 5, 1)}"
        )
    n_right = sum(table[p, p] for p in PHENOTYPES)
    print(f"\nconfusion (rows: design, columns: call); {n_right}/{len(jobs)} right")
    print(f"  {'':10s}" + "".join(f"{c:>10s}" for c in (*PHENOTYPES, "none")))
    for d in PHENOTYPES:
        print(f"  {d:10s}" + "".join(f"{table[d, c]:10d}" for c in (*PHENOTYPES, "none")))


def _f(text: str, width: int = 7, digits: int = 0) -> str:
    return f"{float(text):{width}.{digits}f}" if text else f"{'-':>{width}s}"


if __name__ == "__main__":
    main()

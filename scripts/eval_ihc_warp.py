"""Issue 27's warp clause, read literally: the same pairs at 1x and at 3x the warp.

    cscvision synth --out C1 --slides 2 --patients 2 --size 6144 --seed 556 --ihc realistic
    cscvision synth --out C3 ... same ... --ihc-warp-um 60 120
    python scripts/eval_ihc.py C1 --out E1 --no-unrelated    # and C3 --out E3
    python scripts/eval_ihc_warp.py C1 E1 C3 E3

Reads the registrations that ``eval_ihc.py`` wrote under ``E*/labels`` (nothing re-runs) and
prints per pair the true error and the tool's estimate (median / p90, µm) at both warps,
estimate(3x) / estimate(1x) for the median and the p90, the true p90's ratio beside them
(whether the error itself grew), and both QC verdicts. The clause
holds for a pair when the 3x estimate is >= 2x the 1x one (median or p90) or the 3x pair
warns. Synthetic data only: the two cohorts share the seed, so the same tissue, stains and
section cuts differ only by the warp's amplitude.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_ihc import score_pairs

from cscvision.cli.labels_ihc import read_manifest


def rows_of(cohort: Path, evaluated: Path) -> dict[str, dict]:
    manifest = read_manifest(cohort / "ihc_manifest.csv")
    return {r["pair"]: r for r in score_pairs(manifest, evaluated / "labels")}


def ratio(a: float | None, b: float | None) -> float:
    return a / b if a and b else float("nan")


def main() -> None:
    if len(sys.argv) != 5:
        sys.exit("usage: eval_ihc_warp.py COHORT_1X EVAL_1X COHORT_3X EVAL_3X")
    c1, e1, c3, e3 = map(Path, sys.argv[1:])
    one, three = rows_of(c1, e1), rows_of(c3, e3)
    print("pair | 1x true median / p90 | 1x estimate | 1x QC | 3x true median / p90 | "
          "3x estimate | 3x QC | est 3x/1x median | est 3x/1x p90 | true 3x/1x p90 | "
          "clause")  # fmt: skip
    held = 0
    for pair in sorted(one.keys() & three.keys()):
        a, b = one[pair], three[pair]
        rm, rp = ratio(b["estimate"], a["estimate"]), ratio(b["estimate_p90"], a["estimate_p90"])
        ok = b["qc"] == "warn" or rm >= 2 or rp >= 2
        held += ok
        print(f"{pair} | {a['true_median']:.1f} / {a['true_p90']:.1f} | {a['estimate']} / "
              f"{a['estimate_p90']} | {a['qc']} | {b['true_median']:.1f} / {b['true_p90']:.1f}"
              f" | {b['estimate']} / {b['estimate_p90']} | {b['qc']} | {rm:.2f} | {rp:.2f} | "
              f"{b['true_p90'] / a['true_p90']:.2f} | "
              f"{'met' if ok else 'NOT met'}")  # fmt: skip
    print(f"clause (3x estimate >= 2x the 1x one, or 3x warns) met on {held} of "
          f"{len(one.keys() & three.keys())} pairs")  # fmt: skip


if __name__ == "__main__":
    main()

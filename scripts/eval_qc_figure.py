"""The registration QC picture's per-region colours scored against the truth.

    cscvision synth --out C --slides 2 --patients 2 --size 6144 --seed 556 --ihc realistic
    cscvision labels ihc C/ihc_manifest.csv --markers configs/ihc_markers.yaml --out L
    python scripts/eval_qc_figure.py C L [--png-out T]

Reads the registrations ``labels ihc`` wrote under ``L/registration`` (nothing re-runs) and
the cohort's point maps (the true H&E -> IHC map, :mod:`cscvision.synth.ihc_truth`). The
picture's right panel colours each place by the estimated local error of its nearest node
of the 32 µm grid; here the true error (point map, over H&E tissue the IHC section holds)
is pooled onto the same nodes (median of the points nearest each node), and per accepted
pair it prints: the share of nodes measured (coloured) and unmeasured (hatched); the
Spearman rank correlation of estimate and truth over measured nodes, and their median
ratio; the true p90 on measured vs unmeasured nodes; and, for the nodes the picture draws
red (estimate or extrapolation above ``--max-local-error-um``), how many truly are above
10 µm, against the truly-above-10 µm nodes it leaves uncoloured by red, and how many of
those it hatches (unmeasured); and the true p90 under orange hatching (extrapolated
above ``--qc-p90-um``) against grey hatching.
``--png-out`` writes, per pair, the same panel drawn from the true node errors beside the
tool's picture, to compare by eye. Synthetic data only.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_ihc import pointmap_path, true_error_map

from cscvision.cli.labels_ihc import read_manifest
from cscvision.labels.registration import Registration
from cscvision.labels.registration_qc import (
    extrapolated_of,
    full_grid,
    node_index,
    registration_exclusions,
)
from cscvision.synth.ihc_truth import read_point_map

BAD_UM = 10.0


def true_node_grid(reg: Registration, pm: dict, shape: tuple[int, int]) -> np.ndarray:
    """The true error pooled onto the local grid's nodes: per node, the median over the
    point-map cells (on shared tissue) nearest it; NaN where none."""
    local = reg.error_detail["local"]
    err = true_error_map(reg, pm)
    rr, cc = np.nonzero(np.isfinite(err))
    xy = (np.stack([cc, rr], 1) + 0.5) * float(pm["step_um"])
    r, c = node_index(local, xy, shape)
    flat = r * shape[1] + c
    out = np.full(shape[0] * shape[1], np.nan)
    values = err[rr, cc]
    order = np.argsort(flat, kind="stable")
    nodes, starts = np.unique(flat[order], return_index=True)
    for node, part in zip(nodes, np.split(values[order], starts[1:]), strict=True):
        out[node] = np.median(part)
    return out.reshape(shape)


def score_pair(reg: Registration, pm: dict) -> dict:
    local = reg.error_detail["local"]
    est = full_grid(local)
    truth = true_node_grid(reg, pm, est.shape)
    on = np.isfinite(truth)  # nodes with shared tissue
    measured, unmeasured = on & np.isfinite(est), on & ~np.isfinite(est)
    step = float(local["step_um"])
    rr, cc = np.nonzero(on)
    over, far = registration_exclusions(reg, np.stack([cc, rr], 1) * step)
    red = np.zeros(est.shape, bool)
    red[rr, cc] = over | far
    bad = on & (truth > BAD_UM)
    rho = spearmanr(est[measured], truth[measured]).statistic if measured.sum() > 2 else np.nan
    ratio = np.median(est[measured] / np.maximum(truth[measured], 0.1)) if measured.any() else 0
    orange = np.zeros(est.shape, bool)  # hatched orange: extrapolated above --qc-p90-um
    orange[rr, cc] = extrapolated_of(reg, np.stack([cc, rr], 1) * step) > reg.params["qc_p90_um"]
    orange &= unmeasured
    parts = (("measured", measured), ("unmeasured", unmeasured), ("orange", orange),
             ("grey", unmeasured & ~orange & ~red))  # fmt: skip
    p90 = {k: float(np.percentile(truth[m], 90)) if m.any() else float("nan") for k, m in parts}
    return {"nodes": int(on.sum()), "measured": float(measured.sum() / max(on.sum(), 1)),
            "rho": float(rho), "ratio": float(ratio), "p90": p90, "red": int(red.sum()),
            "red_bad": int((red & bad).sum()), "bad": int(bad.sum()),
            "bad_hatched": int((bad & unmeasured).sum()),
            "truth": truth}  # fmt: skip


def truth_png(reg: Registration, truth: np.ndarray, fixed_path: Path, out: Path) -> None:
    """The picture's error panel drawn from the true node errors (and the tool's own
    picture of the same pair beside it is under L/registration)."""
    from cscvision.core.io import write_png
    from cscvision.labels.registration import RegistrationParams, level, level_mpps
    from cscvision.labels.registration_figure import error_panel, panel_shape
    from cscvision.labels.registration_qc import local_to_json
    from cscvision.slides.slide import open_slide

    local = {**reg.error_detail["local"], "median_um": truth.astype(np.float32)}
    local.pop("origin", None), local.pop("shape", None)
    fake = replace(reg, qc="pass", error_detail={"local": local_to_json(local)})
    with open_slide(fixed_path) as he, open_slide(reg.moving_path) as ihc:
        mpps = level_mpps(he, ihc, RegistrationParams())
        fixed = level(he, mpps[min(len(mpps) - 1, 1)])
    write_png(out, error_panel(fixed, fake, panel_shape(fixed.mask.shape)), colours=256)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cohort", type=Path)
    ap.add_argument("labels", type=Path, help="the labels ihc --out folder")
    ap.add_argument("--png-out", type=Path, help="write the true-error panels here")
    args = ap.parse_args()
    manifest = read_manifest(args.cohort / "ihc_manifest.csv")
    print(
        "pair | nodes | measured | Spearman est~true (measured) | est/true median | "
        f"true p90 measured / unmeasured (µm) | red nodes truly > {BAD_UM:g} µm | "
        f"nodes truly > {BAD_UM:g} µm not red | of all those, hatched | "
        "true p90 under orange / grey hatching (µm)"
    )
    for slide_id, entry in manifest.items():
        for marker, ihc in entry["pairs"]:
            path = args.labels / "registration" / f"{slide_id}_{marker}.json"
            reg = Registration.from_dict(json.loads(path.read_text()))
            if not reg.ok or not reg.error_detail.get("local"):
                print(f"{slide_id} {marker} | refused or no grid: not scored")
                continue
            s = score_pair(reg, read_point_map(pointmap_path(ihc)))
            p90 = s["p90"]
            print(f"{slide_id} {marker} ({reg.qc}) | {s['nodes']} | {s['measured']:.0%} | "
                  f"{s['rho']:.2f} | {s['ratio']:.2f} | {p90['measured']:.1f} / "
                  f"{p90['unmeasured']:.1f} | {s['red_bad']} of {s['red']} | "
                  f"{s['bad'] - s['red_bad']} of {s['bad']} | {s['bad_hatched']} | "
                  f"{p90['orange']:.1f} / {p90['grey']:.1f}")  # fmt: skip
            if args.png_out:
                out = args.png_out / f"{slide_id}_{marker}_true_error.png"
                truth_png(reg, s["truth"], Path(entry["slide_path"]), out)


if __name__ == "__main__":
    main()

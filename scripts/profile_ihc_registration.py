"""Where the IHC registration error comes from, measured against the generator's truth.

    cscvision synth --out C --slides 2 --patients 2 --size 4096 --seed 7 --ihc realistic
    python scripts/profile_ihc_registration.py C [--pairs SLIDE_MARKER ...] [--no-register]

For every pair of ``C/ihc_manifest.csv`` with a point map beside its IHC slide (layout in
:mod:`cscvision.synth.ihc_truth`), on H&E tissue that the IHC section holds, split into
interior (> 100 µm from the edge of that tissue), edge (≤ 100 µm) and under a fold or
bubble, the true error (median / p90, µm) of:

- **matcher**: the field level's matches (template search, ``--fine-um``) made under the TRUE
  transform (what the matcher alone adds: its noise and bias), with their median error
  vector and robust sd per axis;
- **best affine**: the least-squares affine to the truth (what an affine can reach);
- **affine** and **final** (affine + field) of ``register_slides`` with its defaults,
  beside the tool's own estimate (skipped with ``--no-register``).

Synthetic data only, unless you bring a cohort in the same layout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_ihc import pointmap_path

from cscvision.cli.labels_ihc import read_manifest
from cscvision.labels import registration as R
from cscvision.labels.registration_flow import SEARCH_UM
from cscvision.labels.registration_match import template_matches
from cscvision.slides.slide import open_slide
from cscvision.synth.ihc_truth import he_to_ihc_um, read_point_map

EDGE_UM = 100.0


def _where(pm: dict, xy_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(edge, artefact) flags of H&E µm points: within EDGE_UM of the shared tissue's edge,
    under a fold or bubble."""
    step = float(pm["step_um"])
    keep = (pm["he_tissue"] > 0) & (pm["ihc_tissue"] > 0)
    dist = ndimage.distance_transform_edt(keep) * step
    g = np.clip((xy_um / step).astype(int), 0, np.array(keep.shape)[::-1] - 1)
    return dist[g[:, 1], g[:, 0]] <= EDGE_UM, pm["artefact"][g[:, 1], g[:, 0]] > 0


def _q(e: np.ndarray) -> str:
    return f"{np.median(e):5.1f} / {np.percentile(e, 90):5.1f}" if len(e) else "    -    "


def _line(name: str, err: np.ndarray, edge: np.ndarray, art: np.ndarray) -> str:
    return (f"  {name:12s} all {_q(err)} | interior {_q(err[~edge & ~art])} | edge "
            f"{_q(err[edge])} | fold/bubble {_q(err[art])} (n={len(err)})")  # fmt: skip


def profile_pair(he: Path, ihc: Path, register: bool) -> None:
    pm = read_point_map(pointmap_path(ihc))
    keep = (pm["he_tissue"] > 0) & (pm["ihc_tissue"] > 0)
    rr, cc = np.nonzero(keep)
    pts = (np.stack([cc, rr], 1) + 0.5) * float(pm["step_um"])
    truth = pm["ihc_xy_um"][:, rr, cc].T
    edge, art = _where(pm, pts)
    params = R.RegistrationParams()
    with open_slide(he) as fixed, open_slide(ihc) as moving:
        mpps = R.field_mpps(fixed, moving, params)  # the field's levels: its matches
        finest_f, finest_m = R.level(fixed, mpps[-1]), R.level(moving, mpps[-1])
        s, d = template_matches(finest_f, finest_m, lambda xy: he_to_ihc_um(pm, xy),
                                search_um=SEARCH_UM[-1])  # fmt: skip
        dv = d - he_to_ihc_um(pm, s)
        med = np.median(dv, 0)
        sd = 1.4826 * np.median(np.abs(dv - med), 0)
        e_edge, e_art = _where(pm, s)
        bias, spread = ([round(float(v), 2) for v in a] for a in (med, sd))
        levels = [round(c, 2) for c in mpps]
        print(f"  field levels (µm/px) {levels}; matcher bias (x, y) {bias} µm, "
              f"robust sd {spread} µm")  # fmt: skip
        print(_line("matcher", np.linalg.norm(dv, axis=1), e_edge, e_art))
        a = np.c_[pts, np.ones(len(pts))]
        best = a @ np.linalg.lstsq(a, truth, rcond=None)[0]
        print(_line("best affine", np.linalg.norm(best - truth, axis=1), edge, art))
        if not register:
            return
        t0 = time.perf_counter()
        reg, _ = R.register_slides(fixed, moving, params)
    affine = R._apply(reg.matrix_um, pts)
    print(_line("affine", np.linalg.norm(affine - truth, axis=1), edge, art))
    print(_line("final", np.linalg.norm(reg.map_um(pts) - truth, axis=1), edge, art))
    seconds = time.perf_counter() - t0
    print(f"  tool: ok={reg.ok} estimate {reg.error_um} non-rigid {reg.flow_um is not None} "
          f"agreement {reg.agreement:.3f} ({seconds:.0f} s) {reg.reason}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cohort", type=Path, help="folder with ihc_manifest.csv and point maps")
    ap.add_argument("--pairs", nargs="*", default=None, help="only these SLIDE_MARKER pairs")
    ap.add_argument("--no-register", action="store_true", help="matcher and best affine only")
    args = ap.parse_args()
    for slide_id, entry in read_manifest(args.cohort / "ihc_manifest.csv").items():
        for marker, ihc in entry["pairs"]:
            if args.pairs and f"{slide_id}_{marker}" not in args.pairs:
                continue
            print(f"{slide_id} {marker}: true error, median / p90 (µm)", flush=True)
            profile_pair(Path(entry["slide_path"]), Path(ihc), not args.no_register)
            sys.stdout.flush()


if __name__ == "__main__":
    main()

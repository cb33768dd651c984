"""The per-slide IHC density threshold rules compared on a cohort, against region truth.

    python scripts/ihc_threshold_rules.py C --out DIR

Measures every slide of cohort ``C`` once (registration and DAB maps, every setting at its
default), then labels the cohort under each rule (``old``: a slide's own mixture split
whenever its components separate; ``current``: the rule in
:mod:`cscvision.labels.ihc_labels`) and prints per rule and marker the slide thresholds,
each slide's positive share of tissue and the tile AUROC vs region truth (as
``scripts/eval_ihc.py``). Writes ``DIR/densities_<slide>.npz`` (per marker the densities
of the tissue map cells and whether the truth puts them in the marker's region).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_ihc import BITS, ROOT, pointmap_path, score_labels

from cscvision.cli.labels_ihc import _write_slide, read_manifest
from cscvision.core.config_files import read_yaml
from cscvision.labels import ihc_labels as il
from cscvision.labels.ihc import marker_config
from cscvision.labels.ihc_threshold import (
    MIN_SEPARATION,
    Threshold,
    pooled,
    two_component_split,
)
from cscvision.slides.grid import GridSpec
from cscvision.synth.ihc_truth import read_point_map


def old_cohort(measures, cfg, spec) -> dict[str, Threshold]:
    """The rule before: one mixture split of the pooled densities."""
    out = {}
    for name in cfg.markers:
        x = pooled([m.densities(name, spec, cfg.map_mpp) for m in measures])
        if len(x):
            out[name] = two_component_split(name, x)
    return out


def old_rule(measure, cohort, cfg, spec):
    """The rule before: a slide's own single split whenever its components separate."""
    out = dict(cohort)
    for name in cohort:
        try:
            own = two_component_split(name, measure.densities(name, spec, cfg.map_mpp))
        except ValueError:
            continue
        if own.separation >= MIN_SEPARATION and own.weights[1] >= 0.02:
            out[name] = dataclasses.replace(own, rule="own (old rule)")
    return out


def truth_of_cells(measure, marker, cfg, spec, pm) -> np.ndarray:
    """Region truth of the tissue map cells (same order as ``measure.densities``)."""
    target_bit = BITS[cfg.markers[marker].target]
    m = next(r for r in measure.accepted if r.marker == marker)
    rows, cols = m.frame["density"].shape
    rr, cc = np.mgrid[0:rows, 0:cols]
    px = (cc + 0.5) * cfg.map_mpp / spec.mask_mpp
    py = (rr + 0.5) * cfg.map_mpp / spec.mask_mpp
    he = measure.mask[np.clip(py.astype(int), 0, measure.mask.shape[0] - 1),
                      np.clip(px.astype(int), 0, measure.mask.shape[1] - 1)]  # fmt: skip
    keep = he & (m.frame["tissue"] > 0.5)
    step = float(pm["step_um"])
    r = np.clip(((rr + 0.5) * cfg.map_mpp / step).astype(int), 0, pm["region"].shape[0] - 1)
    c = np.clip(((cc + 0.5) * cfg.map_mpp / step).astype(int), 0, pm["region"].shape[1] - 1)
    return ((pm["region"][r, c] & target_bit) > 0)[keep]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cohort", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--markers", type=Path, default=ROOT / "configs" / "ihc_markers.yaml")
    args = ap.parse_args()
    manifest = read_manifest(args.cohort / "ihc_manifest.csv")
    raw = read_yaml(args.markers)
    cfg = marker_config(raw, str(args.markers))
    spec = GridSpec(mpp=0.5, tile_px=224, min_tissue=0.5)
    measures = [il.measure_slide(k, v["slide_path"], v["pairs"], cfg, spec)
                for k, v in manifest.items()]  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    for ms in measures:
        arrays = {}
        for marker, ihc in manifest[ms.slide_id]["pairs"]:
            if not any(r.marker == marker for r in ms.accepted):
                continue
            pm = read_point_map(pointmap_path(ihc))
            arrays[f"{marker}_density"] = ms.densities(marker, spec, cfg.map_mpp)
            arrays[f"{marker}_truth"] = truth_of_cells(ms, marker, cfg, spec, pm)
        np.savez_compressed(args.out / f"densities_{ms.slide_id}.npz", **arrays)
    min_ihc = float(raw.get("min_ihc_tissue", 0.6))
    for rule, fn, pool in (("old", old_rule, old_cohort),
                           ("current", il.slide_thresholds, il.thresholds_for)):  # fmt: skip
        cohort = pool(measures, cfg, spec)
        print(f"{rule} pooled:", {k: round(v.value, 3) for k, v in cohort.items()})
        labels = args.out / rule
        for ms in measures:
            thr = fn(ms, cohort, cfg, spec)
            res = il.label_slide(ms, cfg, spec, thr)
            _write_slide(labels, ms.slide_id, res)
            for name, t in thr.items():
                print(
                    f"{rule} {ms.slide_id} {name}: threshold {t.value:.3f} ({t.rule}; means "
                    f"{t.means[0]:.3f}/{t.means[1]:.3f} weights {t.weights[1]:.2f} D "
                    f"{t.separation:.2f}) positive tiles {res.positive_share[name]:.0%}"
                )
        lab = score_labels(manifest, labels, min_ihc)
        for t, (auc, pos, n) in lab["auroc"].items():
            print(f"{rule}: IHC-derived {t}: tile AUROC {auc:.3f} ({pos} positive of {n})")


if __name__ == "__main__":
    main()

"""Which slides a tile model's OOD record flags, under each of several cards' thresholds.

Each slide is scored once, as ``cscvision infer`` scores it (``predict_slide``), with the
first ``--model``; every other model must keep the same record (``ood.safetensors`` with the
same digest: the same Gaussian, thresholds only differ, as after ``scripts/refit_ood.py`` on
a copy), so the raw score is the first model's OOD ratio times its tile threshold. Prints,
per model and slide, the share of tissue tiles beyond that model's tile threshold and its
verdict, and per model the tile AUROC of the raw score of each group against ``--id-group``.

    nice -n 5 .venv/bin/python scripts/eval_ood_rule.py \\
        --model old=/tmp/ood3/pkg_old --model new=/tmp/ood3/pkg_new \\
        --group heldout=/tmp/ood3/refit/cohort/SYN-P007-S01.tiff,... \\
        --group real=../shared/data/cmu_small_region.svs

How it could fool you: the groups are what you pass (synthetic held-out slides share the
training generator; one real slide is one real slide); a few slides per group make each
verdict an anecdote, not a rate.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from cscvision.inference.predict import predict_slide
from cscvision.models.export import load_model
from cscvision.outputs.trust import OOD


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True, help="NAME=DIR, first scores")
    p.add_argument("--group", action="append", required=True, help="NAME=SLIDE[,SLIDE...]")
    p.add_argument(
        "--id-group",
        action="append",
        default=[],
        help="group the AUROCs are taken against (repeat for several)",
    )
    args = p.parse_args()
    models = dict(m.split("=", 1) for m in args.model)
    loaded = {name: load_model(path) for name, path in models.items()}
    first = next(iter(loaded.values()))
    digest = first.card.ood["sha256"]
    for name, m in loaded.items():
        if m.card.ood.get("sha256") != digest:
            raise SystemExit(f"--model {name}: its OOD record differs from the first model's")
    raw: dict[str, list[tuple[str, np.ndarray]]] = {}
    for spec in args.group:
        group, paths = spec.split("=", 1)
        for path in paths.split(","):
            pred = predict_slide(path, first, progress=False)
            score = pred.trust[OOD] * float(first.card.ood["tile_threshold"])
            raw.setdefault(group, []).append((Path(path).stem, score))
    for name, m in loaded.items():
        ood = m.card.ood
        tile, limit = float(ood["tile_threshold"]), float(ood["slide_share_threshold"])
        print(f"{name}: tile threshold {tile:.1f}, slide share threshold {limit:.1%} "
              f"({ood.get('calibrated_on', '')})")  # fmt: skip
        for group, slides in raw.items():
            for sid, score in slides:
                share = float(np.mean(score > tile))
                verdict = "FLAGGED" if share > limit else "not flagged"
                print(f"  {group:8s} {sid:26s} {len(score):5d} tiles, {share:6.1%} beyond "
                      f"-> {verdict}")  # fmt: skip
    print_aurocs(raw, args.id_group)


def print_aurocs(groups: dict, id_groups: list[str]) -> None:
    """Tile AUROC of the OOD score of every group against each of ``id_groups``."""
    for id_group in id_groups:
        ref = np.concatenate([s for _, s in groups[id_group]])
        for group, slides in groups.items():
            if group != id_group:
                other = np.concatenate([s for _, s in slides])
                y = np.r_[np.zeros(len(ref)), np.ones(len(other))]
                auc = roc_auc_score(y, np.r_[ref, other])
                print(f"tile AUROC of the OOD score, {group} vs {id_group}: {auc:.3f}")


if __name__ == "__main__":
    main()

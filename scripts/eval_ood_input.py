"""Which slides a tile CNN's OOD record would flag if its first block read each tile's grey
level instead of its colour: an experiment, not an option of the package (no card records
it and ``infer`` does not apply it).

The model's network runs on each tile's grey level (0.299 R + 0.587 G + 0.114 B, from the
card's mean/std-normalised input) replicated to 3 channels; the Gaussian is fitted on the
run's training loader tiles (``--config``/``--work`` as for ``scripts/refit_ood.py``), the
thresholds set as ``refit_ood`` sets them: on the validation slides' tissue tiles, and
(cross-fitted) on those pooled with the training slides scored out of fold by patient.
``--input colour`` reproduces the model's card thresholds (a check of this computation).
Prints each group's slides' shares beyond and verdicts under both references, and tile
AUROCs of each group against ``--id-group``.

    nice -n 5 .venv/bin/python scripts/eval_ood_input.py --model /tmp/ood3/pkg_old \\
        --work /tmp/ood4/pkgw --input grey --features block_stats \\
        --group id=ID1.tiff,ID2.tiff --group unseen=ADIPOSE-0.tiff --id-group id

How it could fool you: synthetic slides only; grey keeps the stain's intensity; a few
slides per group make each verdict an anecdote.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from cscvision.cli.demo_pipeline import DEMO_CONFIG, _cohort
from cscvision.labels.annotations import DEFAULT_CLASS_MAP, ClassMap
from cscvision.labels.cohort import read_cohort
from cscvision.models.export import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_ood_rule import print_aurocs

from cscvision.models.kinds import kind_of_config, resolve
from cscvision.models.ood import (
    collect_features,
    fit_gaussians,
    ood_scores_of,
    reference_thresholds,
)
from cscvision.training.data import prepare_cohort
from cscvision.training.ood import SlideRef, _slide_features, held_out_scores
from cscvision.training.tables import cohort_targets
from cscvision.training.train import _splits, load_config

GREY = (0.299, 0.587, 0.114)


def grey_forward(net: torch.nn.Module, mean, std) -> None:
    """Make ``net`` read its normalised input's grey level, replicated to 3 channels."""
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    w = torch.tensor(GREY).view(1, 3, 1, 1)
    plain = net.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        grey = ((x * s + m) * w).sum(1, keepdim=True).expand(-1, 3, -1, -1)
        return plain((grey - m) / s)

    net.forward = forward


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True, help="cohort and run folder")
    p.add_argument("--config", default=DEMO_CONFIG)
    p.add_argument("--input", choices=("colour", "grey"), default="grey")
    p.add_argument("--features", choices=("block_stats", "texture"), default="block_stats")
    p.add_argument("--group", action="append", default=[], help="NAME=SLIDE[,SLIDE...]")
    p.add_argument("--id-group", action="append", default=[])
    args = p.parse_args()
    torch.set_num_threads(2)
    work = args.work.resolve()
    cohort = _cohort(work, 16, 8, 4096, 0)
    run = work / "run_ood"
    cfg = load_config(args.config, [f"cohort.csv={cohort}", f"run_dir={run}", "seed=0"])
    class_map = ClassMap.from_dict(cfg.classes) if cfg.classes else DEFAULT_CLASS_MAP
    entries = read_cohort(cfg.cohort.csv)
    targets = cohort_targets(entries, cfg.targets) or class_map.targets
    splits = _splits(run / "splits.csv", entries, cfg, class_map)
    by_split = prepare_cohort(entries, splits, spec=cfg.grid, class_map=class_map,
                              cache_dir=run / "cache", progress=False, targets=targets)  # fmt: skip
    dm, _, _ = resolve(kind_of_config(cfg).pieces)(cfg, targets, by_split, run, False)
    model = load_model(args.model)
    net, card = model.net.eval(), model.card
    if args.input == "grey":
        grey_forward(net, card.mean, card.std)
    x, _, sl, where = collect_features(net, dm._loader("train"), card, features=args.features)
    record = fit_gaussians(x)
    root = Path(cfg.cohort.csv).parent

    def feats(path) -> np.ndarray:
        return _slide_features(net, card, where, SlideRef(path), None)

    train = dm.slides["train"]
    path_of = {e.slide_id: root / e.slide_path for e in entries}
    tissue = [feats(path_of[s.slide_id]) for s in train]
    val = [ood_scores_of(record, feats(path_of[e.slide_id])) for e in entries
           if splits[e.slide_id] == "val"]  # fmt: skip
    oof = held_out_scores([x[sl == i] for i in range(len(train))],
                          [s.patient_id for s in train], score=tissue)  # fmt: skip
    rules = {"validation": reference_thresholds(val)[:2],
             "cross-fitted": reference_thresholds(val + oof)[:2]}  # fmt: skip
    groups = {}
    for spec in args.group:
        name, paths = spec.split("=", 1)
        groups[name] = [(Path(q).stem, ood_scores_of(record, feats(q))) for q in paths.split(",")]
    print(f"input {args.input}, features {args.features} ({x.shape[1]}-d)")
    for ref, (tile, limit) in rules.items():
        print(f"{ref}: tile threshold {tile:.1f}, slide share threshold {limit:.1%}")
        for name, slides in groups.items():
            for sid, score in slides:
                share = float(np.mean(score > tile))
                verdict = "FLAGGED" if share > limit else "not flagged"
                print(f"  {name:8s} {sid:26s} {len(score):5d} tiles, {share:6.1%} -> {verdict}")
    print_aurocs(groups, args.id_group)


if __name__ == "__main__":
    main()

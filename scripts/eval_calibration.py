"""ECE before and after calibration on held-out synthetic slides, against ground truth.

Writes a fresh synthetic cohort (a seed the demo model never saw), scores every tissue tile
with the model as exported (calibrated probabilities) and with its calibration removed, and
prints the expected calibration error per target over tiles whose truth is clear (soft
target ≥ 0.5 positive, ≤ 0.05 negative), 10 equal-width bins.

    .venv/bin/python scripts/eval_calibration.py --model models/demo-synthetic --slides 12

Synthetic slides only: this checks the arithmetic and the plumbing of calibration, not how
calibrated any model is on real tissue.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import torch

from cscvision.inference.predict import predict_slide
from cscvision.labels.annotations import DEFAULT_CLASS_MAP, read_annotations
from cscvision.labels.cohort import read_cohort
from cscvision.labels.targets import tile_targets
from cscvision.models.calibration import clear_truth, reliability
from cscvision.models.export import LoadedModel, load_model
from cscvision.synth import write_cohort


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("models/demo-synthetic"))
    ap.add_argument("--slides", type=int, default=12)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=101)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    if not model.card.calibration:
        raise SystemExit(f"{args.model}: the card has no calibration; re-export the model")
    plain = LoadedModel(model.net, dataclasses.replace(model.card, calibration={}), model.path)
    targets = model.card.targets
    probs = {"before": [], "after": []}
    truth = []
    with tempfile.TemporaryDirectory() as tmp:
        csv = write_cohort(Path(tmp) / "cohort", n_slides=args.slides, n_patients=args.slides,
                           size_px=args.size, seed=args.seed, workers=2)  # fmt: skip
        for entry in read_cohort(csv):
            after = predict_slide(entry.slide_path, model, progress=False)
            before = predict_slide(entry.slide_path, plain, progress=False)
            regions = read_annotations(entry.annotation_path)
            soft = tile_targets(regions, DEFAULT_CLASS_MAP, after.grid.xy_l0,
                                after.grid.plan.tile_l0, tissue_mask=after.mask,
                                mask_scale=after.mask_scale)  # fmt: skip
            probs["after"].append(after.probs)
            probs["before"].append(before.probs)
            keep = ~soft.excluded  # pen, folds, bubbles: dropped as in training
            probs["after"][-1], probs["before"][-1] = after.probs[keep], before.probs[keep]
            truth.append(soft.targets[keep])
    soft_all = np.concatenate(truth)
    print(
        f"model {model.card.name}: {len(soft_all)} tiles of {args.slides} held-out synthetic "
        f"slides (seed {args.seed}); calibration {model.card.calibration['method']}"
    )
    for t, name in enumerate(targets):
        mask, labels = clear_truth(soft_all[:, t])
        row = [f"{name:>18}: {int(mask.sum())} clear tiles"]
        for stage in ("before", "after"):
            p = np.concatenate(probs[stage])[mask, t]
            row.append(f"ECE {stage} {reliability(p, labels[mask])['ece']:.4f}")
        print(", ".join(row))


if __name__ == "__main__":
    main()

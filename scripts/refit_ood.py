"""Add an OOD record to an exported model, its weights untouched (``make demo-model-ood``).

The run's tiles are made again as training made them: for the packaged demo model, the
cohort of ``cscvision demo`` (16 synthetic slides of 8 patients, 4096 px, seed 0) and the
``cpu_demo`` config. The refit refuses when the tiles made again differ in count from those
the card records.

    nice -n 5 .venv/bin/python scripts/refit_ood.py \\
        --model cscvision/resources/models/demo-synthetic --work demo_out
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from cscvision.cli.demo_pipeline import DEMO_CONFIG, _cohort
from cscvision.core.io import write_json
from cscvision.inference.predict import prepare_slide
from cscvision.models.card import CARD_FILE, WEIGHTS_FILE
from cscvision.models.export import load_model
from cscvision.models.ood import SLIDE_SHARE_FLOOR, TILE_QUANTILE, feature_tap, load_ood
from cscvision.training.refit import refit_ood
from cscvision.training.train import load_config


def val_slides(cfg) -> list[Path]:
    """The validation slides of ``cfg``'s patient split (as training made it)."""
    from cscvision.labels.annotations import ClassMap
    from cscvision.labels.cohort import read_cohort
    from cscvision.training.train import _splits

    entries = read_cohort(cfg.cohort.csv)
    splits = _splits(
        Path(cfg.run_dir) / "splits.csv", entries, cfg, ClassMap.from_dict(cfg.classes)
    )
    root = Path(cfg.cohort.csv).parent
    return [root / e.slide_path for e in entries if splits[e.slide_id] == "val"]


def calibrate_on_slides(model_dir: Path, slides: list[Path]) -> dict:
    """Set the record's tile and slide thresholds from the validation slides' tissue tiles
    read as inference reads them (artefact tiles included; training drops them), so that
    held-out slides are judged against tiles like their own. Returns the new ood block."""
    model = load_model(model_dir)
    card, ood = model.card, load_ood(model_dir, model.card)
    mean = torch.tensor(card.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(card.std).view(1, 3, 1, 1) * 255
    per_slide = []
    with torch.inference_mode(), feature_tap(model.net.eval(), ood.features) as seen:
        for path in slides:
            batches = prepare_slide(path, card).batches
            for i in range(len(batches)):
                model.net((batches.read(i)["image"].float() - mean) / std)
            per_slide.append(ood(torch.cat(seen)).numpy())
            seen.clear()
    threshold = float(np.quantile(np.concatenate(per_slide), TILE_QUANTILE))
    shares = np.array([np.mean(s > threshold) for s in per_slide])
    block = {
        **card.ood,
        "tile_threshold": threshold,
        "slide_share_threshold": round(max(SLIDE_SHARE_FLOOR, 2 * float(shares.max())), 4),
        "val_tiles": int(sum(map(len, per_slide))),
        "val_slides": len(per_slide),
        "val_slide_shares_max": round(float(shares.max()), 4),
        "calibrated_on": "validation slides' tissue tiles as inference reads them",
    }
    path = model_dir / CARD_FILE
    write_json(path, {**json.loads(path.read_text()), "ood": block})
    return block


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("cscvision/resources/models/demo-synthetic"))
    p.add_argument("--work", type=Path, default=Path("demo_out"), help="cohort and run folder")
    p.add_argument("--config", default=DEMO_CONFIG)
    p.add_argument("--slides", type=int, default=16)
    p.add_argument("--patients", type=int, default=8)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--features",
        choices=("block_stats", "texture", "penultimate"),
        default=None,
        help="OOD features (default: texture for tile CNNs)",
    )
    p.add_argument(
        "--calibrate-on-slides",
        action="store_true",
        help="thresholds from the validation slides' tiles as inference reads them",
    )
    args = p.parse_args()
    work = args.work.resolve()
    cohort = _cohort(work, args.slides, args.patients, args.size, args.seed)
    weights = args.model / WEIGHTS_FILE
    before = hashlib.sha256(weights.read_bytes()).hexdigest()
    cfg = load_config(
        args.config,
        [f"cohort.csv={cohort}", f"run_dir={work / 'run_ood'}", f"seed={args.seed}"],
    )
    card = refit_ood(cfg, args.model, features=args.features)
    if args.calibrate_on_slides:
        calibrate_on_slides(args.model, val_slides(cfg))
        card = load_model(args.model).card
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == before, "weights changed"
    print(json.dumps(card.ood, indent=1))
    print(f"weights unchanged: sha256 {before[:16]}")


if __name__ == "__main__":
    main()

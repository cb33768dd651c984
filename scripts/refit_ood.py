"""Add an OOD record and confidence thresholds to an exported model, its weights untouched
(``make demo-model-ood``).

The run's tiles are made again as training made them: for the packaged demo model, the
cohort of ``cscvision demo`` (16 synthetic slides of 8 patients, 4096 px, seed 0) and the
``cpu_demo`` config. The refit refuses when the tiles made again differ in count from those
the card records. As at export, the record is fitted on the training tiles and its thresholds
set from the validation slides read as inference reads them.

    nice -n 5 .venv/bin/python scripts/refit_ood.py \\
        --model cscvision/resources/models/demo-synthetic --work demo_out
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from cscvision.cli.demo_pipeline import DEMO_CONFIG, _cohort
from cscvision.models.card import WEIGHTS_FILE
from cscvision.training.refit import refit_ood
from cscvision.training.train import load_config


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
        help="OOD features (default: block_stats for tile CNNs)",
    )
    p.add_argument(
        "--reference",
        choices=("validation", "cross-fitted"),
        default="validation",
        help="OOD thresholds from the validation slides (default), or also from the training "
        "slides scored out of fold by patient",
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
    card = refit_ood(cfg, args.model, features=args.features, reference=args.reference)
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == before, "weights changed"
    print(json.dumps(card.ood, indent=1))
    print(f"weights unchanged: sha256 {before[:16]}")


if __name__ == "__main__":
    main()

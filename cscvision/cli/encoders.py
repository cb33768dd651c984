"""``cscvision encoders``: the encoder registry and which weights files are configured."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cscvision.cli.features import WEIGHTS_DIR_ENV, add_weights_dir_arg


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "encoders",
        help="list the tile encoders and their configured weights files",
        description=(
            "List every registered encoder (architecture, tile px, µm/px, embedding size, "
            "pooling, licence, where its weights are published) and whether its weights "
            f"file is found in --weights-dir (default ${WEIGHTS_DIR_ENV}). Nothing is "
            "downloaded: point cscvision features --weights at the file."
        ),
    )
    add_weights_dir_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cscvision.models.registry import ENCODERS, NOT_REGISTERED, configured_weights

    folder: Path | str | None = args.weights_dir or os.environ.get(WEIGHTS_DIR_ENV)
    print(f"weights folder: {folder or f'none (--weights-dir or ${WEIGHTS_DIR_ENV})'}")
    header = f"{'encoder':<14} {'timm architecture':<30} {'tile':>4} {'µm/px':>5} {'dim':>5}"
    print(f"{header} {'pool':<15} {'params':>7}  weights")
    for spec in ENCODERS.values():
        found = configured_weights(spec, folder)
        where = f"found {found}" if found else f"not configured ({spec.weights_file})"
        print(
            f"{spec.name:<14} {spec.timm_name:<30} {spec.tile_px:>4} {spec.mpp:>5} "
            f"{spec.dim:>5} {spec.pool:<15} {spec.params / 1e6:>6.1f}M  {where}"
        )
    print()
    for spec in ENCODERS.values():
        if spec.weights_url:
            print(f"{spec.name}: {spec.weights_url} — licence: {spec.licence}")
    for name, why in NOT_REGISTERED.items():
        print(f"{name}: not registered; {why}")
    return 0

"""``cscvision stain``: fit an H&E stain-normalisation reference and inspect one."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cscvision.core.validate import FlagError

HELP = """\
fit: draw tissue tiles from one or more slides (or one region of a slide), fit a
normalisation reference (Macenko or Vahadane stain vectors with their 99th-percentile
concentrations, or Reinhard's L*a*b* means and standard deviations) and write it as JSON.
show: print a reference: its stains, the angle of each to Ruifrok & Johnston's standard
vectors, and what it was fitted on. The JSON is what a model card's stain-normalisation
record holds.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "stain",
        help="fit or show an H&E stain-normalisation reference",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    fit = actions.add_parser("fit", help="fit a reference on slides' tissue tiles")
    fit.add_argument("slides", nargs="+", type=Path, metavar="SLIDE")
    fit.add_argument("--out", required=True, type=Path, metavar="REF.json")
    fit.add_argument("--method", choices=("macenko", "vahadane", "reinhard"), default="macenko")
    fit.add_argument("--mpp", type=float, default=1.0, help="µm/px of the tiles (default 1.0)")
    fit.add_argument("--tiles", type=int, default=16, help="tissue tiles drawn per slide")
    fit.add_argument(
        "--region",
        default=None,
        metavar="X,Y,W,H",
        help="level-0 pixels of the one slide to draw tiles from (default: all its tissue)",
    )
    fit.add_argument(
        "--slide-mpp",
        type=float,
        default=None,
        metavar="UM_PER_PX",
        help="level-0 µm/px for slides whose metadata gives none",
    )
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--overwrite", action="store_true", help="replace REF.json if it exists")
    show = actions.add_parser("show", help="print a reference")
    show.add_argument("reference", type=Path, metavar="REF.json")
    parser.set_defaults(func=run)


def _region(text: str | None, n_slides: int) -> tuple[int, int, int, int] | None:
    if text is None:
        return None
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().lstrip("-").isdigit() for p in parts):
        raise FlagError(f"--region {text!r}: give X,Y,W,H in level-0 pixels, e.g. 0,0,4096,4096")
    x, y, w, h = (int(p) for p in parts)
    if w <= 0 or h <= 0 or x < 0 or y < 0:
        raise FlagError(f"--region {text!r}: X, Y must be ≥ 0 and W, H > 0")
    if n_slides != 1:
        raise FlagError("--region applies to one slide; give one SLIDE with it")
    return x, y, w, h


def _fit(args: argparse.Namespace) -> int:
    import numpy as np

    from cscvision.core.io import write_text
    from cscvision.slides.slide import open_slide
    from cscvision.slides.stain import fit_stain, sample_tissue_tiles

    if args.out.exists() and not args.overwrite:
        raise FlagError(f"{args.out} exists; pass --overwrite to replace it")
    if not 0.1 <= args.mpp <= 16 or args.tiles < 1:
        raise FlagError("--mpp must lie in [0.1, 16] µm/px and --tiles be ≥ 1")
    region = _region(args.region, len(args.slides))
    tiles = []
    for path in args.slides:
        with open_slide(path, mpp=args.slide_mpp) as slide:
            tiles.append(
                sample_tissue_tiles(
                    slide, mpp=args.mpp, n_tiles=args.tiles, seed=args.seed, region_l0=region
                )
            )
    pixels = np.concatenate([t.reshape(-1, 3) for t in tiles])
    source = ", ".join(p.name for p in args.slides) + (f" region {args.region}" if region else "")
    ref = fit_stain(pixels, args.method, source=f"{source}; {len(pixels)} px at {args.mpp} µm/px")
    write_text(args.out, json.dumps(ref.to_dict(), indent=2) + "\n")
    print(f"wrote {args.out}: {args.method} reference from {sum(len(t) for t in tiles)} tiles")
    print(_describe(ref))
    return 0


def _describe(ref) -> str:
    import numpy as np

    from cscvision.slides.stain import FIT_VERSION, FIT_VERSIONS, RUIFROK_HE, angle_deg

    lines = [f"method: {ref.method}", f"fitted on: {ref.source or '-'}"]
    if ref.stain_matrix is not None:
        fit = int(ref.details.get("fit", 1))
        lines.append(f"fit: version {fit} ({FIT_VERSIONS.get(fit, 'unknown')})" + (
            f"; cscvision stain fit now makes version {FIT_VERSION}" if fit != FIT_VERSION
            else ""))  # fmt: skip
        for name, v, std, m in zip(("H", "E"), ref.stain_matrix, RUIFROK_HE, ref.max_concentration,
                                   strict=True):  # fmt: skip
            rgb = ", ".join(f"{c:.3f}" for c in v)
            lines.append(
                f"{name}: OD ({rgb}), {angle_deg(np.asarray(v), std):.1f}° from Ruifrok's; "
                f"99th-percentile concentration {m:.3f}"
            )
    else:
        lines.append("L*a*b* mean " + ", ".join(f"{v:.2f}" for v in ref.lab_mean))
        lines.append("L*a*b* sd   " + ", ".join(f"{v:.2f}" for v in ref.lab_std))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from cscvision.slides.stain import read_stain_reference

    if args.action == "fit":
        return _fit(args)
    print(_describe(read_stain_reference(args.reference)))
    return 0

"""``cscvision register HE IHC --out DIR``: register an IHC slide onto its H&E slide."""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import Field

from cscvision.core.validate import Flags, check_flags


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "register",
        help="register an IHC (or any other) slide of the same block onto its H&E slide",
        description=(
            "Rotation/mirror search, patch matches and RANSAC affine on thumbnails, coarse to "
            "fine, then a non-rigid displacement grid; writes OUT/registration.json (level-0 "
            "µm of both slides), OUT/qc.png (verdict, checkerboard, local error per region) and "
            "prints the held-out error. "
            "Exit status 1 when it failed."
        ),
    )
    parser.add_argument("he", type=Path, help="the fixed slide (H&E)")
    parser.add_argument("ihc", type=Path, help="the moving slide (IHC)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--panel",
        type=Path,
        default=None,
        help="the moving image is multiplex IF (OME-TIFF, .qptiff or a folder of one TIFF per "
        "channel) with this panel file: its nuclear marker is registered against haematoxylin",
    )
    add_registration_args(parser)
    parser.set_defaults(func=run)


def add_registration_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-error-um",
        type=float,
        default=50.0,
        help="fail when the held-out error's p90 is above this (default 50)",
    )
    parser.add_argument("--qc-p90-um", type=float, default=10.0,
                        help="an accepted pair whose estimated error p90 is above this gets "
                        "QC 'warn' (kept, never refused for it; default 10)")  # fmt: skip
    parser.add_argument("--qc-unmeasured-share", type=float, default=0.03,
                        help="an accepted pair also gets QC 'warn' when more than this "
                        "share of its tissue has no held-out match near it and an error, "
                        "extrapolated from the field's bend, above --qc-p90-um "
                        "(default 0.03)")  # fmt: skip
    parser.add_argument("--max-local-error-um", type=float, default=20.0,
                        help="labels ihc: tiles where the local held-out registration error "
                        "is above this get valid = 0, and on a warned pair the tiles with "
                        "no local measure whose extrapolated error is above it "
                        "(default 20)")  # fmt: skip
    parser.add_argument(
        "--min-inliers", type=int, default=12, help="fail with fewer agreeing matches (default 12)"
    )
    parser.add_argument(
        "--fine-um", type=float, default=2.0, help="finest registration level, µm/px (default 2)"
    )
    parser.add_argument(
        "--nonrigid",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a displacement grid after the affine from dense patch matches (outliers "
        "dropped, smoothed), kept where it lowers the held-out error (default on; "
        "--no-nonrigid: affine only)",
    )
    parser.add_argument(
        "--flow-smooth-um",
        type=float,
        default=160.0,
        help="smoothing (Gaussian sigma) of the displacement grid, µm (default 160)",
    )
    parser.add_argument(
        "--min-agreement",
        type=float,
        default=0.15,
        help="refuse when fewer of the patches tried agree on one transform (default 0.15; "
        "measured on synthetic realistic pairs: true 0.21-0.33, unrelated 0.03-0.05)",
    )
    parser.add_argument("--min-final-agreement", type=float, default=0.08,
                        help="... unless at least this share agrees with the final "
                        "non-rigid transform (default 0.08: true pairs under a warp no affine "
                        "follows 0.14-0.28, unrelated at most 0.02)")  # fmt: skip
    parser.add_argument("--min-inlier-ratio", type=float, default=0.0,
                        help="refuse when fewer of the finest level's matches agree (default 0: "
                        "not checked; it refused true pairs under a strong warp)")  # fmt: skip
    parser.add_argument(
        "--max-stretch",
        type=float,
        default=1.25,
        help="refuse an affine that scales or shears more (default 1.25)",
    )
    parser.add_argument(
        "--min-dice",
        type=float,
        default=0.5,
        help="refuse when registered tissues overlap less (default 0.5)",
    )
    parser.add_argument("--slide-mpp", type=float, default=None, metavar="UM_PER_PX",
                        help="level-0 µm/px for slides whose metadata gives none")  # fmt: skip


class RegistrationFlags(Flags):
    """Ranges of the registration flags, checked before any slide is read."""

    fine_um: float = Field(2.0, gt=0, le=1000)
    max_error_um: float = Field(50.0, gt=0)
    qc_p90_um: float = Field(10.0, gt=0)
    qc_unmeasured_share: float = Field(0.03, ge=0, le=1)
    max_local_error_um: float = Field(20.0, gt=0)
    flow_smooth_um: float = Field(160.0, gt=0)
    max_stretch: float = Field(1.25, ge=1)
    min_inliers: int = Field(0, ge=0)
    min_agreement: float = Field(0.0, ge=0, le=1)
    min_final_agreement: float = Field(0.08, ge=0, le=1)
    min_inlier_ratio: float = Field(0.0, ge=0, le=1)
    min_dice: float = Field(0.0, ge=0, le=1)


def registration_params(args: argparse.Namespace):
    """The registration flags as parameters; ``ValueError`` naming a flag out of range."""
    from cscvision.labels.registration import RegistrationParams

    check_flags(
        RegistrationFlags,
        **{k: getattr(args, k) for k in RegistrationFlags.model_fields if hasattr(args, k)},
    )
    return RegistrationParams(
        max_error_um=args.max_error_um,
        qc_p90_um=args.qc_p90_um,
        qc_unmeasured_share=args.qc_unmeasured_share,
        max_local_error_um=args.max_local_error_um,
        min_inliers=args.min_inliers,
        fine_um=args.fine_um,
        nonrigid=args.nonrigid,
        flow_smooth_um=args.flow_smooth_um,
        min_agreement=args.min_agreement,
        min_final_agreement=args.min_final_agreement,
        min_inlier_ratio=args.min_inlier_ratio,
        max_stretch=args.max_stretch,
        min_dice=args.min_dice,
    )


def run(args: argparse.Namespace) -> int:
    from cscvision.core.io import write_json, write_png
    from cscvision.labels.registration import register_slides
    from cscvision.slides.slide import open_slide

    params = registration_params(args)  # bad flags: exit 2 (cli.run_command)
    mpp = args.slide_mpp  # a slide that cannot be read: exit 2 (cli.run_command)
    if args.panel is not None:
        with open_slide(args.he, mpp=mpp) as he:
            reg, qc = register_slides(he, _mif(args), params)
    else:
        with open_slide(args.he, mpp=mpp) as he, open_slide(args.ihc, mpp=mpp) as ihc:
            reg, qc = register_slides(he, ihc, params)
    json_path = write_json(args.out / "registration.json", reg.to_dict())
    qc_path = write_png(args.out / "qc.png", qc, colours=256)
    e = reg.error_um
    print(
        f"{'registered' if reg.ok else 'FAILED'}: {args.ihc.name} onto {args.he.name}"
        f"{'' if reg.ok else ' (' + reg.reason + ')'}"
        f"{', QC ' + reg.qc + (': ' + reg.qc_reason if reg.qc_reason else '') if reg.ok else ''}\n"
        f"  mirrored {reg.flip}, rotation {reg.rotation_deg:.1f}°, {reg.n_inliers} of "
        f"{reg.n_matches} matches agree ({reg.agreement:.0%} of the patches tried), "
        f"non-rigid {'kept' if reg.flow_um is not None else 'not kept'}, held-out error "
        f"median {e['median']} µm, p90 {e['p90']} µm, tissue Dice {reg.tissue_dice:.2f}\n"
        f"  transform {json_path}\n  QC        {qc_path}"
    )
    return 0 if reg.ok else 1


def _mif(args: argparse.Namespace):
    from cscvision.cells.mif_panel import read_panel
    from cscvision.cells.mif_read import open_mif
    from cscvision.cells.mif_register import VirtualBrightfield

    return VirtualBrightfield(open_mif(args.ihc, mpp=args.slide_mpp), read_panel(args.panel))

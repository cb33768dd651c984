"""``cscvision doctor``: versions, devices, and a test slide opened end to end."""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "doctor",
        help="check the installation",
        description="Print versions (Python, torch, CUDA, OpenSlide) and open a test slide.",
    )
    p.add_argument("slide", nargs="?", type=Path, help="a slide to open (default: a synthetic one)")
    p.set_defaults(func=run)


def _versions() -> list[tuple[str, str]]:
    import numpy
    import openslide
    import tifffile
    import torch
    import torchvision

    import cscvision
    from cscvision.slides.slide import openslide_library_version

    cuda = torch.version.cuda or "none"
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(devices)) or "no GPU visible"
    return [
        ("cscvision", cscvision.__version__),
        ("python", platform.python_version()),
        ("platform", platform.platform()),
        ("torch", torch.__version__),
        ("torchvision", torchvision.__version__),
        ("CUDA (build)", cuda),
        ("GPUs", f"{devices} ({names})"),
        ("openslide-python", openslide.__version__),
        ("OpenSlide library", openslide_library_version()),
        ("tifffile", tifffile.__version__),
        ("numpy", numpy.__version__),
    ]


def _check_slide(path: Path) -> list[str]:
    from cscvision.slides.grid import GridSpec, make_grid
    from cscvision.slides.slide import open_slide

    with open_slide(path) as slide:
        info = slide.info
        grid = make_grid(slide, GridSpec())
        tile = slide.read_tile(tuple(grid.xy_l0[0]), grid.plan) if len(grid) else None
        return [
            f"opened {path}",
            f"  vendor {info.vendor}, {info.dimensions[0]} x {info.dimensions[1]} px, "
            f"{info.level_count} levels, {info.mpp:.4f} µm/px ({info.mpp_source})",
            f"  fast JPEG path: {'yes' if slide.uses_fast_path else 'no (OpenSlide)'}",
            f"  {len(grid)} tissue tiles at 0.5 µm/px; first tile "
            f"{None if tile is None else tile.shape}",
        ]


def _demo_slide(folder: Path) -> Path:
    import numpy as np
    import tifffile

    rng = np.random.default_rng(0)
    rgb = np.full((1024, 1024, 3), 245, np.uint8)
    rgb[256:768, 256:768] = rng.integers(120, 200, (512, 512, 3), dtype=np.uint8)
    rgb[256:768, 256:768, 1] //= 2
    path = folder / "doctor.tif"
    res = (1e4 / 0.5, 1e4 / 0.5)  # px per cm at 0.5 µm/px
    tifffile.imwrite(
        path, rgb, tile=(256, 256), compression="jpeg", photometric="rgb",
        resolution=res, resolutionunit="CENTIMETER",
    )  # fmt: skip
    return path


def run(args: argparse.Namespace) -> int:
    for name, version in _versions():
        print(f"{name:>18}: {version}")
    try:
        if args.slide:
            lines = _check_slide(args.slide)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                lines = _check_slide(_demo_slide(Path(tmp)))
    except Exception as e:
        print(f"slide check FAILED: {e}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    print("ok")
    return 0

"""``cscvision doctor``: versions, devices, and a test slide opened end to end."""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from packaging.requirements import Requirement


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "doctor",
        help="check the installation",
        description=(
            "Print versions (Python, torch, CUDA, OpenSlide), the installed extras and what "
            "a missing one would bring, and open a test slide."
        ),
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


# What each extra brings; an extra without an entry here is described by its packages.
EXTRA_FEATURES = {
    "ray": "Ray clusters (cscvision infer/features --ray)",
    "features": "timm encoders and HDF5 feature stores",
    "viewer": "cscvision report and cscvision view (plots, local web server)",
    "dicom": "DICOM WSI conversion (wsidicomizer)",
    "test": "the test suite and wheel builds (pytest, ruff, build, selenium)",
    "scverse": "cscvision export anndata/spatialdata (anndata, scanpy, squidpy, spatialdata)",
    "all": "every extra that runs on a CPU machine",
}


def _extra_requirements() -> dict[str, list[Requirement]]:
    """Each extra of the installed cscvision -> its requirements (packaging Requirement)."""
    from importlib.metadata import distribution

    from packaging.requirements import Requirement

    dist = distribution("cscvision")
    extras: dict[str, list[Requirement]] = {
        name: [] for name in dist.metadata.get_all("Provides-Extra") or []
    }
    for text in dist.requires or []:
        req = Requirement(text)
        for extra in extras:
            if req.marker is not None and req.marker.evaluate({"extra": extra}):
                extras[extra].append(req)
    return extras


def _missing(req: Requirement, extras: dict[str, list[Requirement]]) -> list[str]:
    """Why ``req`` is not met ([] when it is); cscvision[...] expands to those extras."""
    from importlib.metadata import PackageNotFoundError, version

    if req.name == "cscvision":
        return [
            m
            for extra in sorted(req.extras)
            for r in extras.get(extra, [])
            for m in _missing(r, extras)
        ]
    try:
        installed = version(req.name)
    except PackageNotFoundError:
        return [f"{req.name} not installed"]
    if not req.specifier.contains(installed, prereleases=True):
        return [f"{req.name} {installed} is outside {req.specifier}"]
    return []


def _extras_lines() -> list[str]:
    from importlib.metadata import PackageNotFoundError

    try:
        extras = _extra_requirements()
    except PackageNotFoundError:
        return ["            extras: unknown (cscvision is not installed; pip install -e .)"]
    lines = []
    for extra, reqs in extras.items():
        what = EXTRA_FEATURES.get(extra) or ", ".join(r.name for r in reqs)
        missing = [m for r in reqs for m in _missing(r, extras)]
        if missing:
            lines.append(
                f"{'extra ' + extra:>18}: unavailable: {what} ({'; '.join(missing)}); "
                f'pip install "cscvision[{extra}]"'
            )
        else:
            lines.append(f"{'extra ' + extra:>18}: installed: {what}")
    return lines


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
    print("\n".join(_extras_lines()))
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

"""Peak memory of ``cscvision export spatialdata`` on a big synthetic slide.

Writes (once, into ``--workdir``) a ``--size`` x ``--size`` JPEG-tiled pyramidal TIFF at
0.25 µm/px (256 px tiles, levels 1, 1/4, 1/16, 1/64) whose tissue is a disc over the middle
(white around it, as on a real slide; the texture of ``cscvision.testing.texture_tile_fn``),
and an outputs folder for it as ``cscvision infer`` lays it out (``summary.json``,
``tiles.csv``, ``maps.npz``: 448 px tiles over the disc, seeded random scores; the export
reads nothing else). Then runs ``cscvision export spatialdata`` once per ``--image`` mode in
a child process under ``/usr/bin/time -v`` and prints its peak resident memory (the
kernel's count, not the tool's), its wall time and the size of the zarr, which it deletes.

    nice -n 5 .venv/bin/python scripts/bench_export_memory.py [--size 40000]
        [--image full thumbnail] [--workdir /tmp/cscvision_export_bench]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cscvision.outputs.slide_folder import write_npz
from cscvision.testing import texture_tile_fn, write_pyramid

MPP = 0.25
TILE_L0 = 448  # 224 px at 0.5 µm/px
MAP_PX_L0 = 448


def disc_tile_fn(size: int):
    texture = texture_tile_fn(seed=3)

    def draw(level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = 4**level
        rgb = texture(level, x, y, w, h)
        yy, xx = np.mgrid[y : y + h, x : x + w]
        r = size / ds * 0.4
        c = size / ds / 2
        rgb[(xx - c) ** 2 + (yy - c) ** 2 > r * r] = 255
        return rgb

    return draw


def write_outputs(slide: Path, folder: Path, size: int) -> int:
    """A cscvision-infer-like folder for ``slide``; returns the number of tiles."""
    folder.mkdir(parents=True, exist_ok=True)
    n = size // MAP_PX_L0
    centres = (np.arange(n) + 0.5) * MAP_PX_L0
    inside = (centres[None, :] - size / 2) ** 2 + (centres[:, None] - size / 2) ** 2
    inside = inside < (0.38 * size) ** 2
    rows, cols = np.nonzero(inside)
    rng = np.random.default_rng(0)
    probs = rng.random((len(rows), 2))
    maps = np.full((2, n, n), np.nan, np.float32)
    maps[:, rows, cols] = probs.T
    lines = ["x,y,tissue,prob_stemness,prob_immunosuppressive"]
    lines += [
        f"{c * MAP_PX_L0},{r * MAP_PX_L0},1.0,{a:.6f},{b:.6f}"
        for r, c, (a, b) in zip(rows, cols, probs, strict=True)
    ]
    (folder / "tiles.csv").write_text("\n".join(lines) + "\n")
    write_npz(
        folder / "maps.npz",
        {
            "stemness": maps[0],
            "immunosuppressive": maps[1],
            "tissue": inside.astype(np.float32),
            "transform": np.array([0.0, 0.0, MAP_PX_L0]),
            "targets": np.array(["stemness", "immunosuppressive"]),
            "slide_mpp": np.float64(MPP),
        },
    )
    summary = {
        "slide_id": "BIG",
        "slide_path": str(slide.resolve()),
        "settings": {"slide_mpp_override": None},
        "resolution": {"slide_mpp": MPP, "tile_l0": TILE_L0, "map_px_l0": MAP_PX_L0},
        "dimensions": [size, size],
        "n_tiles": len(rows),
        "model": {"name": "synthetic scores (benchmark)"},
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return len(rows)


def peak_of(command: list[str]) -> tuple[float, float, str]:
    """Peak RSS (MiB) and wall seconds of ``command``, from GNU time."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return kb / 1024, seconds, done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=40_000)
    parser.add_argument("--image", nargs="+", default=["full", "thumbnail"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cscvision_export_bench"))
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    slide = work / f"big_{args.size}.tiff"
    if not slide.exists():
        start = time.perf_counter()
        write_pyramid(
            slide,
            disc_tile_fn(args.size),
            size=(args.size, args.size),
            mpp=MPP,
            levels=4,
            downsample=4,
        )
        print(f"slide: {slide} ({slide.stat().st_size / 2**20:.0f} MiB, "
              f"{time.perf_counter() - start:.0f} s to write)")  # fmt: skip
    n = write_outputs(slide, work / "infer" / "BIG", args.size)
    print(f"outputs: {n} tiles of {TILE_L0} px over a {args.size} x {args.size} px slide")
    cli = str(Path(sys.executable).with_name("cscvision"))
    for mode in args.image:
        zarr = work / f"export_{mode}.zarr"
        shutil.rmtree(zarr, ignore_errors=True)
        command = [cli, "export", "spatialdata", str(work / "infer"), "--out", str(zarr)]
        peak, seconds, _ = peak_of([*command, "--image", mode])
        size = sum(p.stat().st_size for p in zarr.rglob("*") if p.is_file())
        print(f"export spatialdata --image {mode:9s}: peak RSS {peak:,.0f} MiB, "
              f"{seconds:.0f} s, zarr {size / 2**20:,.0f} MiB")  # fmt: skip
        shutil.rmtree(zarr, ignore_errors=True)


if __name__ == "__main__":
    main()

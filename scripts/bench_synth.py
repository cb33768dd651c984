"""Benchmark the synthetic slide writer: seconds per slide and peak memory, one process.

    .venv/bin/python scripts/bench_synth.py --size 16384 --slides 1
    .venv/bin/python scripts/bench_synth.py --size 4096 --slides 8   # the README demo

Runs single-threaded (set before numpy loads); writes into a temporary folder that is
removed afterwards unless --keep is given.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from cscvision.synth import write_slide  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16384, help="slide side, level-0 px")
    parser.add_argument("--slides", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality", type=int, default=85)
    parser.add_argument("--keep", type=Path, default=None, help="write here and keep the files")
    args = parser.parse_args(argv)
    out = args.keep or Path(tempfile.mkdtemp(prefix="bench_synth_"))
    out.mkdir(parents=True, exist_ok=True)
    times, sizes = [], []
    try:
        for i in range(args.slides):
            t0 = time.perf_counter()
            truth = write_slide(
                out / f"bench_{i:02d}.tiff",
                size_px=args.size,
                seed=args.seed + i,
                quality=args.quality,
            )
            times.append(time.perf_counter() - t0)
            sizes.append(truth.slide_path.stat().st_size)
            print(
                f"slide {i}: {args.size}x{args.size} px in {times[-1]:.2f} s, "
                f"{sizes[-1] / 2**20:.1f} MiB, tissue {truth.tissue_um2 / 1e6:.1f} mm²",
                flush=True,
            )
    finally:
        if args.keep is None:
            shutil.rmtree(out, ignore_errors=True)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    mpx = args.size**2 / 1e6
    print(
        f"{args.slides} slide(s) of {args.size}² px: {sum(times):.2f} s total, "
        f"{sum(times) / len(times):.2f} s/slide ({mpx * len(times) / sum(times):.1f} Mpx/s), "
        f"peak RSS {peak_mib:.0f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory of the cross-fitted OOD reference's out-of-fold scoring against the number
of training slides: streamed (``held_out_scores`` reading a generator, as
``calibrate_on_slides`` reads the slides) and, for comparison, every slide's features held
at once (a list, as before the reference streamed).

Each training slide is a synthetic feature array (``--tiles`` × ``--dim`` float32, made
when the generator is asked for it, as a slide read); the fit features, those the record
is fitted on, are ``--fit-tiles`` in all whatever the slide count, so only the slides
read grow with it. Each configuration runs in a fresh process; printed per row: the
tracemalloc peak (NumPy arrays; torch's own buffers are not traced) and the growth of the
peak RSS (everything) during the call, in MiB.

    nice -n 5 .venv/bin/python scripts/ood_stream_memory.py

How it could fool you: RSS depends on the allocator reusing freed memory (glibc's; before
``ood_scores_of`` copied its scores out of torch's buffer, the kept score buffers
fragmented the heap and the streamed RSS grew by about a slide per slide); the tracemalloc
column does not, but misses torch's temporaries (a few slide-sized buffers). The slides
are random arrays, not features read from slides (``_slide_features`` adds its batches).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tracemalloc

import numpy as np


def measure(slides: int, mode: str, tiles: int, dim: int, fit_tiles: int) -> dict:
    from cscvision.training.ood import held_out_scores

    rng = np.random.default_rng(0)
    patients = [f"P{i // 2:03d}" for i in range(slides)]  # two slides a patient
    fit = [rng.normal(0, 1, (fit_tiles // slides, dim)) for _ in range(slides)]

    def read():
        for i in range(slides):
            yield np.random.default_rng(i + 1).normal(0, 1, (tiles, dim)).astype(np.float32)

    small = [rng.normal(0, 1, (30, dim)) for _ in range(2)]
    held_out_scores(small, ["a", "b"])  # lazy imports and first-call buffers, not measured
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    score = read() if mode == "streamed" else list(read())
    scores = held_out_scores(fit, patients, score=score)
    peak = tracemalloc.get_traced_memory()[1]
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert len(scores) == slides and all(len(s) == tiles for s in scores)
    return {"traced": peak / 2**20, "rss": (rss1 - rss0) / 2**10}  # ru_maxrss is KiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slides", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--tiles", type=int, default=4000, help="tissue tiles per training slide")
    p.add_argument("--dim", type=int, default=512, help="feature dimension")
    p.add_argument("--fit-tiles", type=int, default=2000, help="fit features, all slides")
    p.add_argument("--one", nargs=2, metavar=("SLIDES", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    sizes = (args.tiles, args.dim, args.fit_tiles)
    if args.one:
        print(json.dumps(measure(int(args.one[0]), args.one[1], *sizes)))
        return
    one_slide = args.tiles * args.dim * 4 / 2**20
    print(f"one slide's features: {args.tiles} x {args.dim} float32 = {one_slide:.1f} MiB; "
          f"fit features {args.fit_tiles} tiles in all")  # fmt: skip
    print(f"{'slides':>6}  {'mode':9s}  {'traced peak MiB':>15}  {'RSS growth MiB':>14}")
    for n in args.slides:
        for mode in ("streamed", "in-memory"):
            cmd = [sys.executable, __file__, "--one", str(n), mode, "--tiles", str(args.tiles),
                   "--dim", str(args.dim), "--fit-tiles", str(args.fit_tiles)]  # fmt: skip
            row = json.loads(subprocess.run(cmd, check=True, capture_output=True).stdout)
            print(f"{n:>6}  {mode:9s}  {row['traced']:>15.1f}  {row['rss']:>14.1f}")


if __name__ == "__main__":
    main()

"""Idle gap of the model between slides in an ``infer`` batch, with and without prefetch.

Writes ``--slides`` synthetic JPEG pyramids (H&E-like texture, 0.5 µm/px) and a randomly
initialised model, then runs the batch path of ``cscvision infer`` (``infer_job`` per
slide: tissue, grid, reading, scoring, stitching, writing every output) twice: with
:class:`~cscvision.inference.prefetch.NextSlide` preparing the next slide while the model
scores the current one, and without. The model's calls are timed; the gap is the time
from the end of a slide's last batch to the start of the next slide's first batch, when
the device has nothing to do. Synthetic data only.

    .venv/bin/python scripts/bench_prefetch.py [--slides 4] [--size 4096] [--threads 1]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cscvision.inference import predict
from cscvision.inference.batch import infer_job, prepare_job
from cscvision.inference.prefetch import NextSlide
from cscvision.inference.settings import InferSettings
from cscvision.models.backbones import get_model
from cscvision.models.export import LoadedModel, ModelCard, export_model, load_model
from cscvision.outputs.slide_folder import model_identity
from cscvision.slides.batch import SlideJob
from cscvision.testing import texture_tile_fn, write_pyramid

CALLS: list[tuple[float, float]] = []


def timed_scorer_calls() -> None:
    """Record (start, end) of every TileScorer call (the model's busy periods)."""
    call = predict.TileScorer.__call__

    def timed(self, image):
        start = time.perf_counter()
        out = call(self, image)
        CALLS.append((start, time.perf_counter()))
        return out

    predict.TileScorer.__call__ = timed


def make_model(tile_px: int, backbone: str, folder: Path) -> LoadedModel:
    card = ModelCard(
        name="random",
        backbone=backbone,
        tile_px=tile_px,
        mpp=0.5,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        colors={"stemness": (230, 60, 40), "immunosuppressive": (40, 120, 230)},
        thresholds={"stemness": 0.5, "immunosuppressive": 0.5},
    )
    torch.manual_seed(0)
    return load_model(export_model(get_model(backbone, 2), card, folder / "model"))


def run(jobs, model, out: Path, settings: InferSettings) -> list[float]:
    """Gaps (s) between consecutive slides' scoring, one run of the batch."""
    info = model_identity(model)
    spans = []
    ahead = jobs if settings.prefetch else []
    with NextSlide(ahead, lambda job: prepare_job(job, model, settings)) as nxt:
        for job in jobs:
            CALLS.clear()
            infer_job(job, model, out, settings, model_info=info, device=torch.device("cpu"),
                      prefetch=nxt if settings.prefetch else None)  # fmt: skip
            spans.append((CALLS[0][0], CALLS[-1][1]))
    return [b[0] - a[1] for a, b in itertools.pairwise(spans)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slides", type=int, default=4)
    p.add_argument("--size", type=int, default=4096, help="slide side, px at 0.5 µm/px")
    p.add_argument("--backbone", default="small_cnn")
    p.add_argument("--tile-px", type=int, default=224)
    p.add_argument("--threads", type=int, default=1, help="torch threads for the model")
    p.add_argument("--workers", type=int, default=1, help="reader threads")
    p.add_argument("--rounds", type=int, default=2, help="alternating runs of each")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    timed_scorer_calls()
    with tempfile.TemporaryDirectory(prefix="cscvision-prefetch-") as tmp:
        model = make_model(args.tile_px, args.backbone, Path(tmp))
        jobs = []
        for i in range(args.slides):
            path = Path(tmp) / f"s{i}.tif"
            write_pyramid(path, texture_tile_fn(seed=i), size=(args.size, args.size), levels=3)
            jobs.append(SlideJob(slide_path=path, slide_id=f"s{i}"))
        rows = {}
        for prefetch in (False, True) * args.rounds:  # alternate: a noisy machine
            settings = InferSettings(workers=args.workers, prefetch=prefetch)
            out = Path(tmp) / f"out_{prefetch}_{len(rows)}"
            rows.setdefault(prefetch, []).extend(run(jobs, model, out, settings))
    print(f"\n{args.slides} slides of {args.size}² px, {args.backbone} at {args.tile_px} px,"
          f" {args.threads} model thread(s), {args.workers} reader thread(s)")  # fmt: skip
    for prefetch, gaps in rows.items():
        label = "with prefetch   " if prefetch else "without prefetch"
        print(f"{label}: model idle between slides median {statistics.median(gaps):.3f} s "
              f"(min {min(gaps):.3f}, max {max(gaps):.3f}, {len(gaps)} gaps)")  # fmt: skip


if __name__ == "__main__":
    main()

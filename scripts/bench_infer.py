"""Inference throughput and memory: end to end (``predict_slide``) against the model alone.

Writes two synthetic pyramidal JPEG TIFF slides (0.5 µm/px, H&E-like texture on a disc of
tissue), the second with 4x the area, and exports a randomly initialised model. Then:

* model alone: ``TileScorer`` (the exact normalise → net → sigmoid path inference uses)
  on in-memory uint8 batches, tiles/s;
* end to end: ``predict_slide`` on the first slide (tissue detection, grid, reading,
  decoding, scoring, stitching), tiles/s, with 0 and ``--workers`` reader processes;
  ratio = end-to-end tiles/s over the model alone (target ≥ 0.9);
* peak memory: ``predict_slide`` + ``write_slide_outputs`` on each slide in a fresh
  subprocess (``ru_maxrss`` of the process and of its reader workers), to show memory
  does not grow with slide size beyond the maps.

    .venv/bin/python scripts/bench_infer.py --backbone small_cnn --amp
    .venv/bin/python scripts/bench_infer.py --backbone resnet18 --amp --size 6144
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cscvision.inference.predict import TileScorer, cpu_supports_bf16, predict_slide, resolve_device
from cscvision.models.backbones import get_model
from cscvision.models.export import ModelCard, export_model, load_model
from cscvision.outputs.slide_folder import write_slide_outputs
from cscvision.testing import texture_tile_fn, write_pyramid


def disc_tile_fn(size_px: int, seed: int = 0):
    """Texture inside a centred disc (radius 0.45 of the side), white glass outside."""
    texture = texture_tile_fn(seed)

    def draw(level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        rgb = texture(level, x, y, w, h).copy()
        scale = 2**level
        yy, xx = np.mgrid[y : y + h, x : x + w] * scale
        centre, radius = size_px / 2, 0.45 * size_px
        rgb[(xx - centre) ** 2 + (yy - centre) ** 2 > radius**2] = 243
        return rgb

    return draw


def make_slide(path: Path, size_px: int) -> Path:
    if not path.exists():
        levels = max(1, int(np.log2(size_px / 512)) + 1)  # down to ~512 px
        write_pyramid(path, disc_tile_fn(size_px), size=(size_px, size_px), levels=levels)
    return path


def model_alone(model, *, batch_size: int, device: str, amp: bool, seconds: float) -> float:
    """Tiles/s of the scorer on in-memory uint8 tiles (after a warm-up batch)."""
    scorer = TileScorer(model, device=device, amp=amp)
    side = model.card.tile_px
    g = torch.Generator().manual_seed(0)
    nhwc = torch.randint(0, 256, (batch_size, side, side, 3), dtype=torch.uint8, generator=g)
    image = nhwc.permute(0, 3, 1, 2)  # as the reader delivers it: channels-last uint8
    scorer(image)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        scorer(image)
        count += batch_size
    if scorer.device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def end_to_end(model, slide: Path, **kw) -> tuple[float, float, int]:
    """(tiles/s reading + scoring, tiles/s including tissue detection and stitching, n)."""
    pred = predict_slide(slide, model, progress=False, **kw)
    n = len(pred.grid)
    return n / pred.predict_seconds, n / pred.seconds, n


def memory_child(args: argparse.Namespace) -> None:
    """Run in a fresh process: predict + write one slide, print peak RSS as JSON."""
    model = load_model(args.model_dir, resolve_device(args.device))
    with tempfile.TemporaryDirectory() as out:
        pred = predict_slide(
            args.child_slide,
            model,
            batch_size=args.batch_size,
            workers=args.workers,
            reader=args.reader,
            device=args.device,
            amp=args.amp,
            progress=False,
        )
        write_slide_outputs(pred, Path(out) / pred.slide_id, model.card)
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    maps_mb = (pred.maps.nbytes + pred.tissue_map.nbytes) / 2**20
    print(json.dumps({"self_mb": self_kb / 1024, "workers_mb": workers_kb / 1024,
                      "maps_mb": maps_mb, "n_tiles": len(pred.grid)}))  # fmt: skip


def peak_memory(args: argparse.Namespace, slide: Path, model_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "--child-slide", str(slide), "--model-dir", str(model_dir),
           "--batch-size", str(args.batch_size), "--workers", str(args.workers),
           "--reader", args.reader,
           "--device", args.device, *(["--amp"] if args.amp else [])]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="small_cnn")
    p.add_argument("--tile-px", type=int, default=224)
    p.add_argument("--size", type=int, default=8192, help="side of the smaller slide, px")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--reader", default="threads", help="reader of the memory runs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--seconds", type=float, default=10.0, help="model-alone timing length")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cscvision_bench")
    p.add_argument("--skip-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--child-slide", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_slide:
        return memory_child(args)
    args.work.mkdir(parents=True, exist_ok=True)
    small = make_slide(args.work / f"bench_{args.size}.tif", args.size)
    large = (
        None
        if args.skip_memory
        else make_slide(args.work / f"bench_{2 * args.size}.tif", 2 * args.size)
    )
    card = ModelCard(name=f"bench-{args.backbone}", backbone=args.backbone, tile_px=args.tile_px)
    torch.manual_seed(0)
    model_dir = export_model(get_model(args.backbone, 2), card, args.work / args.backbone)
    model = load_model(model_dir, resolve_device(args.device))
    kw = dict(batch_size=args.batch_size, device=args.device, amp=args.amp)

    # Warm-up (kernels, CPU clocks, page cache); the model alone is timed before and after
    # the end-to-end runs and the faster figure is the baseline.
    model_alone(model, seconds=min(2.0, args.seconds), **kw)
    end_to_end(model, small, workers=args.workers, **kw)
    alone_before = model_alone(model, seconds=args.seconds, **kw)
    rows = []
    for workers, reader in (
        (0, "processes"),
        (args.workers, "processes"),
        (args.workers, "threads"),
    ):
        core, full, n = end_to_end(model, small, workers=workers, reader=reader, **kw)
        name = f"predict_slide, {workers} {reader}" if workers else "predict_slide, in-process"
        rows.append((name, n, core, full))
    alone_after = model_alone(model, seconds=args.seconds, **kw)
    alone = max(alone_before, alone_after)
    memory = {} if large is None else {s: peak_memory(args, s, model_dir) for s in (small, large)}

    amp = "off" if not args.amp else ("bf16" if cpu_supports_bf16() else "on")
    print(f"\n{args.backbone}, {args.tile_px} px tiles, batch {args.batch_size}, device "
          f"{args.device}, amp {amp}, torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"{'path':<32}{'tiles':>7}{'tiles/s':>10}{'with setup':>12}{'of model':>10}")
    print(f"{'model alone (in memory)':<32}{'':>7}{alone:>10.1f}{'':>12}{'100 %':>10}")
    print(f"{'  (before / after the runs)':<32}{'':>7}{alone_before:>10.1f}{alone_after:>12.1f}")
    for name, n, core, full in rows:
        print(f"{name:<32}{n:>7}{core:>10.1f}{full:>12.1f}{core / alone:>9.0%} ")
    if not memory:
        return
    head = f"peak memory ({args.reader})"
    print(f"\n{head:<32}{'tiles':>7}{'main MB':>10}{'workers MB':>12}{'maps MB':>10}")
    for slide, m in memory.items():
        name = f"{slide.stem} ({slide.stat().st_size / 2**20:.0f} MB file)"
        print(f"{name:<32}{m['n_tiles']:>7}{m['self_mb']:>10.0f}{m['workers_mb']:>12.0f}"
              f"{m['maps_mb']:>10.2f}")  # fmt: skip


if __name__ == "__main__":
    main()

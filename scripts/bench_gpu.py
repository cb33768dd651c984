"""GPU throughput in one short run: model alone vs end to end, CPU vs GPU JPEG decoding.

For ResNet-18 (224 px, bf16 autocast, batch 256) and ViT-L/16 at 224 px (UNI's shape; timm
``vit_large_patch16_224``, random weights, a 2-output head), prints tiles/s of:

* model alone: ``TileScorer`` (normalise → net → sigmoid, channels-last, bf16 autocast, the
  same batch) on uint8 batches already on the GPU;
* end to end ``--decode cpu``: ``predict_tiles`` over a synthetic slide's tissue grid
  (reader threads decode on the CPU fast path, pinned batches, model on the GPU);
* end to end ``--decode gpu``: the same with stored JPEG tiles decoded in batches on the
  GPU (:mod:`cscvision.slides.gpudecode`);

with each end-to-end figure's ratio to the model alone, GPU decoding alone (tiles/s), peak
GPU memory per phase, and the GPU-decoded tiles against the CPU path (mean and max |Δ| per
channel). Phases stop at ``--time-limit`` seconds in all; what ran is printed. Without a
CUDA device it says so and exits 0, measuring nothing. Synthetic slide, random weights.

    .venv/bin/python scripts/bench_gpu.py [--size 24576] [--readers 12] [--time-limit 240]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

NO_CUDA = "bench_gpu.py: no CUDA device visible; nothing measured (run it on a GPU machine)"


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def hard_stop(seconds: float) -> None:
    """Leave, saying so, if a phase overruns the limit by far (a hung device, say)."""

    def stop(*_: object) -> None:
        print(f"bench_gpu.py: stopped after {seconds:.0f} s (--time-limit + 60 s)", flush=True)
        os._exit(3)

    signal.signal(signal.SIGALRM, stop)
    signal.alarm(int(seconds))


def make_slide(path: Path, size_px: int) -> Path:
    """A JPEG pyramid at 0.5 µm/px, H&E-like texture on a disc of tissue."""
    from cscvision.testing import texture_tile_fn, write_pyramid

    texture = texture_tile_fn(0)

    def draw(level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        rgb = texture(level, x, y, w, h).copy()
        yy, xx = np.mgrid[y : y + h, x : x + w] * 4**level
        rgb[(xx - size_px / 2) ** 2 + (yy - size_px / 2) ** 2 > (0.45 * size_px) ** 2] = 243
        return rgb

    return write_pyramid(path, draw, size=(size_px, size_px), mpp=0.5, levels=3, downsample=4)


def make_model(name: str):
    import torch

    from cscvision.models.backbones import get_model
    from cscvision.models.export import LoadedModel, ModelCard

    card = ModelCard(name=name, backbone="resnet18", tile_px=224, mpp=0.5,
                     mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                     colors={"a": (230, 60, 40), "b": (40, 120, 230)},
                     thresholds={"a": 0.5, "b": 0.5})  # fmt: skip
    torch.manual_seed(0)
    if name == "resnet18":
        net = get_model("resnet18", 2)
    else:
        import timm

        net = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=2)
    return LoadedModel(net=net, card=card, path=Path("."))


def model_alone(model, batch: int, seconds: float) -> tuple[float, float]:
    """(tiles/s, peak GiB) of the scorer on uint8 batches already on the GPU."""
    import torch

    from cscvision.inference.predict import TileScorer

    scorer = TileScorer(model, device="cuda", amp=True)
    x = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, device="cuda")
    x = x.permute(0, 3, 1, 2)
    scorer(x)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        scorer(x)  # returns numpy: synchronises each batch, as end to end does
        count += batch
    return count / (time.perf_counter() - start), torch.cuda.max_memory_allocated() / 2**30


def end_to_end(grid, model, batch: int, readers: int, decode: str) -> tuple[float, float]:
    import torch

    from cscvision.inference.predict import predict_tiles

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    predict_tiles(grid, model, batch_size=batch, workers=readers, device="cuda", amp=True,
                  decode=decode, progress=False)  # fmt: skip
    seconds = time.perf_counter() - start
    return len(grid) / seconds, torch.cuda.max_memory_allocated() / 2**30


def decode_alone(slide_path: Path, grid, batch: int) -> tuple[float, float, list[str]]:
    """(tiles/s, peak GiB, equality lines) of GPU decoding + assembly + resize alone."""
    import torch

    from cscvision.slides.gpudecode import DeviceTileReader
    from cscvision.slides.slide import open_slide

    with open_slide(slide_path) as slide:
        reader = DeviceTileReader.open(str(slide_path), slide.info, torch.device("cuda"))
        if reader is None:
            return float("nan"), float("nan"), ["GPU decoder declined the slide"]
        xy = grid.xy_l0
        reader.read(xy[:batch], grid.plan)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for first in range(0, len(xy), batch):
            reader.read(xy[first : first + batch], grid.plan)
        torch.cuda.synchronize()
        rate = len(xy) / (time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**30
        sample = xy[:: max(1, len(xy) // 64)][:64]
        got = reader.read(sample, grid.plan).cpu().numpy().astype(np.int16)
        want = np.stack([slide.read_tile(tuple(map(int, v)), grid.plan) for v in sample])
        reader.close()
    diff = np.abs(got - want.transpose(0, 3, 1, 2).astype(np.int16))
    lines = [f"GPU vs CPU decode, {len(sample)} tiles: mean |Δ| per channel "
             f"{np.round(diff.mean(axis=(0, 2, 3)), 3).tolist()}, max {diff.max()}"]  # fmt: skip
    return rate, peak, lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=24576, help="slide side, px at 0.5 µm/px")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--readers", type=int, default=12, help="reader threads (decode cpu)")
    p.add_argument("--seconds", type=float, default=8.0, help="model-alone timing per model")
    p.add_argument("--time-limit", type=float, default=240.0, help="seconds in all")
    p.add_argument("--models", default="resnet18,vit_large_patch16_224")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    deadline = Deadline(args.time_limit)
    hard_stop(args.time_limit + 60)
    from cscvision.slides.grid import GridSpec, make_grid
    from cscvision.slides.slide import open_slide

    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cscvision-gpu-") as tmp:
        start = time.perf_counter()
        slide_path = make_slide(Path(tmp) / "gpu_bench.tif", args.size)
        with open_slide(slide_path) as slide:
            grid = make_grid(slide, GridSpec(mpp=0.5, tile_px=224))
        written = time.perf_counter() - start
        print(f"slide {args.size}² px, {len(grid)} tissue tiles of 224 px at 0.5 µm/px "
              f"(written in {written:.0f} s); {torch.cuda.get_device_name()}")  # fmt: skip
        rate, peak, lines = decode_alone(slide_path, grid, args.batch_size)
        rows.append(f"{'GPU decode alone':<44} {rate:>9,.0f} tiles/s  peak {peak:5.1f} GiB")
        rows.extend(lines)
        print("\n".join(rows), flush=True)
        rows.clear()
        for name in args.models.split(","):
            if deadline.left() < 3 * args.seconds:
                print(f"{name}: skipped, --time-limit reached")
                continue
            model = make_model(name)
            alone, peak = model_alone(model, args.batch_size, args.seconds)
            rows.append(f"{name + ' model alone':<44} {alone:>9,.0f} tiles/s  peak {peak:5.1f} GiB")
            print(rows[-1], flush=True)
            for decode in ("cpu", "gpu"):
                if deadline.left() < args.seconds:
                    print(f"{name} --decode {decode}: skipped, --time-limit reached")
                    continue
                rate, peak = end_to_end(grid, model, args.batch_size, args.readers, decode)
                label = f"{name} end to end --decode {decode}"
                rows.append(f"{label:<44} {rate:>9,.0f} tiles/s  peak {peak:5.1f} GiB  "
                            f"{rate / alone:.2f} of model alone")  # fmt: skip
                print(rows[-1], flush=True)
            del model
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

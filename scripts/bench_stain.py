"""Stain normalisation on tile batches: tiles/s of each method beside the batch's float
conversion (what every model input costs anyway), measured in the same run; and the
training augmentation presets ``histo`` and ``stain`` (RandStainNA-style L*a*b* jitter).

Tiles are real H&E pixels: 224 px crops of ``../shared/data/cmu_small_region.svs`` at
0.5 µm/px (skipped with a message where the file is absent: then a synthetic H&E tile).
The reference is fitted on the same slide. CPU unless ``--device cuda``.

    .venv/bin/python scripts/bench_stain.py [--batch 64] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from cscvision.slides.slide import open_slide
from cscvision.slides.stain import fit_stain, normalise_batch, sample_tissue_tiles

SVS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cmu_small_region.svs"


def tiles(n: int) -> np.ndarray:
    if not SVS.exists():
        raise SystemExit(f"{SVS} not found: the benchmark reads a real H&E slide")
    with open_slide(SVS) as slide:
        pool = sample_tissue_tiles(slide, mpp=0.5, tile_px=224, n_tiles=n)
    return pool[np.arange(n) % len(pool)]


def rate(fn, batch: torch.Tensor, repeats: int) -> float:
    fn(batch)  # warm-up
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(batch)
        if batch.device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t)
    return len(batch) / statistics.median(seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rgb = tiles(args.batch)
    batch = torch.from_numpy(rgb).permute(0, 3, 1, 2).contiguous().to(args.device)
    floor = rate(lambda b: b.float().div(255.0), batch, args.repeats)
    print(f"{args.batch} tiles of 224 px, {args.device}, {args.threads} thread(s)")
    print(f"{'float conversion (floor)':28s} {floor:10.0f} tiles/s")
    pixels = rgb.reshape(-1, 3)
    for method in ("macenko", "vahadane", "reinhard"):
        ref = fit_stain(pixels, method)
        source = ref if method == "reinhard" else fit_stain(pixels, method)
        tps = rate(lambda b, r=ref, s=source: normalise_batch(b, r, source=s), batch, args.repeats)
        print(f"{method:28s} {tps:10.0f} tiles/s  ({floor / tps:.0f}x the floor's time)")
    from cscvision.training.augment import augment_batch, augment_preset

    unit = batch.float().div(255.0)
    for preset in ("histo", "stain"):
        params = augment_preset(preset)
        tps = rate(lambda b, p=params: augment_batch(b, p), unit, args.repeats)
        print(
            f"{'augment ' + preset:28s} {tps:10.0f} tiles/s  ({floor / tps:.0f}x the floor's time)"
        )


if __name__ == "__main__":
    main()

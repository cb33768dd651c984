"""Feature extraction and head training: end to end against their limits, on the CPU.

1. Extraction, for a ViT-S/16 (``vit_small_patch16_224``, class token) and a ResNet-50
   (average pool), both randomly initialised (speed does not depend on the weights):
   * model alone: :class:`~cscvision.features.extract.FeatureExtractor` (the exact
     normalise → encoder → float16 path extraction uses) on in-memory uint8 batches;
   * end to end: :func:`~cscvision.features.extract.extract_slide` on a synthetic pyramid
     (tissue detection, grid, reading and decoding with reader threads, the encoder, the
     HDF5 store written atomically); ratio = end-to-end tiles/s over the model alone
     (target ≥ 0.9).
2. One training epoch on the same tiles: a linear head on their stored features
   (a :class:`~cscvision.training.lit.TileClassifier` over stored features) against the
   same encoder and head trained end to end from the images (a ``TileClassifier``
   holding an :class:`~cscvision.models.heads.EncoderHead`), both with a Lightning
   ``Trainer`` (fit, one epoch, no validation); ratio = end-to-end / head (target ≥ 50).

    .venv/bin/python scripts/bench_features.py --threads 1 --amp

:func:`gpu_vit_l16_bf16` measures UNI's shape (ViT-L/16, bf16) on a GPU, end to end and
alone with the same precision, batch and memory format, for ``scripts/bench_gpu.py``
(``--gpu`` runs it here).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cscvision.features.extract import ExtractSettings, FeatureExtractor, extract_slide
from cscvision.features.store import read_feature_store
from cscvision.models.encoders import build_encoder
from cscvision.models.registry import ENCODERS, EncoderSpec
from cscvision.testing import texture_tile_fn, write_pyramid

VIT_S16 = dataclasses.replace(
    ENCODERS["uni"], name="vit-s16", timm_name="vit_small_patch16_224",
    timm_kwargs={"num_classes": 0}, dim=384, kind="test",
)  # fmt: skip
RESNET50 = ENCODERS["resnet50"]
VIT_L16 = ENCODERS["uni"]


def make_slide(path: Path, size_px: int) -> Path:
    if not path.exists():
        levels = max(1, int(np.log2(size_px / 512)) + 1)
        write_pyramid(path, texture_tile_fn(0), size=(size_px, size_px), levels=levels)
    return path


def extractor(spec: EncoderSpec, device: str, amp: bool) -> FeatureExtractor:
    torch.manual_seed(0)
    return FeatureExtractor(build_encoder(spec), weights_sha256="bench", device=device, amp=amp)


def model_alone(ex: FeatureExtractor, batch: int, seconds: float) -> float:
    """Tiles/s of the extractor on in-memory uint8 batches (channels-last, as read)."""
    g = torch.Generator().manual_seed(0)
    side = ex.spec.tile_px
    image = torch.randint(0, 255, (batch, side, side, 3), dtype=torch.uint8, generator=g)
    image = image.permute(0, 3, 1, 2)
    ex(image)  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        ex(image)
        n += batch
    if ex.device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def end_to_end(ex: FeatureExtractor, slide: Path, out: Path, settings: ExtractSettings) -> float:
    start = time.perf_counter()
    store = extract_slide(slide, ex, out, settings, progress=False)
    if ex.device.type == "cuda":
        torch.cuda.synchronize()
    return len(store) / (time.perf_counter() - start)


def extraction_rows(args: argparse.Namespace, slide: Path, work: Path) -> list[tuple]:
    rows = []
    settings = ExtractSettings(batch_size=args.batch_size, workers=args.workers, amp=args.amp)
    for spec in (VIT_S16, RESNET50):
        ex = extractor(spec, args.device, args.amp)
        end_to_end(ex, slide, work / "warm.h5", settings)  # warm-up: page cache, kernels
        alone = [model_alone(ex, args.batch_size, args.seconds)]
        e2e = [end_to_end(ex, slide, work / f"{spec.name}.h5", settings)]
        alone.append(model_alone(ex, args.batch_size, args.seconds))
        e2e.append(end_to_end(ex, slide, work / f"{spec.name}.h5", settings))
        rows.append((spec.name, max(alone), max(e2e)))
    return rows


def epoch_seconds(args: argparse.Namespace, slide: Path, store_path: Path) -> tuple[float, float]:
    """One epoch on the tiles of ``store_path``: (head on features, end to end) seconds."""
    import lightning as L

    from cscvision.models.heads import EncoderHead, make_head
    from cscvision.slides.slide import open_slide
    from cscvision.training.data import SlideTiles, TileDataModule
    from cscvision.training.featuredata import FeatureDataModule
    from cscvision.training.lit import TileClassifier

    store = read_feature_store(store_path)
    with open_slide(slide) as s:
        from cscvision.slides.slide import plan_read

        plan = plan_read(s.info, mpp=0.5, tile_px=VIT_S16.tile_px)
    rng = np.random.default_rng(0)
    tiles = SlideTiles(
        "bench", "P0", "train", str(slide), plan, None, store.xy_l0.astype(np.int64),
        rng.random((len(store), 2), dtype=np.float32), np.ones(len(store), np.float32),
    )  # fmt: skip
    slides = {"train": [tiles]}
    kw = dict(targets=("a", "b"), mean=VIT_S16.mean, std=VIT_S16.std, augment="none")

    def fit(module: L.LightningModule, dm: L.LightningDataModule) -> float:
        trainer = L.Trainer(
            max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
            precision="bf16-mixed" if args.amp else "32-true",
        )  # fmt: skip
        start = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        return time.perf_counter() - start

    features = {"bench": store.features}
    bs = args.batch_size
    head_dm = FeatureDataModule(slides=slides, features=features, batch_size=bs)
    head = TileClassifier(
        net=make_head("linear", VIT_S16.dim, 2), backbone="linear", inputs="features", **kw
    )
    head_s = fit(head, head_dm)
    torch.manual_seed(0)
    net = EncoderHead(build_encoder(VIT_S16), make_head("linear", VIT_S16.dim, 2))
    full = TileClassifier(net=net, backbone="vit-s16", channels_last=False, **kw)
    image_dm = TileDataModule(slides=slides, batch_size=bs, num_workers=args.workers)
    return head_s, fit(full, image_dm)


def gpu_vit_l16_bf16(
    slide: Path, out: Path, *, batch_size: int = 256, workers: int = 12, seconds: float = 10.0
) -> dict[str, float]:
    """UNI's shape (ViT-L/16, 224 px) on CUDA with bf16 autocast: end-to-end tiles/s of
    :func:`extract_slide` and the model alone, same precision, batch and memory format."""
    ex = extractor(VIT_L16, "cuda", amp=True)
    settings = ExtractSettings(batch_size=batch_size, workers=workers, amp=True)
    end_to_end(ex, slide, out, settings)
    alone = model_alone(ex, batch_size, seconds)
    e2e = end_to_end(ex, slide, out, settings)
    return {"model_alone": alone, "end_to_end": e2e, "ratio": e2e / alone}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=2048, help="slide side in level-0 pixels")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=1, help="reader threads")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seconds", type=float, default=8.0, help="model-alone timing window")
    p.add_argument("--amp", action="store_true", help="bf16 autocast where the CPU has it")
    p.add_argument("--device", default="cpu")
    p.add_argument("--gpu", action="store_true", help="also run gpu_vit_l16_bf16")
    p.add_argument("--work", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_features_"))
    slide = make_slide(work / f"bench_{args.size}.tif", args.size)
    rows = extraction_rows(args, slide, work)
    head_s, e2e_s = epoch_seconds(args, slide, work / f"{VIT_S16.name}.h5")
    n = len(read_feature_store(work / f"{VIT_S16.name}.h5"))
    print(f"\nCPU, torch threads {args.threads}, batch {args.batch_size}, "
          f"{args.workers} reader thread(s), amp {args.amp}, {n} tiles of 224 px")  # fmt: skip
    print(f"{'encoder':<10}{'model alone':>14}{'end to end':>13}{'ratio':>8}   (tiles/s)")
    for name, alone, e2e in rows:
        print(f"{name:<10}{alone:>14.1f}{e2e:>13.1f}{e2e / alone:>8.2f}")
    print(f"\none epoch on {n} tiles: head on stored features {head_s:.2f} s, "
          f"ViT-S/16 + head end to end {e2e_s:.1f} s: {e2e_s / head_s:.0f}x faster")  # fmt: skip
    if args.gpu:
        print("ViT-L/16 bf16 on CUDA:", gpu_vit_l16_bf16(slide, work / "vit_l16.h5"))


if __name__ == "__main__":
    main()

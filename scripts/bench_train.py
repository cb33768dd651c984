"""Training throughput with real slide reading vs the same model on in-memory batches.

    .venv/bin/python scripts/bench_train.py [--cohort CSV] [--mpp 2.0 --tile-px 64]

Without ``--cohort`` a synthetic cohort is written to a temporary folder first. Both runs
use the same LightningModule (augmentation, normalisation, loss, AdamW step) and Trainer
settings; the first reads tiles from the slides through the DataLoader (``--workers``
processes, whole batches per worker call), the second replays batches held in memory.
The ratio says how much of the model's speed survives real data loading (goal ≥ 0.8).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from cscvision.labels.annotations import ClassMap
from cscvision.labels.cohort import read_cohort, split_by_patient
from cscvision.slides.grid import GridSpec
from cscvision.training.data import TileDataModule, prepare_cohort
from cscvision.training.lit import TileClassifier
from cscvision.training.train import resolve_precision

CLASSES = {
    "targets": {"stemness": ["Stemness-rich"], "immunosuppressive": ["Immunosuppressive"]},
    "ignore": ["Tumor", "Necrosis"],
    "exclude": ["Pen mark", "Fold", "Bubble", "Out of focus"],
}


class Throughput(L.Callback):
    """Tiles per second over the training batches after ``warmup``."""

    def __init__(self, warmup: int):
        self.warmup, self.tiles, self.start, self.end = warmup, 0, 0.0, 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step > self.warmup:
            self.tiles += len(batch["image"])
            self.end = time.perf_counter()

    @property
    def rate(self) -> float:
        return self.tiles / max(self.end - self.start, 1e-9)


class InMemory(Dataset):
    """Batches collected once, replayed: the same tensors without any reading."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.batches[i]


def fit_rate(loader: DataLoader, args: argparse.Namespace, precision: str) -> float:
    L.seed_everything(0, verbose=False)
    module = TileClassifier(backbone=args.backbone, augment=args.augment)
    meter = Throughput(args.warmup)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.warmup + args.steps,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[meter],
    )
    trainer.fit(module, train_dataloaders=loader)
    return meter.rate


def make_cohort(folder: Path, slides: int, size_px: int) -> Path:
    from cscvision.synth import write_cohort

    print(f"writing a synthetic cohort of {slides} slides of {size_px} px to {folder} ...")
    return write_cohort(
        folder, n_slides=slides, n_patients=slides, size_px=size_px, seed=0, workers=2
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort", type=Path, help="cohort CSV (default: write a synthetic one)")
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--size", type=int, default=4096, help="synthetic slide side, px")
    parser.add_argument("--mpp", type=float, default=2.0)
    parser.add_argument("--tile-px", type=int, default=64)
    parser.add_argument("--backbone", default="small_cnn")
    parser.add_argument("--augment", default="histo")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5, help="steps not timed")
    parser.add_argument("--steps", type=int, default=40, help="steps timed")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the training process (default 1, as configs/cpu_demo.yaml: "
        "on 2 shared cores 2 threads stall when the workers or other programs run; 0 = all)",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("cscvision").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        csv = args.cohort or make_cohort(Path(tmp), args.slides, args.size)
        entries = read_cohort(csv)
        splits = {sid: "train" for sid in split_by_patient(entries)}
        splits[entries[-1].slide_id] = "val"  # prepare_cohort wants a validation slide
        spec = GridSpec(mpp=args.mpp, tile_px=args.tile_px)
        tiles = prepare_cohort(
            entries,
            splits,
            spec=spec,
            class_map=ClassMap.from_dict(CLASSES),
            cache_dir=Path(tmp) / "cache",
            progress=False,
        )
        dm = TileDataModule(slides=tiles, batch_size=args.batch_size, num_workers=args.workers)
        n_tiles = len(dm.datasets["train"])
        n_batches = args.warmup + args.steps
        print(
            f"{n_tiles} training tiles of {args.tile_px} px at {args.mpp} µm/px; "
            f"{args.backbone}, batch {args.batch_size}, {torch.get_num_threads()} threads"
        )
        if n_tiles < n_batches * args.batch_size:
            print(f"note: fewer tiles than {n_batches} batches; epochs repeat")
        precision = resolve_precision(args.precision, "cpu")

        start = time.perf_counter()
        reading = sum(
            len(b["image"]) for _, b in zip(range(20), dm.train_dataloader(), strict=False)
        )
        read_rate = reading / (time.perf_counter() - start)
        batches = [b for _, b in zip(range(n_batches), dm.train_dataloader(), strict=False)]
        in_memory = DataLoader(InMemory(batches), batch_size=None)
        real, memory = [], []
        for _ in range(args.repeats):  # alternate, so load from elsewhere hits both alike
            real.append(fit_rate(dm.train_dataloader(), args, precision))
            memory.append(fit_rate(in_memory, args, precision))
    print(f"precision {precision}; each rate the best of {args.repeats} alternating runs")
    print(f"  real: {[round(r) for r in real]}, in-memory: {[round(r) for r in memory]}")
    real, memory = max(real), max(memory)
    print(f"reading only ({args.workers} workers): {read_rate:8.0f} tiles/s (incl. start-up)")
    print(f"training, real data loading:      {real:8.0f} tiles/s")
    print(f"training, in-memory tensors:       {memory:8.0f} tiles/s")
    print(f"ratio real / in-memory:            {real / memory:8.2f}")


if __name__ == "__main__":
    main()

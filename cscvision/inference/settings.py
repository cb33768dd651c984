"""How a batch of slides is scored (the ``cscvision infer`` flags), without importing torch."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cscvision.slides.info import ON_CORRUPT_TILE
from cscvision.slides.tissue import DEFAULT_MASK_MPP

READERS = ("processes", "threads")
DECODERS = ("auto", "cpu", "gpu")
MAX_OVERLAP = 0.75
MAX_WITHIN_UM = 10_000.0
MAX_PERMUTATIONS = 9_999


@dataclass(frozen=True)
class InferSettings:
    """How every slide of a batch is scored (the ``cscvision infer`` flags)."""

    overlap: float = 0.0
    batch_size: int = 64
    workers: int = 2
    reader: str = "threads"
    amp: bool = False
    min_tissue: float = 0.5
    mask_mpp: float = DEFAULT_MASK_MPP
    decode: str = "cpu"  # where stored JPEG tiles are decoded: cpu, gpu, auto
    prefetch: bool = True  # prepare the next slide while the model scores this one
    on_corrupt_tile: str = "fail"  # or "skip": drop undecodable tiles, list them in the summary
    within_um: float = 100.0  # radius of the co-localisation figures
    permutations: int = 199  # rigid moves in the null of each co-localisation figure
    asap_target: str | None = None  # also write this target as <slide>_likelihood_map.tif

    def check(self) -> None:
        """Raise ``ValueError`` naming the flag that is out of range."""
        if not 0 <= self.overlap <= MAX_OVERLAP:
            raise ValueError(f"--overlap {self.overlap}: choose a value from 0 to {MAX_OVERLAP}")
        if self.batch_size < 1 or self.workers < 0:
            raise ValueError("--batch-size must be ≥ 1 and --workers ≥ 0")
        if not math.isfinite(self.within_um) or not 0 <= self.within_um <= MAX_WITHIN_UM:
            raise ValueError(f"--within-um {self.within_um}: choose 0 to {MAX_WITHIN_UM:g} µm")
        if not 0 <= self.permutations <= MAX_PERMUTATIONS:
            raise ValueError(
                f"--permutations {self.permutations}: choose 0 (no null) to {MAX_PERMUTATIONS}"
            )
        if self.reader not in READERS:
            raise ValueError(f"--reader {self.reader!r}: choose one of {READERS}")
        if self.decode not in DECODERS:
            raise ValueError(f"--decode {self.decode!r}: choose one of {DECODERS}")
        if self.on_corrupt_tile not in ON_CORRUPT_TILE:
            raise ValueError(
                f"--on-corrupt-tile {self.on_corrupt_tile!r}: choose one of {ON_CORRUPT_TILE}"
            )

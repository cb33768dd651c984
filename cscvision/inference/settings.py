"""How a batch of slides is scored (the ``cscvision infer`` flags), without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from cscvision.slides.tissue import DEFAULT_MASK_MPP

READERS = ("processes", "threads")
DECODERS = ("auto", "cpu", "gpu")
MAX_OVERLAP = 0.75


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

    def check(self) -> None:
        """Raise ``ValueError`` naming the flag that is out of range."""
        if not 0 <= self.overlap <= MAX_OVERLAP:
            raise ValueError(f"--overlap {self.overlap}: choose a value from 0 to {MAX_OVERLAP}")
        if self.batch_size < 1 or self.workers < 0:
            raise ValueError("--batch-size must be ≥ 1 and --workers ≥ 0")
        if self.reader not in READERS:
            raise ValueError(f"--reader {self.reader!r}: choose one of {READERS}")
        if self.decode not in DECODERS:
            raise ValueError(f"--decode {self.decode!r}: choose one of {DECODERS}")

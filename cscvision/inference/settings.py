"""How a batch of slides is scored (the ``cscvision infer`` flags), without importing torch.

A validated schema (pydantic): a value out of range is refused when the settings are made,
before any slide is read, with the flag's name (:func:`cscvision.core.validate.check_flags`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from cscvision.core.validate import FLAG_CONFIG
from cscvision.slides.tissue import DEFAULT_MASK_MPP

READERS = ("processes", "threads")
MAX_OVERLAP = 0.75
MASK_MPP_RANGE = (1.0, 100.0)  # tissue thumbnails: never level 0, never a few pixels
MAX_WITHIN_UM = 10_000.0
MAX_PERMUTATIONS = 9_999
UNCERTAINTY_HELP = (
    "per-tile uncertainty: mc:N (N forward passes with dropout active, so N times the "
    "model's cost, plus one pass for the OOD score) or tta (the 8 flips/rotations: 8 "
    "passes); writes std_<target> and mi_<target> (mutual information) columns, maps, "
    "overlays and TIFFs; the score becomes the mean of the passes"
)


@dataclass(frozen=True, config=FLAG_CONFIG)
class InferSettings:
    """How every slide of a batch is scored (the ``cscvision infer`` flags); a dataclass
    checked by pydantic when made."""

    overlap: float = Field(0.0, ge=0, le=MAX_OVERLAP)
    batch_size: int = Field(64, ge=1, le=65536)
    workers: int = Field(2, ge=0, le=256)
    reader: Literal["processes", "threads"] = "threads"
    amp: bool = False
    min_tissue: float = Field(0.5, ge=0, le=1)
    mask_mpp: float = Field(DEFAULT_MASK_MPP, ge=MASK_MPP_RANGE[0], le=MASK_MPP_RANGE[1])
    decode: Literal["auto", "cpu", "gpu"] = "cpu"  # where stored JPEG tiles are decoded
    prefetch: bool = True  # prepare the next slide while the model scores this one
    # "skip": drop undecodable tiles, list them in the summary (slides.info.ON_CORRUPT_TILE)
    on_corrupt_tile: Literal["fail", "skip"] = "fail"
    within_um: float = Field(100.0, ge=0, le=MAX_WITHIN_UM)  # co-localisation radius
    permutations: int = Field(199, ge=0, le=MAX_PERMUTATIONS)  # rigid moves in each null
    asap_target: str | None = None  # also write this target as <slide>_likelihood_map.tif
    # per-tile uncertainty (inference.uncertainty): "mc:N" or "tta"; None: none
    uncertainty: str | None = Field(None, pattern=r"^(mc:\d+|tta)$")

    def check(self) -> None:
        """Kept for callers of the dataclass version: the values were checked when made."""

"""How a batch of slides is scored (the ``cscvision infer`` flags), without importing torch.

:class:`InferSettings` is the read settings every slide command shares
(:class:`cscvision.slides.settings.ReadSettings`: tissue, grid, readers, decoder, device,
batch) plus what only scoring needs. A validated record (a pydantic dataclass): a value
out of range is refused when the settings are made, before any slide is read, with the
flag's name (:func:`cscvision.core.validate.check_flags`). Each field is one flag of
``cscvision infer`` (:func:`cscvision.cli.common.add_settings_args`); a new setting is one
field here.
"""

from __future__ import annotations

from pydantic.dataclasses import dataclass

from cscvision.core.validate import FLAG_CONFIG
from cscvision.slides.settings import MASK_MPP_RANGE, MAX_OVERLAP, ReadSettings, flag

__all__ = ["MASK_MPP_RANGE", "MAX_OVERLAP", "READERS", "InferSettings"]

READERS = ("processes", "threads")
MAX_WITHIN_UM = 10_000.0
MAX_PERMUTATIONS = 9_999
UNCERTAINTY_HELP = (
    "per-tile uncertainty: mc:N (N forward passes with dropout active, so N times the "
    "model's cost, plus one pass for the OOD score), tta (the 8 flips/rotations: 8 "
    "passes) or ensemble (the spread across two or more --model; one pass per member, "
    "which the ensemble's score costs anyway); writes std_<target> and mi_<target> "
    "(mutual information) columns, maps, overlays and TIFFs; the score becomes the mean "
    "of the passes"
)
STATISTICS = "co-localisation statistics and viewer files"


@dataclass(frozen=True, config=FLAG_CONFIG)
class InferSettings(ReadSettings):
    """How every slide of a batch is scored (the ``cscvision infer`` flags)."""

    prefetch: bool = flag(
        True,
        "do not prepare the next slide (open, tissue, grid, first batches) while the model "
        "scores the current one",
        group="decoding and prefetch",
    )
    within_um: float = flag(
        100.0,
        "radius of the within-distance share and the colocation quotient, edge to edge "
        "(default 100 µm; the summary field names carry it)",
        ge=0,
        le=MAX_WITHIN_UM,
        group=STATISTICS,
        metavar="UM",
    )
    permutations: int = flag(
        199,
        "rigid moves (toroidal shifts, flips, rotations) of the second target's map in the "
        "null of each co-localisation figure, seeded by the slide id (default 199; 0 reports "
        "the figures without p-values)",
        ge=0,
        le=MAX_PERMUTATIONS,
        group=STATISTICS,
        metavar="N",
    )
    asap_target: str | None = flag(
        None,
        "also write TARGET's likelihood map as OUT/<slide_id>/<slide>_likelihood_map.tif, the "
        "name ASAP opens by itself when the file sits beside the slide",
        group=STATISTICS,
        metavar="TARGET",
    )
    # per-tile uncertainty (models.uncertainty): "mc:N", "tta" or "ensemble"; None: none
    uncertainty: str | None = flag(
        None,
        UNCERTAINTY_HELP,
        pattern=r"^(mc:\d+|tta|ensemble)$",
        group="trust",
        metavar="mc:N|tta|ensemble",
    )

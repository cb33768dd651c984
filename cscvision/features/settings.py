"""How ``cscvision features`` reads slides (its flags), without importing torch."""

from __future__ import annotations

from pydantic.dataclasses import dataclass

from cscvision.core.validate import FLAG_CONFIG
from cscvision.slides.settings import ReadSettings


@dataclass(frozen=True, config=FLAG_CONFIG)
class ExtractSettings(ReadSettings):
    """How tiles are cut and read for an encoder: the read settings of every slide command
    (tiles at the encoder's µm/px and size; ``overlap`` and ``on_corrupt_tile`` keep their
    defaults: one embedding per tile, a corrupt tile fails its slide)."""

"""What a slide is (:class:`SlideInfo`) and how it can fail (:class:`SlideError`).

Kept apart from the reader so the fast path and the reader both build on it.
"""

from __future__ import annotations

from dataclasses import dataclass

# A pyramid level whose µm/px lies within this relative distance of the target is read
# as is (0.499 µm/px counts as 0.5): resizing by 0.2 % only blurs.
MPP_TOLERANCE = 0.02

# Names of the µm/px sources, recorded in every output.
MPP_FROM_OPENSLIDE = "openslide"
MPP_FROM_TIFF = "tiff-resolution"
MPP_FROM_OVERRIDE = "override"


class SlideError(Exception):
    """A slide cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class SlideInfo:
    """What a slide is: geometry, resolution and provenance, all in level-0 pixels."""

    path: str
    vendor: str
    dimensions: tuple[int, int]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float  # µm per level-0 pixel
    mpp_source: str
    objective_power: float | None
    bounds: tuple[int, int, int, int]  # x, y, width, height of the non-empty area

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def best_level_for_mpp(self, mpp: float) -> int:
        """The coarsest level that is not coarser than ``mpp`` (within MPP_TOLERANCE)."""
        best = 0
        for level in range(self.level_count):
            if self.level_mpp(level) <= mpp * (1 + MPP_TOLERANCE):
                best = level
        return best

"""What a slide is (:class:`SlideInfo`) and how it can fail (:class:`SlideError`).

Kept apart from the reader so the fast path and the reader both build on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from cscvision.core.errors import CscvisionError

# A pyramid level whose µm/px lies within this relative distance of the target is read
# as is (0.499 µm/px counts as 0.5): resizing by 0.2 % only blurs.
MPP_TOLERANCE = 0.02

# Names of the µm/px sources, recorded in every output.
MPP_FROM_OPENSLIDE = "openslide"
MPP_FROM_TIFF = "tiff-resolution"
MPP_FROM_OVERRIDE = "override"

# µm/px a microscope slide can have, whatever the source (vendor metadata, TIFF resolution
# tags, --slide-mpp, override CSVs): finer than 0.05 is beyond any optical scanner, coarser
# than 20 is an overview camera or an image editor's 72-1200 dpi, not a scan to tile.
DECODERS = ("auto", "cpu", "gpu")  # where stored JPEG tiles are decoded: --decode
MPP_RANGE = (0.05, 20.0)

# The largest buffer one read may allocate (a thumbnail, a strip of it, a region or tile):
# bigger reads are refused with a SlideError before anything is allocated.
MEMORY_BUDGET_BYTES = 2 * 2**30

# A slide file's header is not believed when the file holds less than this many bytes per
# million level-0 pixels: JPEG tiles of blank glass take ~10,000, and a scanner that leaves
# 99 % of the tiles out still stores ~100. 1,000,000 x 1,000,000 px needs at least 1 MB.
MIN_BYTES_PER_MEGAPIXEL = 1.0

ON_CORRUPT_TILE = ("fail", "skip")


class SlideError(CscvisionError):
    """A slide cannot be used; the message names the file and what to do."""


class CorruptTileError(SlideError):
    """One tile of a slide cannot be decoded; names the slide, level and level-0 ``xy``."""

    def __init__(self, path: str, level: int, xy_l0: tuple[int, int], detail: str):
        self.path, self.level, self.xy_l0 = path, int(level), (int(xy_l0[0]), int(xy_l0[1]))
        self.detail = detail
        super().__init__(
            f"{path}: corrupt tile at level {self.level}, level-0 x={self.xy_l0[0]} "
            f"y={self.xy_l0[1]} ({detail}); pass --on-corrupt-tile skip (infer, tile) to drop "
            "such tiles and finish the slide"
        )

    def __reduce__(self) -> tuple:  # crosses process boundaries (reader processes, Ray) whole
        return (type(self), (self.path, self.level, self.xy_l0, self.detail))


def mpp_is_plausible(mpp: float) -> bool:
    """True when ``mpp`` lies in :data:`MPP_RANGE` (False for NaN and infinities)."""
    return MPP_RANGE[0] <= mpp <= MPP_RANGE[1]


def describe_mpp_range() -> str:
    return f"{MPP_RANGE[0]:g}-{MPP_RANGE[1]:g} µm/px"


def check_buffer(path: str, what: str, nbytes: float, budget: int = MEMORY_BUDGET_BYTES) -> None:
    """Refuse, before allocating, a read of ``nbytes`` that exceeds ``budget``."""
    if nbytes > budget:
        raise SlideError(
            f"{path}: {what} would need {nbytes / 2**30:.1f} GiB, over the "
            f"{budget / 2**30:.1f} GiB memory budget of one read; the slide's size or µm/px "
            "is implausible, or the request too large (check the slide and the flags)"
        )


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

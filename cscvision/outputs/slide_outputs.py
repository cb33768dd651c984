"""One slide's outputs read back (:mod:`cscvision.outputs.read` reads them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cscvision.core.errors import CscvisionError
from cscvision.core.geometry import MapTransform

if TYPE_CHECKING:
    import pandas as pd


class OutputsError(CscvisionError, ValueError):
    """An output folder is missing or not one ``cscvision infer`` wrote."""


@dataclass(frozen=True)
class SlideOutputs:
    """One slide's outputs as arrays: the tile table, the maps and their frame, the summary."""

    slide_id: str
    folder: Path
    tiles: pd.DataFrame  # x, y (level-0 top-left), tissue, prob_<target> per tile
    maps: dict[str, np.ndarray]  # target -> float32[rows, cols]; NaN where no tile reached
    tissue_map: np.ndarray  # float32[rows, cols], tissue fraction of each map pixel
    transform: MapTransform  # map pixel (col, row) -> level-0 (x, y) of its corner
    slide_mpp: float
    summary: dict[str, Any]

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.maps)

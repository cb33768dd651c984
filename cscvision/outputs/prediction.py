"""The record inference hands the writers: one slide's tile scores and maps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cscvision.core.geometry import MapTransform
from cscvision.slides.grid import TileGrid


@dataclass(frozen=True)
class SlidePrediction:
    """Everything the writers need about one slide's predictions, at map resolution."""

    grid: TileGrid
    targets: tuple[str, ...]
    probs: np.ndarray  # float32[N, T], row i is the tile at grid.xy_l0[i]
    maps: np.ndarray  # float32[T, rows, cols], blended probabilities; NaN where no tile
    tissue_map: np.ndarray  # float32[rows, cols], tissue fraction of each map pixel
    map_transform: MapTransform
    thumb: np.ndarray  # uint8[h, w, 3] thumbnail at the tissue mask's resolution
    mask: np.ndarray  # bool[h, w] tissue mask (thumbnail pixels)
    mask_scale: float  # mask pixels per level-0 pixel
    tissue_mm2: float  # tissue area of the whole slide, from the mask
    seconds: float  # wall time of the whole prediction, reading included
    predict_seconds: float  # wall time of reading and scoring tiles
    device: str
    amp: bool
    corrupt_xy_l0: np.ndarray | None = None  # int[K, 2] tiles dropped as undecodable (skip)
    # MIL models: raw per-tile columns for the tile table (name → float[N]) and the slide's
    # prediction (the summary's ``slide_prediction``)
    tile_values: dict[str, np.ndarray] = field(default_factory=dict)
    slide_prediction: dict[str, Any] | None = None
    # trust columns (inference.trust): per tile float32[N] and stitched maps [rows, cols] by
    # name: ``ood`` (OOD score / validation 99th percentile), ``std_<t>``, ``mi_<t>``
    trust: dict[str, np.ndarray] = field(default_factory=dict)
    trust_maps: dict[str, np.ndarray] = field(default_factory=dict)
    # a card's stain template: its method, the slide's fitted stains and their angles to the
    # template's (slides.slide_stains.stain_record); None without a template
    stain: dict[str, Any] | None = None

    @property
    def slide_id(self) -> str:
        return self.grid.slide_id

    @property
    def map_cell_mm2(self) -> float:
        side_um = self.map_transform.px_l0 * self.grid.slide_mpp
        return side_um * side_um / 1e6

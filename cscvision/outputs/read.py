"""Reading a batch's outputs back: one :class:`SlideOutputs` per complete slide folder.

For notebooks: ``read_outputs("out")["SLIDE"].tiles`` is the tile table as a DataFrame,
``.maps["stemness"]`` a stitched map whose pixel ``(col, row)`` sits at level-0
``transform.to_l0(col, row)``, and ``.summary`` the statistics of ``summary.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cscvision.core.errors import CscvisionError
from cscvision.core.geometry import MapTransform
from cscvision.outputs.slide_folder import MAPS, SUMMARY, TILES

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


def read_slide_outputs(folder: str | Path) -> SlideOutputs:
    """The outputs in one ``OUT/<slide_id>/`` folder (``summary.json`` marks it complete)."""
    import pandas as pd

    folder = Path(folder)
    summary_path = folder / SUMMARY
    if not summary_path.is_file():
        raise OutputsError(
            f"{folder}: no {SUMMARY}; the slide is unfinished or this is no "
            "cscvision infer output folder"
        )
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    with np.load(folder / MAPS, allow_pickle=False) as npz:
        targets = [str(t) for t in npz["targets"]]
        maps = {t: npz[t] for t in targets}
        tissue_map = npz["tissue"]
        x0, y0, px = (float(v) for v in npz["transform"])
        slide_mpp = float(npz["slide_mpp"])
    tiles = pd.read_csv(folder / TILES)
    return SlideOutputs(
        slide_id=str(summary.get("slide_id", folder.name)),
        folder=folder,
        tiles=tiles,
        maps=maps,
        tissue_map=tissue_map,
        transform=MapTransform(x0, y0, px),
        slide_mpp=slide_mpp,
        summary=summary,
    )


def read_outputs(out_dir: str | Path) -> dict[str, SlideOutputs]:
    """Read a batch's outputs back: every complete slide under ``out_dir``, by id.

    Folders without ``summary.json`` (unfinished slides) are left out.

    Parameters
    ----------
    out_dir
        What ``cscvision infer --out`` (or ``write_slide_outputs``) wrote.

    Returns
    -------
    dict[str, SlideOutputs]
        Per slide id: the tile table (pandas), the maps and their level-0 transform, the
        tissue map, the µm/px and the summary.

    Raises
    ------
    OutputsError
        A slide folder whose files are unreadable.

    Examples
    --------
    >>> outputs = cscvision.read_outputs("results")
    >>> one = outputs["S01"]
    >>> one.tiles.head(), one.maps["stemness"].shape, one.transform.to_l0(0, 0)
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise OutputsError(f"{out}: not a folder; pass the --out folder of cscvision infer")
    found = {}
    for summary in sorted(out.glob(f"*/{SUMMARY}")):
        slide = read_slide_outputs(summary.parent)
        found[slide.slide_id] = slide
    return found

"""Reading a batch's outputs back: one :class:`SlideOutputs` per complete slide folder.

For notebooks: ``read_outputs("out")["SLIDE"].tiles`` is the tile table as a DataFrame,
``.maps["stemness"]`` a stitched map whose pixel ``(col, row)`` sits at level-0
``transform.to_l0(col, row)``, and ``.summary`` the statistics of ``summary.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cscvision.core.geometry import MapTransform
from cscvision.outputs.slide_folder import MAPS, SUMMARY, TILES
from cscvision.outputs.slide_outputs import OutputsError, SlideOutputs

__all__ = ["BatchOutputs", "OutputsError", "SlideOutputs", "read_outputs", "read_slide_outputs"]


class BatchOutputs(dict):
    """Slide id → :class:`SlideOutputs` of one batch (a dict), convertible to AnnData."""

    def to_anndata(self, **kwargs: Any) -> Any:
        """The tiles as one AnnData (:func:`cscvision.outputs.anndata.outputs_anndata`;
        needs the ``scverse`` extra)."""
        from cscvision.outputs.anndata import outputs_anndata

        return outputs_anndata(self, **kwargs)


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


def read_outputs(out_dir: str | Path) -> BatchOutputs:
    """Read a batch's outputs back: every complete slide under ``out_dir``, by id.

    Folders without ``summary.json`` (unfinished slides) are left out.

    Parameters
    ----------
    out_dir
        What ``cscvision infer --out`` (or ``write_slide_outputs``) wrote.

    Returns
    -------
    BatchOutputs
        A dict: per slide id, the tile table (pandas), the maps and their level-0
        transform, the tissue map, the µm/px and the summary; ``.to_anndata()`` makes the
        tiles one AnnData (``scverse`` extra).

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
    found = BatchOutputs()
    for summary in sorted(out.glob(f"*/{SUMMARY}")):
        slide = read_slide_outputs(summary.parent)
        found[slide.slide_id] = slide
    return found

"""Reading a batch's outputs back: one :class:`SlideOutputs` per complete slide folder.

For notebooks: ``read_outputs("out")["SLIDE"].tiles`` is the tile table as a DataFrame,
``.maps["stemness"]`` a stitched map whose pixel ``(col, row)`` sits at level-0
``transform.to_l0(col, row)``, and ``.summary`` the statistics of ``summary.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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


@dataclass(frozen=True)
class SummaryFile:
    """One ``OUT/<slide_id>/summary.json`` read by :func:`read_summary_files`."""

    path: Path
    slide_id: str
    summary: dict[str, Any]


def read_summary_files(out_dir: str | Path) -> tuple[list[SummaryFile], list[str]]:
    """Every readable ``OUT/<slide_id>/summary.json``, sorted, and one warning line for each
    one left out: unreadable (truncated, not JSON, not an object), or whose ``slide_id`` is
    not its folder's name (a copied or edited summary: its id would name files elsewhere).
    ``stats``, ``report`` and ``view`` print the warnings and go on with the rest."""
    found, skipped = [], []
    for path in sorted(Path(out_dir).glob(f"*/{SUMMARY}")):
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            skipped.append(f"{path}: unreadable ({e}); skipped: re-run cscvision infer on it")
            continue
        if not isinstance(summary, dict):
            skipped.append(f"{path}: not a JSON object; skipped: re-run cscvision infer on it")
            continue
        slide_id = summary.get("slide_id", path.parent.name)
        if slide_id != path.parent.name:
            skipped.append(
                f"{path}: slide_id {slide_id!r} is not its folder's name "
                f"{path.parent.name!r}; skipped: re-run cscvision infer on the slide"
            )
            continue
        found.append(SummaryFile(path, str(slide_id), summary))
    return found, skipped


def check_one_model(found: list[SummaryFile]) -> None:
    """Refuse summaries of models with different targets in one table (``OutputsError``
    naming one slide of each)."""
    first = None
    for item in found:
        targets = tuple(item.summary.get("targets", {}))
        if first is None:
            first = (item, targets)
        elif targets != first[1]:
            a, b = first[0], item
            raise OutputsError(
                f"{a.path.parent.parent}: outputs of two models with different targets: "
                f"{a.slide_id} ({_model_name(a)}: {', '.join(first[1])}) and {b.slide_id} "
                f"({_model_name(b)}: {', '.join(targets)}); give each model its own --out, "
                "or re-run infer with one model"
            )


def _model_name(item: SummaryFile) -> str:
    model = item.summary.get("model", {})
    return str(model.get("name", "model")) if isinstance(model, dict) else "model"

"""A batch's outputs as AnnData: tiles (and cells) as observations, ready for scanpy and squidpy.

One observation per scored tile: ``obs`` holds the slide, patient and library id, the
level-0 top-left corner (``x_l0``, ``y_l0``, as in ``tiles.csv``), the tile centre in
level-0 pixels and in µm, the tissue fraction, every score (``prob_<target>``) and every
other per-tile column of ``tiles.csv`` (MIL attention, uncertainty, OOD scores), plus the
per-tile cell features of a ``cscvision cells`` folder, prefixed ``cells_``, where its
tiles have the same corners. ``X`` is the feature-store embeddings when given, else the
scores. ``obsm["spatial"]`` is the tile centre in µm. ``uns["spatial"][slide_id]`` holds
the slide thumbnail (``images/hires``) and ``scalefactors`` (``tissue_hires_scalef``:
thumbnail pixels per µm; ``spot_diameter_fullres``: the tile side in µm), the layout
``squidpy.pl.spatial_scatter(adata, library_key="library_id", shape="square")`` draws.
``uns["cscvision"]`` records the version, the targets and each slide's model, settings
and resolution (JSON).

anndata is imported only when a table is built: the core never needs it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cscvision import __version__
from cscvision.core.errors import CscvisionError

if TYPE_CHECKING:
    import anndata
    import pandas as pd

    from cscvision.features.store import FeatureStore
    from cscvision.models.card import ModelCard
    from cscvision.outputs.slide_outputs import SlideOutputs

SCVERSE_INSTALL = 'pip install "cscvision[scverse]"'
THUMB_MAX_PX = 2000  # longest side of the slide thumbnail in uns["spatial"]
LIBRARY_KEY = "library_id"


class ExportError(CscvisionError, ValueError):
    """Outputs that cannot be exported as asked (missing package, store or slide)."""


def import_scverse(module: str = "anndata") -> Any:
    """``module`` (anndata, spatialdata, ...), or an :class:`ExportError` naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(
            f"the AnnData/SpatialData export needs {module}, which is not installed "
            f"here: {SCVERSE_INSTALL}"
        ) from None


# --- tiles -------------------------------------------------------------------------------


def tile_side_l0(slide: SlideOutputs) -> int:
    """Side of one tile in level-0 pixels (``summary.json`` resolution)."""
    resolution = slide.summary.get("resolution", {})
    side = resolution.get("tile_l0", slide.summary.get("tile_l0"))
    if side is None:
        raise ExportError(f"{slide.folder}/summary.json: no resolution.tile_l0; re-run infer")
    return int(side)


def tile_obs(slide: SlideOutputs, patient_id: str | None = None) -> pd.DataFrame:
    """The ``obs`` table of one slide's tiles (see the module doc for the columns)."""
    import pandas as pd

    tiles = slide.tiles
    half = tile_side_l0(slide) / 2
    cx, cy = tiles["x"].to_numpy() + half, tiles["y"].to_numpy() + half
    front = {
        "slide_id": slide.slide_id,
        "patient_id": patient_id or slide.slide_id,
        LIBRARY_KEY: slide.slide_id,
        "x_l0": tiles["x"].to_numpy(np.int64),
        "y_l0": tiles["y"].to_numpy(np.int64),
        "x_centre_l0": cx,
        "y_centre_l0": cy,
        "x_um": cx * slide.slide_mpp,
        "y_um": cy * slide.slide_mpp,
    }
    rest = tiles.drop(columns=["x", "y"])
    obs = pd.concat([pd.DataFrame(front), rest.reset_index(drop=True)], axis=1)
    obs.index = [f"{slide.slide_id}:{x}:{y}" for x, y in zip(tiles["x"], tiles["y"], strict=True)]
    return obs


def h5ad_ready(frame: pd.DataFrame, categories: tuple[str, ...]) -> pd.DataFrame:
    """``frame`` with an object-dtype index and ``categories`` as categoricals: pandas 3's
    Arrow-backed strings are not what anndata 0.12 writes."""
    import pandas as pd

    frame = frame.copy()
    frame.index = pd.Index([str(i) for i in frame.index], dtype=object)
    for key in categories:
        values = frame[key].astype(str).to_numpy(dtype=object)
        kinds = pd.Index(sorted(set(values)), dtype=object)
        frame[key] = pd.Categorical(values, categories=kinds)
    return frame


def score_columns(obs: pd.DataFrame) -> list[str]:
    return [c for c in obs.columns if c.startswith("prob_")]


def join_cell_features(obs: pd.DataFrame, cells: SlideOutputs) -> pd.DataFrame:
    """``obs`` with the per-tile cell features of ``cells`` (a ``cscvision cells`` slide
    folder) as ``cells_<feature>``, matched by tile corner; NaN where no cell tile matches."""
    feats = cells.tiles.drop(columns=["tissue"], errors="ignore")
    feats = feats.rename(columns={c: f"cells_{c}" for c in feats.columns if c not in ("x", "y")})
    merged = obs.merge(feats, how="left", left_on=["x_l0", "y_l0"], right_on=["x", "y"])
    merged.index = obs.index
    return merged.drop(columns=["x", "y"])


def store_rows(store: FeatureStore, obs: pd.DataFrame, where: str) -> np.ndarray:
    """The store's embedding of each tile of ``obs``; every tile must be in the store."""
    xy = obs[["x_l0", "y_l0"]].to_numpy(np.int64)
    rows = store.rows_of(xy)
    missing = int((rows < 0).sum())
    if missing:
        raise ExportError(
            f"{where}: no embedding for {missing} of {len(rows)} tiles of slide "
            f"{store.slide_id or '?'}; write the store on the same grid as the outputs "
            "(cscvision features with infer's tile size, µm/px and overlap)"
        )
    return np.asarray(store.features[rows], np.float32)


# --- slide images --------------------------------------------------------------------------


def slide_thumbnail(slide: SlideOutputs, max_px: int = THUMB_MAX_PX) -> tuple[np.ndarray, float]:
    """The slide's thumbnail (longest side ≤ ``max_px``) and its pixels per µm."""
    from cscvision.slides.slide import open_slide

    path = Path(str(slide.summary.get("slide_path", "")))
    if not path.exists():
        raise ExportError(
            f"{slide.folder}/summary.json: slide {path} not found; move it back or export "
            "without the image (--no-image)"
        )
    override = slide.summary.get("settings", {}).get("slide_mpp_override")
    with open_slide(path, mpp=override) as opened:
        w, h = opened.info.dimensions
        mpp = opened.info.mpp
        thumb = opened.thumbnail(mpp * max(w, h) / max_px)
    return thumb, thumb.shape[1] / (w * mpp)


def spatial_uns(slide: SlideOutputs, image: tuple[np.ndarray, float] | None) -> dict[str, Any]:
    """``uns["spatial"][library_id]`` for one slide, as squidpy and scanpy read it."""
    tile_um = tile_side_l0(slide) * slide.slide_mpp
    entry: dict[str, Any] = {
        "scalefactors": {"spot_diameter_fullres": float(tile_um)},
        "metadata": {"slide_path": str(slide.summary.get("slide_path", ""))},
    }
    if image is not None:
        thumb, px_per_um = image
        entry["images"] = {"hires": np.ascontiguousarray(thumb, np.uint8)}
        entry["scalefactors"]["tissue_hires_scalef"] = float(px_per_um)
    return entry


# --- one batch ---------------------------------------------------------------------------


def outputs_anndata(
    outputs: Mapping[str, SlideOutputs],
    *,
    stores: Mapping[str, FeatureStore] | None = None,
    patients: Mapping[str, str] | None = None,
    cells: Mapping[str, SlideOutputs] | None = None,
    images: bool = True,
    card: ModelCard | None = None,
) -> anndata.AnnData:
    """The tiles of a batch's outputs as one AnnData (see the module doc).

    Parameters
    ----------
    outputs
        ``read_outputs(out_dir)``: slide id → its outputs.
    stores
        Slide id → its feature store; given, ``X`` holds the embeddings (every slide needs
        one, holding every tile), else ``X`` holds the scores.
    patients
        Slide id → patient id (a cohort manifest); without, each slide is its own patient.
    cells
        ``read_outputs`` of a ``cscvision cells`` folder: per-tile cell features joined.
    images
        Put each slide's thumbnail in ``uns["spatial"]`` (opens the slide files).
    card
        The card of the model that made the outputs, kept whole in ``uns["cscvision"]``
        (its name must be the one ``summary.json`` records).

    Returns
    -------
    anndata.AnnData
        One observation per tile, ``obsm["spatial"]`` in µm.

    Raises
    ------
    ExportError
        anndata is missing, no slides, a store lacks a slide or tile, a slide file is gone.

    Examples
    --------
    >>> adata = cscvision.read_outputs("results").to_anndata()
    >>> squidpy.gr.spatial_neighbors(adata, library_key="library_id")
    """
    ad = import_scverse("anndata")
    import pandas as pd

    if not outputs:
        raise ExportError("no complete slide outputs to export (no */summary.json)")
    obs_parts, x_parts, spatial = [], [], {}
    for slide_id, slide in outputs.items():
        obs = tile_obs(slide, (patients or {}).get(slide_id))
        if cells is not None and slide_id in cells:
            obs = join_cell_features(obs, cells[slide_id])
        if stores is not None:
            if slide_id not in stores:
                raise ExportError(f"--features: no feature store for slide {slide_id}")
            x_parts.append(store_rows(stores[slide_id], obs, f"feature store of {slide_id}"))
        else:
            x_parts.append(obs[score_columns(obs)].to_numpy(np.float32))
        obs_parts.append(obs)
        spatial[slide_id] = spatial_uns(slide, slide_thumbnail(slide) if images else None)
    obs = h5ad_ready(pd.concat(obs_parts), ("slide_id", "patient_id", LIBRARY_KEY))
    x = np.concatenate(x_parts)
    if stores is None:
        var_names = [c.removeprefix("prob_") for c in score_columns(obs_parts[0])]
    else:
        var_names = [f"feature_{i}" for i in range(x.shape[1])]
    var = pd.DataFrame(index=pd.Index(var_names, dtype=object))
    adata = ad.AnnData(X=x, obs=obs, var=var)
    adata.obsm["spatial"] = obs[["x_um", "y_um"]].to_numpy(np.float64)
    adata.uns["spatial"] = spatial
    adata.uns["cscvision"] = provenance(outputs, stores)
    if card is not None:
        adata.uns["cscvision"]["model_card"] = card_json(card, outputs)
    return adata


def card_json(card: ModelCard, outputs: Mapping[str, SlideOutputs]) -> str:
    """The card as JSON, once its name matches every slide's ``summary.json`` model."""
    made_by = {str(s.summary.get("model", {}).get("name")) for s in outputs.values()}
    if made_by != {card.name}:
        raise ExportError(
            f"--model: model {card.name!r}, but the outputs were made by "
            f"{', '.join(sorted(made_by))}; pass that model or leave --model out"
        )
    return json.dumps(card.to_json(), sort_keys=True)


def provenance(
    outputs: Mapping[str, SlideOutputs], stores: Mapping[str, FeatureStore] | None
) -> dict[str, Any]:
    """``uns["cscvision"]``: version, targets, X's meaning, per-slide records as JSON."""
    first = next(iter(outputs.values()))
    slides = {
        sid: {
            k: s.summary.get(k)
            for k in ("model", "settings", "resolution", "slide_path", "dimensions", "n_tiles")
        }
        | {"slide_mpp": s.slide_mpp}
        for sid, s in outputs.items()
    }
    out: dict[str, Any] = {
        "cscvision_version": __version__,
        "targets": list(first.targets),
        "X": "scores" if stores is None else "feature-store embeddings",
        "model": json.dumps(first.summary.get("model", {}), sort_keys=True),
        "slides": json.dumps(slides, sort_keys=True, default=str),
    }
    if stores:
        store = next(iter(stores.values()))
        out["encoder"] = store.encoder
        out["encoder_weights_sha256"] = store.weights_sha256
    return out


# --- cells ---------------------------------------------------------------------------------


def cells_anndata(
    cells: Mapping[str, SlideOutputs],
    *,
    patients: Mapping[str, str] | None = None,
    spatial: Mapping[str, Any] | None = None,
) -> anndata.AnnData:
    """The cells behind a ``cscvision cells`` folder as one AnnData: one observation per
    cell (slide, patient, cell id, type, type probability, level-0 and µm centroid),
    ``X`` the per-marker measurements (none: zero columns), ``obsm["spatial"]`` in µm."""
    ad = import_scverse("anndata")
    import pandas as pd

    obs_parts, x_parts = [], []
    for slide_id, slide in cells.items():
        table = _cell_table(slide)
        mpp = float(table.mpp or slide.slide_mpp)
        obs = pd.DataFrame(
            {
                "slide_id": slide_id,
                "patient_id": (patients or {}).get(slide_id, slide_id),
                LIBRARY_KEY: slide_id,
                "cell_id": table.ids,
                "cell_type": table.cell_type.astype(str),
                "type_prob": table.prob,
                "x_l0": table.x,
                "y_l0": table.y,
                "x_um": table.x * mpp,
                "y_um": table.y * mpp,
            }
        )
        obs.index = [f"{slide_id}:cell{i}" for i in table.ids]
        markers = sorted(table.markers)
        x_parts.append(
            np.column_stack([np.asarray(table.markers[m], np.float32) for m in markers])
            if markers
            else np.zeros((len(obs), 0), np.float32)
        )
        obs_parts.append((obs, markers))
    names = obs_parts[0][1] if obs_parts else []
    if any(m != names for _, m in obs_parts):
        raise ExportError("the cell tables carry different markers; export them per slide")
    obs = h5ad_ready(
        pd.concat([o for o, _ in obs_parts]), ("slide_id", "patient_id", LIBRARY_KEY, "cell_type")
    )
    var = pd.DataFrame(index=pd.Index(names, dtype=object))
    adata = ad.AnnData(X=np.concatenate(x_parts), obs=obs, var=var)
    adata.obsm["spatial"] = obs[["x_um", "y_um"]].to_numpy(np.float64)
    if spatial is not None:
        adata.uns["spatial"] = {k: v for k, v in spatial.items() if k in cells}
    adata.uns["cscvision"] = {"cscvision_version": __version__, "kind": "cells"}
    return adata


def _cell_table(slide: SlideOutputs):
    from cscvision.cells.readers import read_cells

    record = slide.summary.get("cell_table", {})
    settings = slide.summary.get("settings", {})
    path = Path(str(record.get("path", "")))
    if not path.is_file():
        raise ExportError(
            f"{slide.folder}/summary.json: cell table {path} not found; move it back or "
            "export without --cells"
        )
    return read_cells(path, settings.get("fmt", "table"), class_map=settings.get("class_map"))


def write_h5ad(adata: anndata.AnnData, path: str | Path) -> Path:
    """Write ``adata`` to ``path`` atomically (temporary name, then rename)."""
    from cscvision.core.io import atomic_path

    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return Path(path)

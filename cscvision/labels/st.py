"""Spatial transcriptomics readers: 10x Space Ranger ``outs/`` folders and HEST ``.h5ad`` samples.

Space Ranger (Visium) ``outs/``:

- ``filtered_feature_bc_matrix.h5``: spots × genes counts, read with ``scanpy.read_10x_h5``;
- ``spatial/tissue_positions.csv`` (Space Ranger ≥ 2.0, with a header), the older headerless
  ``spatial/tissue_positions_list.csv``, or ``spatial/tissue_positions.parquet``; the columns
  are, in this order, ``barcode, in_tissue, array_row, array_col, pxl_row_in_fullres,
  pxl_col_in_fullres`` (row = y, col = x, in pixels of the full-resolution image given to
  Space Ranger);
- ``spatial/scalefactors_json.json``: ``spot_diameter_fullres`` (spot diameter in full-res
  pixels), ``fiducial_diameter_fullres``, ``tissue_hires_scalef``, ``tissue_lowres_scalef``.

HEST-1k sample (``st/<id>.h5ad`` beside ``wsis/<id>.tif``): an AnnData of spots × genes whose
``obsm["spatial"]`` holds spot centres ``(x, y)`` in pixels of the sample's WSI, and whose
``uns["spatial"][<library>]["scalefactors"]`` may hold ``spot_diameter_fullres``; ``obs``
may hold ``in_tissue``. HEST's ``metadata/<id>.json`` gives ``spot_diameter`` in µm.

Full-resolution pixels are the image's own pixels: spot centres are level-0 coordinates of
that image. When the WSI is not the image Space Ranger saw (a rescan, another export, a
crop), give the transform from image to slide pixels (``scale`` and ``offset_px``) or
register the images first; spots that fall outside the slide are an error, not a guess.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cscvision.core.errors import CscvisionError

POSITION_COLUMNS = (
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
)
MATRIX_FILE = "filtered_feature_bc_matrix.h5"
POSITION_FILES = ("tissue_positions.csv", "tissue_positions.parquet", "tissue_positions_list.csv")
SCALEFACTORS_FILE = "scalefactors_json.json"
INSTALL_HINT = 'pip install "cscvision[st]"'


class STError(CscvisionError, ValueError):
    """Spatial transcriptomics input that cannot be used; the message names the file."""


@dataclass(frozen=True)
class STSample:
    """Spots in tissue of one sample: raw counts and spot centres in the image's pixels."""

    path: str
    adata: Any  # anndata.AnnData, spots (in tissue) × genes, raw counts
    centres_px: np.ndarray  # float64[N, 2], (x, y) in full-resolution image pixels
    spot_diameter_px: float | None  # in the same pixels, when the sample says
    layout: str  # which files it came from, e.g. "spaceranger:tissue_positions.csv"
    n_dropped: int = 0  # spots outside tissue, dropped
    details: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.centres_px)


def require_module(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"reading spatial transcriptomics needs {module}: {INSTALL_HINT}"
        ) from None


# --- Space Ranger ------------------------------------------------------------------------------


def find_positions(spatial_dir: str | Path) -> Path:
    """The tissue-position file of a Space Ranger ``spatial/`` folder (newest layout first)."""
    spatial_dir = Path(spatial_dir)
    for name in POSITION_FILES:
        if (spatial_dir / name).exists():
            return spatial_dir / name
    raise STError(
        f"{spatial_dir}: no tissue positions; expected one of {', '.join(POSITION_FILES)}"
    )


def read_positions(path: str | Path) -> Any:
    """Spot positions as a pandas DataFrame indexed by barcode, columns as Space Ranger's."""
    pd = require_module("pandas")
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            require_module("pyarrow")
            table = pd.read_parquet(path)
        elif path.name == "tissue_positions_list.csv":
            table = pd.read_csv(path, header=None, names=list(POSITION_COLUMNS))
        else:
            table = pd.read_csv(path)
    except (OSError, ValueError) as e:
        raise STError(f"{path}: cannot read tissue positions ({e})") from None
    missing = [c for c in POSITION_COLUMNS if c not in table.columns]
    if missing:
        raise STError(
            f"{path}: lacks column(s) {missing}; Space Ranger writes {','.join(POSITION_COLUMNS)}"
        )
    table = table[list(POSITION_COLUMNS)].copy()
    table["barcode"] = table["barcode"].astype(str)
    numeric = table[list(POSITION_COLUMNS[1:])].apply(pd.to_numeric, errors="coerce")
    if numeric.isna().any().any():
        raise STError(f"{path}: non-numeric values in the position columns")
    table[list(POSITION_COLUMNS[1:])] = numeric
    twice = table["barcode"][table["barcode"].duplicated()]
    if len(twice):
        raise STError(
            f"{path}: barcode {twice.iloc[0]!r} is listed more than once ({len(twice)} repeated "
            "rows); each spot needs one row: use the file Space Ranger wrote"
        )
    return table.set_index("barcode")


def read_scalefactors(spatial_dir: str | Path) -> dict[str, float]:
    path = Path(spatial_dir) / SCALEFACTORS_FILE
    try:
        factors = json.loads(path.read_text())
        if not isinstance(factors, dict):
            raise TypeError(f"a JSON object of numbers is needed, not a {type(factors).__name__}")
        return {k: float(v) for k, v in factors.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError) as e:
        raise STError(f"{path}: not a readable scale-factor JSON ({e})") from None


def read_spaceranger(outs: str | Path) -> STSample:
    """Spots in tissue of a Space Ranger ``outs/`` folder, counts joined to positions."""
    sc = require_module("scanpy")
    outs = Path(outs)
    matrix = outs / MATRIX_FILE
    if not matrix.exists():
        raise STError(f"{outs}: no {MATRIX_FILE}; is this a Space Ranger outs/ folder?")
    positions_path = find_positions(outs / "spatial")
    positions = read_positions(positions_path)
    try:
        adata = sc.read_10x_h5(matrix)
    except (OSError, KeyError, ValueError) as e:
        raise STError(f"{matrix}: not a readable 10x feature-barcode matrix ({e})") from None
    adata.var_names_make_unique()
    unplaced = [b for b in adata.obs_names if b not in positions.index]
    if unplaced:
        raise STError(
            f"{matrix}: {len(unplaced)} barcode(s) (e.g. {unplaced[0]}) have no row in "
            f"{positions_path.name}; the matrix and positions come from different runs"
        )
    spots = positions.loc[list(adata.obs_names)]
    in_tissue = spots["in_tissue"].to_numpy() == 1
    if not in_tissue.any():
        raise STError(
            f"{positions_path}: no spot has in_tissue = 1 ({len(spots)} spots), so there is "
            "nothing to label; check that the positions file belongs to this sample"
        )
    adata = adata[in_tissue].copy()
    spots = spots[in_tissue]
    centres = spots[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    adata.obs[["array_row", "array_col"]] = spots[["array_row", "array_col"]].to_numpy()
    factors = read_scalefactors(outs / "spatial")
    return STSample(
        path=str(outs),
        adata=adata,
        centres_px=centres,
        spot_diameter_px=factors.get("spot_diameter_fullres"),
        layout=f"spaceranger:{positions_path.name}",
        n_dropped=int((positions["in_tissue"].to_numpy() != 1).sum()),
        details={
            "scalefactors": factors,
            "files": [str(matrix), str(positions_path), str(outs / "spatial" / SCALEFACTORS_FILE)],
        },
    )


# --- HEST ----------------------------------------------------------------------------------------


def _hest_spot_diameter(adata: Any, path: Path) -> float | None:
    for library in (adata.uns.get("spatial") or {}).values():
        factors = (library.get("scalefactors") or {}) if isinstance(library, dict) else {}
        if "spot_diameter_fullres" in factors:
            return float(factors["spot_diameter_fullres"])
    meta = path.parent.parent / "metadata" / f"{path.stem}.json"  # HEST: metadata/<id>.json
    if meta.exists():
        record = json.loads(meta.read_text())
        if record.get("spot_diameter") and record.get("pixel_size_um_estimated"):
            return float(record["spot_diameter"]) / float(record["pixel_size_um_estimated"])
    return None


def read_hest(path: str | Path) -> STSample:
    """Spots in tissue of a HEST sample ``.h5ad`` (``obsm["spatial"]``: centres, x then y)."""
    anndata = require_module("anndata")
    path = Path(path)
    try:
        adata = anndata.read_h5ad(path)
    except (OSError, KeyError, ValueError) as e:
        raise STError(f"{path}: not a readable .h5ad ({e})") from None
    if "spatial" not in adata.obsm:
        raise STError(
            f"{path}: no obsm['spatial'] (spot centres in WSI pixels); HEST samples have it"
        )
    centres = np.asarray(adata.obsm["spatial"], np.float64)
    if centres.ndim != 2 or centres.shape[1] < 2 or not np.isfinite(centres[:, :2]).all():
        raise STError(f"{path}: obsm['spatial'] must hold finite (x, y) per spot")
    keep = np.ones(len(adata), bool)
    if "in_tissue" in adata.obs:
        keep = adata.obs["in_tissue"].to_numpy().astype(int) == 1
    adata.var_names_make_unique()
    return STSample(
        path=str(path),
        adata=adata[keep].copy(),
        centres_px=centres[keep, :2],
        spot_diameter_px=_hest_spot_diameter(adata, path),
        layout="hest:h5ad",
        n_dropped=int((~keep).sum()),
        details={"files": [str(path)]},
    )


def read_st(path: str | Path) -> STSample:
    """Spots in tissue of one spatial-transcriptomics sample.

    Parameters
    ----------
    path
        A Space Ranger ``outs/`` folder (or the run folder above it) or a HEST-1k ``.h5ad``.

    Returns
    -------
    STSample
        Raw counts (AnnData, spots × genes), spot centres in full-resolution image pixels,
        the spot diameter when the sample gives it, and the number of spots dropped as
        outside tissue.

    Raises
    ------
    STError
        The files are missing or unreadable; the message names them.
    ImportError
        The ``st`` extra is not installed (``pip install "cscvision[st]"``).

    Examples
    --------
    >>> sample = cscvision.read_st("spaceranger/P01-A/outs")
    >>> sample.adata.n_obs, sample.centres_px[:2]
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".h5ad":
        return read_hest(path)
    if path.is_dir():
        outs = path / "outs" if (path / "outs" / MATRIX_FILE).exists() else path
        return read_spaceranger(outs)
    raise STError(
        f"{path}: not found or not spatial transcriptomics; give a Space Ranger outs/ folder "
        "or a HEST .h5ad"
    )


# --- geometry ------------------------------------------------------------------------------------


def spots_to_level0(
    centres_px: np.ndarray,
    dimensions: tuple[int, int],
    *,
    scale: float = 1.0,
    offset_px: tuple[float, float] = (0.0, 0.0),
    source: str = "",
) -> np.ndarray:
    """Spot centres in slide level-0 pixels: ``centre * scale + offset``; float64[N, 2].

    Raises :class:`STError` when a centre falls outside the slide's ``dimensions`` (w, h).
    """
    xy = np.asarray(centres_px, np.float64) * scale + np.asarray(offset_px, np.float64)
    w, h = dimensions
    outside = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= w) | (xy[:, 1] >= h)
    if outside.any():
        raise STError(
            f"{source}: {int(outside.sum())} of {len(xy)} spot centres fall outside the "
            f"{w}x{h} px slide (e.g. {xy[outside][0].round(1).tolist()}); full-resolution "
            "pixels must be the slide's level-0 pixels: use the image Space Ranger saw, or give "
            "the image-to-slide scale and offset (st_scale, st_offset_x, st_offset_y columns)"
        )
    return xy


def tile_corners(centres_l0: np.ndarray, tile_l0: float) -> np.ndarray:
    """Level-0 top-left corners of tiles of side ``tile_l0`` centred on the spots, int64[N, 2]."""
    return np.round(np.asarray(centres_l0, np.float64) - tile_l0 / 2).astype(np.int64)

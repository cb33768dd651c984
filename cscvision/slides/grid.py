"""Tile grids: level-0 coordinates of the tissue tiles of a slide at a chosen µm/px.

A grid is saved as a CSV table (one row per tile) with a JSON sidecar that records
everything needed to read the same tiles again and to trust them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cscvision import __version__
from cscvision.core.errors import CscvisionError
from cscvision.core.io import read_csv, write_csv, write_json
from cscvision.core.names import MAX_NAME_CHARS, name_digest, safe_name
from cscvision.slides.slide import MPP_FROM_OVERRIDE, ReadPlan, Slide, SlideError, plan_read
from cscvision.slides.tissue import DEFAULT_MASK_MPP, TissueParams, tissue_fraction, tissue_mask

GRID_TABLE = "tiles.csv"
GRID_SIDECAR = "tiles.json"


class GridError(CscvisionError, ValueError):
    """A tile grid asked for with a value out of range (tile size, µm/px, tissue share)."""


@dataclass(frozen=True)
class GridSpec:
    """What tiles to cut: ``tile_px`` pixels at ``mpp`` µm/px, overlapping by ``overlap``."""

    mpp: float = 0.5
    tile_px: int = 224
    overlap: float = 0.0  # fraction of the tile shared with the next one, 0 ≤ overlap < 1
    min_tissue: float = 0.5
    mask_mpp: float = DEFAULT_MASK_MPP

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < 1:
            raise GridError(f"overlap must lie in [0, 1), got {self.overlap}")
        if self.tile_px < 8 or self.mpp <= 0:
            raise GridError(f"tile_px ≥ 8 and mpp > 0 required, got {self.tile_px}, {self.mpp}")
        if not self.mask_mpp > 0:
            raise GridError(f"mask_mpp must be positive, got {self.mask_mpp}")
        if not 0 <= self.min_tissue <= 1:
            raise GridError(f"min_tissue is a fraction in [0, 1], got {self.min_tissue}")


@dataclass(frozen=True)
class TileGrid:
    """Tiles of one slide: ``xy_l0`` int[N, 2] top-left corners in level-0 pixels."""

    slide_path: str
    slide_id: str
    xy_l0: np.ndarray
    tissue: np.ndarray  # float32[N], fraction of each tile that is tissue
    plan: ReadPlan
    stride_l0: float
    origin_l0: tuple[int, int]  # level-0 corner of grid cell (0, 0)
    spec: GridSpec
    slide_mpp: float
    mpp_source: str
    dimensions: tuple[int, int]
    bounds: tuple[int, int, int, int]

    def __len__(self) -> int:
        return len(self.xy_l0)

    def cells(self) -> np.ndarray:
        """Grid (col, row) index of each tile, int[N, 2]."""
        offset = self.xy_l0 - np.asarray(self.origin_l0)
        return np.round(offset / self.stride_l0).astype(np.int64)

    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the full grid over the slide's bounds."""
        _, _, w, h = self.bounds
        return (
            _count(h, self.plan.tile_l0, self.stride_l0),
            _count(w, self.plan.tile_l0, self.stride_l0),
        )


def _count(extent: float, tile: float, stride: float) -> int:
    """Tiles needed to cover ``extent``; the last may run past the edge (read as white)."""
    if extent <= tile:
        return 1
    return math.ceil((extent - tile) / stride - 1e-9) + 1


def grid_coords(
    extent: tuple[int, int], tile_l0: float, stride_l0: float, origin: tuple[int, int] = (0, 0)
) -> np.ndarray:
    """Top-left level-0 corners of a grid covering ``extent`` (w, h) from ``origin``, int[N, 2].

    Row-major (raster) order, which keeps reading local in stored tiles.
    """
    cols = _count(extent[0], tile_l0, stride_l0)
    rows = _count(extent[1], tile_l0, stride_l0)
    xs = np.round(origin[0] + np.arange(cols) * stride_l0).astype(np.int64)
    ys = np.round(origin[1] + np.arange(rows) * stride_l0).astype(np.int64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


MAX_ID_CHARS = MAX_NAME_CHARS


def safe_slide_id(text: str) -> str:
    """``text`` made safe as a folder and file name: :func:`cscvision.core.names.safe_name`."""
    return safe_name(text)


def path_digest(text: str | Path) -> str:
    """8 hex digits of SHA-256 of ``text``: a short, stable tag for a name or path."""
    return name_digest(text)


def slide_id_of(path: str | Path) -> str:
    """Slide id: the file name without its extension (``.ome.tiff`` counts as one),
    made safe by :func:`safe_slide_id`."""
    name = Path(path).name
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return safe_slide_id(name[: -len(ext)])
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix else name
    return safe_slide_id(stem)


def detect_tissue(
    slide: Slide, mask_mpp: float = DEFAULT_MASK_MPP, params: TissueParams | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A slide's thumbnail and its tissue mask, from the thumbnail (never from level 0).

    Parameters
    ----------
    slide
        An open slide.
    mask_mpp
        µm/px of the thumbnail (default 8).
    params
        Tissue-detection settings; the defaults when not given.

    Returns
    -------
    tuple[numpy.ndarray, numpy.ndarray]
        The RGB thumbnail (uint8[h, w, 3]) and the tissue mask (bool[h, w]).

    Examples
    --------
    >>> with cscvision.open_slide("slide.svs") as slide:
    ...     thumb, mask = cscvision.detect_tissue(slide)
    >>> mask.mean()  # share of the thumbnail that is tissue
    """
    thumb = slide.thumbnail(mask_mpp)
    return thumb, tissue_mask(thumb, mask_mpp, params)


def make_grid(
    slide: Slide,
    spec: GridSpec,
    mask: np.ndarray | None = None,
    params: TissueParams | None = None,
) -> TileGrid:
    """The tissue tiles of a slide at the resolution and tile size ``spec`` names.

    Parameters
    ----------
    slide
        An open slide (``open_slide``).
    spec
        Tile µm/px, tile px, overlap, minimum tissue fraction and the mask's µm/px.
    mask
        A tissue mask at ``spec.mask_mpp``; computed from a thumbnail when not given.
    params
        Tissue-detection settings; the defaults when not given.

    Returns
    -------
    TileGrid
        Level-0 top-left corners ``xy_l0`` (int[N, 2]) of the tiles with at least
        ``spec.min_tissue`` tissue, their tissue fractions and the read plan.

    Raises
    ------
    SlideError
        The slide cannot be read.

    Examples
    --------
    >>> with cscvision.open_slide("slide.svs") as slide:
    ...     grid = cscvision.make_grid(slide, cscvision.GridSpec(mpp=0.5, tile_px=224))
    >>> grid.xy_l0[:2]
    """
    info = slide.info
    if mask is None:
        _, mask = detect_tissue(slide, spec.mask_mpp, params)
    plan = plan_read(info, mpp=spec.mpp, tile_px=spec.tile_px)
    stride_l0 = plan.tile_l0 * (1 - spec.overlap)
    bx, by, bw, bh = info.bounds
    xy = grid_coords((bw, bh), plan.tile_l0, stride_l0, origin=(bx, by))
    scale = mask.shape[1] / info.dimensions[0]
    fraction = tissue_fraction(mask, scale, xy, plan.tile_l0)
    keep = fraction >= spec.min_tissue
    return TileGrid(
        slide_path=info.path,
        slide_id=slide_id_of(info.path),
        xy_l0=xy[keep],
        tissue=fraction[keep],
        plan=plan,
        stride_l0=stride_l0,
        origin_l0=(bx, by),
        spec=spec,
        slide_mpp=info.mpp,
        mpp_source=info.mpp_source,
        dimensions=info.dimensions,
        bounds=info.bounds,
    )


# --- saving and loading ------------------------------------------------------------------


def grid_metadata(grid: TileGrid) -> dict:
    path = Path(grid.slide_path)
    stat = path.stat() if path.exists() else None
    return {
        "cscvision_version": __version__,
        "slide_path": str(path.resolve()),
        "slide_id": grid.slide_id,
        "slide_size_bytes": stat.st_size if stat else None,
        "slide_mtime": stat.st_mtime if stat else None,
        "dimensions": list(grid.dimensions),
        "bounds": list(grid.bounds),
        "slide_mpp": grid.slide_mpp,
        "mpp_source": grid.mpp_source,
        "mpp": grid.plan.mpp,
        "tile_px": grid.plan.tile_px,
        "level": grid.plan.level,
        "downsample": grid.plan.downsample,
        "read_px": grid.plan.read_px,
        "resize_factor": grid.plan.resize_factor,
        "tile_l0": grid.plan.tile_l0,
        "stride_l0": grid.stride_l0,
        "origin_l0": list(grid.origin_l0),
        "overlap": grid.spec.overlap,
        "min_tissue": grid.spec.min_tissue,
        "mask_mpp": grid.spec.mask_mpp,
        "n_tiles": len(grid),
    }


def save_grid(grid: TileGrid, folder: str | Path, extra: dict | None = None) -> tuple[Path, Path]:
    """Write ``tiles.csv`` (x, y, tissue) and its ``tiles.json`` sidecar (with the ``extra``
    entries) into ``folder``."""
    folder = Path(folder)
    # An older sidecar must not vouch for a table this call fails to finish.
    (folder / GRID_SIDECAR).unlink(missing_ok=True)
    rows = ((int(x), int(y), f"{t:.4f}") for (x, y), t in zip(grid.xy_l0, grid.tissue, strict=True))
    table = write_csv(folder / GRID_TABLE, ["x", "y", "tissue"], rows)
    # The sidecar goes last: its presence marks the grid complete.
    sidecar = write_json(folder / GRID_SIDECAR, {**grid_metadata(grid), **(extra or {})})
    return table, sidecar


def load_grid(folder: str | Path) -> TileGrid:
    """Read a grid written by :func:`save_grid`."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / GRID_SIDECAR).read_text())
        rows = read_csv(folder / GRID_TABLE)
    except (OSError, json.JSONDecodeError) as e:
        raise SlideError(f"{folder}: no complete tile grid here ({e})") from None
    xy = np.array([[int(r["x"]), int(r["y"])] for r in rows], dtype=np.int64).reshape(-1, 2)
    tissue = np.array([float(r["tissue"]) for r in rows], dtype=np.float32)
    plan = ReadPlan(
        mpp=meta["mpp"],
        tile_px=meta["tile_px"],
        level=meta["level"],
        downsample=meta["downsample"],
        read_px=meta["read_px"],
        tile_l0=meta["tile_l0"],
    )
    spec = GridSpec(
        mpp=meta["mpp"],
        tile_px=meta["tile_px"],
        overlap=meta["overlap"],
        min_tissue=meta["min_tissue"],
        mask_mpp=meta["mask_mpp"],
    )
    return TileGrid(
        slide_path=meta["slide_path"],
        slide_id=meta["slide_id"],
        xy_l0=xy,
        tissue=tissue,
        plan=plan,
        stride_l0=meta["stride_l0"],
        origin_l0=tuple(meta["origin_l0"]),
        spec=spec,
        slide_mpp=meta["slide_mpp"],
        mpp_source=meta["mpp_source"],
        dimensions=tuple(meta["dimensions"]),
        bounds=tuple(meta["bounds"]),
    )


def grid_is_current(
    folder: str | Path, slide_path: str | Path, spec: GridSpec, mpp_override: float | None = None
) -> bool:
    """True if ``folder`` holds a complete grid of this slide file with this spec, made with
    the same level-0 µm/px override (or none)."""
    try:
        meta = json.loads((Path(folder) / GRID_SIDECAR).read_text())
        stat = os.stat(slide_path)
    except (OSError, json.JSONDecodeError):
        return False
    same_spec = dataclasses.asdict(spec) == {
        k: meta.get(k) for k in ("mpp", "tile_px", "overlap", "min_tissue", "mask_mpp")
    }
    if mpp_override is None:
        same_mpp = meta.get("mpp_source") != MPP_FROM_OVERRIDE
    else:
        same_mpp = meta.get("mpp_source") == MPP_FROM_OVERRIDE and meta.get("slide_mpp") == float(
            mpp_override
        )
    return (
        same_spec
        and same_mpp
        and meta.get("slide_size_bytes") == stat.st_size
        and meta.get("slide_mtime") == stat.st_mtime
        and (Path(folder) / GRID_TABLE).exists()
    )

"""Per-slide cell-feature outputs, written atomically into ``OUT/<slide_id>/``.

==================================  ============================================================
``tiles.csv``                       x, y (level-0 top-left), tissue fraction, then every cell
                                    feature of :mod:`cscvision.cells.tiles` per tissue tile
``maps.npz``                        one map per drawn density (key ``density_<type>``, cells /
                                    mm² of tissue; NaN off the tiles; their names in ``targets``,
                                    so ``read_outputs`` reads the folder), ``tissue``,
                                    ``transform`` = level-0 (x0, y0, px_l0), ``slide_mpp``
``overlay_density_<type>.png``      thumbnail + density heatmap, colour bar in cells/mm²
``<id>_density_<type>.tif``         pyramidal uint8 map (ASAP, QuPath): 255 = the colour bar's
                                    top (``summary.json`` ``maps`` gives it per type)
``<id>.geojson``                    QuPath tiles whose measurements are the tile's features
``summary.json``                    cells per type, densities over the tiles' tissue, settings,
                                    the cell table used; written last (marks the slide complete)
==================================  ============================================================

``cscvision view OUT`` shows each density map as a layer (``summary.json`` ``targets``: drawn
over its ``value_range``, outlined at half of it).

The maps hold one value per tile (map pixel = tile: the cell grid never overlaps), drawn by
the same writers as ``cscvision infer``'s (:mod:`cscvision.outputs.overlay`,
:mod:`~cscvision.outputs.likelihood`, :mod:`~cscvision.outputs.geojson`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cscvision.cells.table import CellTable
from cscvision.cells.tiles import TileCellFeatures, node_totals
from cscvision.cells.types import cell_types
from cscvision.core.geometry import MapTransform
from cscvision.core.io import inside, write_csv, write_json, write_png
from cscvision.core.palette import target_colors
from cscvision.outputs.geojson import tile_features, write_geojson
from cscvision.outputs.likelihood import write_likelihood_map
from cscvision.outputs.overlay import heat_image, render_overlay
from cscvision.outputs.slide_folder import clear_partial, write_npz
from cscvision.slides.grid import TileGrid

SUMMARY = "summary.json"
TILES = "tiles.csv"
MAPS = "maps.npz"
KIND = "cscvision cells"
DENSITY_UNIT = "cells/mm²"


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 × 10^k at or above ``value`` (a colour bar's top)."""
    if not value > 0 or not math.isfinite(value):
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value * (1 - 1e-9):
            return float(step * power)
    return float(10 * power)


def tile_maps(grid: TileGrid, values: np.ndarray) -> tuple[np.ndarray, MapTransform]:
    """Per-tile ``values`` [N, K] laid on the grid, float32[K, rows, cols], NaN off the tiles."""
    rows, cols = grid.shape()
    cells = grid.cells()
    maps = np.full((values.shape[1], rows, cols), np.nan, np.float32)
    maps[:, cells[:, 1], cells[:, 0]] = values.T
    transform = MapTransform(float(grid.origin_l0[0]), float(grid.origin_l0[1]), grid.stride_l0)
    return maps, transform


def write_tiles_csv(path: Path, grid: TileGrid, feats: TileCellFeatures) -> Path:
    names = list(feats.columns)
    values = np.column_stack([feats.columns[n] for n in names]) if names else None
    rows = (
        [int(x), int(y), f"{t:.4f}", *(_fmt(v) for v in values[i])]
        for i, ((x, y), t) in enumerate(zip(grid.xy_l0, grid.tissue, strict=True))
    )
    return write_csv(path, ["x", "y", "tissue", *names], rows)


def _fmt(value: float) -> str:
    return "" if not np.isfinite(value) else f"{value:.6g}"


def _overlay(grid, thumb, mask, unit_map, transform, node, top, rgb) -> np.ndarray:
    heat = heat_image(
        thumb,
        mask,
        unit_map,
        transform,
        grid.dimensions,
        region=np.zeros(unit_map.shape, bool),
        contour_rgb=rgb,
    )
    return render_overlay(
        heat,
        title=f"{grid.slide_id} — {node} density",
        subtitle=(
            f"cells per mm² of tissue · tiles of {grid.plan.tile_px} px at "
            f"{grid.plan.mpp:g} µm/px · {len(grid)} tiles · research use only"
        ),
        target=f"{node} density",
        threshold=None,
        contour_rgb=rgb,
        min_tissue=grid.spec.min_tissue,
        value_range=(0.0, top),
        unit=DENSITY_UNIT,
    )


def _geojson_tiles(grid: TileGrid, feats: TileCellFeatures) -> Iterator[dict]:
    names = list(feats.columns)
    values = np.column_stack([feats.columns[n] for n in names])
    offset = (int(grid.bounds[0]), int(grid.bounds[1]))
    for feature in tile_features(
        grid.xy_l0, values, grid.plan.tile_l0, names, offset, slide_id=grid.slide_id
    ):
        m = feature["properties"]["measurements"]  # NaN is no JSON: a missing measurement
        feature["properties"]["measurements"] = {k: v for k, v in m.items() if math.isfinite(v)}
        yield feature


def write_cell_outputs(
    folder: str | Path,
    grid: TileGrid,
    feats: TileCellFeatures,
    table: CellTable,
    *,
    thumb: np.ndarray,
    mask: np.ndarray,
    map_nodes: Sequence[str],
    record: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write every output of one slide into ``folder``; returns the summary (written last).
    ``record`` (settings, the cell table's identity) and ``extra`` (the immune phenotype)
    go into the summary as they are."""
    folder = Path(folder)
    geojson_name = f"{grid.slide_id}.geojson"
    if inside(folder, folder / geojson_name).parent != folder.resolve():
        raise ValueError(f"slide id {grid.slide_id!r}: not a plain file name; use a safe id")
    clear_partial(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [write_tiles_csv(folder / TILES, grid, feats)]
    drawn = [n for n in map_nodes if f"density_{n}" in feats.columns]
    values = np.column_stack(
        [feats.columns[f"density_{n}"] for n in drawn] or [np.zeros(len(grid))]
    )
    maps, transform = tile_maps(grid, values)
    tissue_map = tile_maps(grid, grid.tissue[:, None].astype(np.float64))[0][0]
    arrays = {f"density_{n}": maps[i] for i, n in enumerate(drawn)}
    arrays.update(
        tissue=np.nan_to_num(tissue_map),
        transform=transform.as_array(),
        targets=np.array([f"density_{n}" for n in drawn], dtype=str),  # read_outputs' key
        slide_mpp=np.float64(grid.slide_mpp),
        bounds=np.array(grid.bounds, np.int64),
        dimensions=np.array(grid.dimensions, np.int64),
    )
    written.append(write_npz(folder / MAPS, arrays))
    colours = target_colors(drawn, {})
    ranges = {}
    for i, node in enumerate(drawn):
        finite = maps[i][np.isfinite(maps[i])]
        top = nice_ceiling(float(np.percentile(finite, 99)) if finite.size else 0.0)
        ranges[node] = [0.0, top]
        unit_map = maps[i] / top
        tif = folder / f"{grid.slide_id}_density_{node}.tif"
        written.append(
            write_likelihood_map(
                tif, unit_map, transform, dimensions=grid.dimensions, slide_mpp=grid.slide_mpp
            )
        )
        image = _overlay(grid, thumb, mask, unit_map, transform, node, top, colours[node])
        written.append(write_png(folder / f"overlay_density_{node}.png", image))
    written.append(write_geojson(folder / geojson_name, _geojson_tiles(grid, feats)))
    summary = _summary(grid, feats, table, ranges, record, [p.name for p in written])
    summary.update(extra or {})
    write_json(folder / SUMMARY, summary)
    return summary


def _summary(grid, feats, table, ranges, record, outputs) -> dict[str, Any]:
    hierarchy = cell_types()
    area_mm2 = float((grid.tissue * (grid.plan.tile_l0 * grid.slide_mpp / 1000) ** 2).sum())
    in_tiles = {n: float(np.nansum(feats.columns[f"count_{n}"])) for n in feats.nodes}
    return {
        "kind": KIND,
        "slide_id": grid.slide_id,
        "slide_path": str(Path(grid.slide_path).resolve()),
        "slide_mpp": grid.slide_mpp,
        "mpp_source": grid.mpp_source,
        "tile_px": grid.plan.tile_px,
        "mpp": grid.plan.mpp,
        "tile_l0": grid.plan.tile_l0,
        "n_tiles": len(grid),
        "tissue_mm2_tiles": round(area_mm2, 6),
        "cells": {
            "source": table.source,
            "source_version": table.source_version,
            "n_cells": len(table),
            "in_tiles": feats.cells_in_tiles,
            "outside_tiles": feats.cells_outside,
            "per_type_slide": node_totals(table, feats.nodes, hierarchy),
        },
        "density_per_mm2": {
            n: round(c / area_mm2, 3) if area_mm2 else None for n, c in in_tiles.items()
        },
        "maps": {n: {"unit": DENSITY_UNIT, "value_range": r} for n, r in ranges.items()},
        # the viewer's layers: one per map, drawn over value_range, outlined at half its top
        "targets": {
            f"density_{n}": {"threshold": 0.5, "value_range": r, "unit": DENSITY_UNIT}
            for n, r in ranges.items()
        },
        "dimensions": list(grid.dimensions),
        "resolution": {"slide_mpp": grid.slide_mpp, "mpp": grid.plan.mpp},
        "features": list(feats.columns),
        **record,
        "outputs": outputs,
    }


def cell_outputs_complete(folder: str | Path, record: dict[str, Any]) -> bool:
    """True if ``folder/summary.json`` is a cells summary with this ``record`` and every
    output it lists is there."""
    folder = Path(folder)
    try:
        summary = json.loads((folder / SUMMARY).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (
        summary.get("kind") == KIND
        and all(summary.get(k) == v for k, v in record.items())
        and all((folder / name).is_file() for name in summary.get("outputs", []))
    )

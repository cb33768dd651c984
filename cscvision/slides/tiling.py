"""``cscvision tile``: one folder per slide with the tile grid, its sidecar and ``tissue.png``."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from cscvision.core.io import write_png
from cscvision.slides.batch import SlideJob, slide_dir
from cscvision.slides.grid import (
    GRID_SIDECAR,
    GridSpec,
    TileGrid,
    detect_tissue,
    grid_is_current,
    make_grid,
    save_grid,
)
from cscvision.slides.info import CorruptTileError
from cscvision.slides.slide import Slide, SlideError, open_slide

TISSUE_PNG = "tissue.png"
TILES_DIR = "tiles"
PREVIEW_MAX_PX = 1600


def preview_mpp(slide: Slide, max_px: int = PREVIEW_MAX_PX) -> float:
    """µm/px at which the slide's longest side is about ``max_px`` (never finer than 1 µm/px)."""
    longest = max(slide.info.dimensions)
    return max(1.0, slide.info.mpp * longest / max_px)


def draw_tissue_preview(
    thumb: np.ndarray, mask: np.ndarray, grid: TileGrid, thumb_mpp: float
) -> np.ndarray:
    """The thumbnail with glass dimmed, the tissue outline kept bright and kept tiles outlined."""
    mask_big = np.asarray(
        Image.fromarray(mask.astype(np.uint8) * 255).resize(
            (thumb.shape[1], thumb.shape[0]), Image.Resampling.NEAREST
        )
    )
    shown = thumb.astype(np.float32)
    shown[mask_big == 0] = shown[mask_big == 0] * 0.45 + 255 * 0.15
    image = Image.fromarray(shown.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    scale = grid.slide_mpp / thumb_mpp
    side = grid.plan.tile_l0 * scale
    for x, y in grid.xy_l0:
        x0, y0 = x * scale, y * scale
        draw.rectangle([x0, y0, x0 + side, y0 + side], outline=(0, 160, 255), width=1)
    return np.asarray(image)


def export_tile_images(
    slide: Slide, grid: TileGrid, folder: Path, *, skip_corrupt: bool = False
) -> np.ndarray:
    """Write each tile as ``<slide_id>_x<X>_y<Y>.png`` (level-0 corner) into ``folder``;
    returns a bool[N] mask of the tiles written (False: skipped as corrupt).

    Written into a partial folder that then replaces ``folder``: no tiles of an older grid stay.
    """
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    written = np.ones(len(grid), bool)
    slide.reserve_raster(grid.plan)
    bar = tqdm(grid.xy_l0, desc=f"{grid.slide_id} tiles", unit="tile", leave=False)
    for k, (x, y) in enumerate(bar):
        try:
            rgb = slide.read_tile((int(x), int(y)), grid.plan)
        except CorruptTileError:
            if not skip_corrupt:
                shutil.rmtree(partial, ignore_errors=True)
                raise
            written[k] = False
            continue
        write_png(partial / f"{grid.slide_id}_x{x}_y{y}.png", rgb)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return written


def tile_slide(
    job: SlideJob,
    out_dir: str | Path,
    spec: GridSpec,
    *,
    export_tiles: bool = False,
    on_corrupt_tile: str = "fail",
) -> TileGrid:
    """Detect tissue, cut the grid and write the slide's folder; raises SlideError if no tissue.

    With ``export_tiles`` and ``on_corrupt_tile="skip"``, tiles that cannot be decoded are
    dropped from the grid and listed in the sidecar (``corrupt_tiles``)."""
    corrupt: dict = {}
    folder = slide_dir(out_dir, job.slide_id)
    # The sidecar marks the folder complete: drop an older one before changing anything.
    (folder / GRID_SIDECAR).unlink(missing_ok=True)
    with open_slide(job.slide_path, mpp=job.mpp) as slide:
        _, mask = detect_tissue(slide, spec.mask_mpp)
        grid = replace(make_grid(slide, spec, mask=mask), slide_id=job.slide_id)
        shown_mpp = preview_mpp(slide)
        preview = draw_tissue_preview(slide.thumbnail(shown_mpp), mask, grid, shown_mpp)
        write_png(folder / TISSUE_PNG, preview)
        if len(grid) == 0:
            raise SlideError(
                f"{job.slide_path}: no tissue tiles (tissue covers {mask.mean():.1%} of the "
                f"thumbnail; no tile reaches --min-tissue {spec.min_tissue}); "
                f"see {folder / TISSUE_PNG}"
            )
        if export_tiles:
            skip = on_corrupt_tile == "skip"
            written = export_tile_images(slide, grid, folder / TILES_DIR, skip_corrupt=skip)
            corrupt = corrupt_tiles_record(grid.xy_l0[~written])
            grid = replace(grid, xy_l0=grid.xy_l0[written], tissue=grid.tissue[written])
        else:  # tiles of an older grid would pass for this one's on an --export-tiles re-run
            shutil.rmtree(folder / TILES_DIR, ignore_errors=True)
    save_grid(grid, folder, extra=corrupt)
    return grid


def corrupt_tiles_record(xy_l0: np.ndarray) -> dict:
    """The ``corrupt_tiles`` entry of a sidecar or summary: count and level-0 corners."""
    return {"corrupt_tiles": {"count": len(xy_l0), "xy_l0": [[int(x), int(y)] for x, y in xy_l0]}}


def tiling_complete(job: SlideJob, out_dir: str | Path, spec: GridSpec, export_tiles: bool) -> bool:
    folder = slide_dir(out_dir, job.slide_id)
    if not grid_is_current(folder, job.slide_path, spec, job.mpp):
        return False
    if export_tiles and not (folder / TILES_DIR).is_dir():
        return False
    return (folder / TISSUE_PNG).exists() and (folder / GRID_SIDECAR).exists()

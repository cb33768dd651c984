"""cscvision plugin for peer_bench/bench.py (adapted from the template to cscvision's API).

    python bench.py SLIDE --plugin cscvision_plugin.py \
        --python cscvision=PROJECT/.venv/bin/python

Copied from ../shared/peer_bench/cscvision_plugin.py with the stage layout's imports
(cscvision.slides.slide, cscvision.slides.grid, cscvision.slides.fastread).

grid:  cscvision.slides.slide.open_slide -> cscvision.slides.grid.make_grid(slide,
       GridSpec(mpp, tile_px, min_tissue=bench.MIN_TISSUE, mask_mpp=bench.MASK_MPP))
       -> TileGrid.xy_l0
       (thumbnail at mask_mpp, tissue_mask, integral-image tissue fraction per cell).
read:  open_slide (fast JPEG path: StoredTileReader, falls back to OpenSlide) +
       plan_read(info, mpp, tile_px) + Slide.read_tile(xy, plan) per coordinate
       (the same call cscvision's TileBatches uses in inference and training).
cscvision-openslide: the same Slide.read_tile with fast=False (OpenSlide read_region,
       RGBA->RGB on white, same resize), i.e. cscvision without its fast path.
"""

import bench


@bench.grid(
    "cscvision",
    # open_slide's own modules, imported before the clock as the readers' are: the grid
    # column times opening, the mask and the coordinates, not loading libraries.
    imports=(
        "numpy",
        "cscvision.slides.slide",
        "cscvision.slides.grid",
        "cscvision.slides.fastread",
        "tifffile",
    ),
    note="open_slide + make_grid(GridSpec(mpp, tile_px, min_tissue, mask_mpp)).xy_l0",
)
def grid_cscvision(slide_path, tile_px, mpp):
    from cscvision.slides.grid import GridSpec, make_grid
    from cscvision.slides.slide import open_slide

    spec = GridSpec(
        mpp=mpp, tile_px=tile_px, overlap=0.0, min_tissue=bench.MIN_TISSUE, mask_mpp=bench.MASK_MPP
    )
    with open_slide(slide_path) as slide:  # as `cscvision tile` opens it (fast path on)
        return make_grid(slide, spec).xy_l0


def _read(slide_path, coords, tile_px, mpp, fast):
    from cscvision.slides.slide import open_slide, plan_read

    n = 0
    with open_slide(slide_path, fast=fast) as slide:
        if fast and not slide.uses_fast_path:
            raise bench.NotSupported("cscvision fast path not used for this slide")
        plan = plan_read(slide.info, mpp=mpp, tile_px=tile_px)
        slide.reserve_raster(plan)  # as TileBatches does: the harness reads in raster order
        read_tile = slide.read_tile
        emit = bench.emit
        for x, y in coords:
            emit(read_tile((int(x), int(y)), plan))
            n += 1
    return n


@bench.reader(
    "cscvision",
    imports=(
        "numpy",
        "cscvision.slides.slide",
        "cscvision.slides.fastread",
        "tifffile",
        "simplejpeg",
        "PIL.Image",
    ),
    note="cscvision open_slide (fast JPEG path) + plan_read + Slide.read_tile",
)
def read_cscvision(slide_path, coords, tile_px, mpp):
    return _read(slide_path, coords, tile_px, mpp, fast=True)


@bench.reader(
    "cscvision-openslide",
    imports=("numpy", "cscvision.slides.slide", "PIL.Image"),
    note="cscvision Slide.read_tile with fast=False (OpenSlide read_region path)",
)
def read_cscvision_openslide(slide_path, coords, tile_px, mpp):
    return _read(slide_path, coords, tile_px, mpp, fast=False)

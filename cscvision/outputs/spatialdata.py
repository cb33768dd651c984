"""A batch's outputs as one SpatialData zarr: slide images, tile squares, score maps, cells, table.

Per slide ``S`` (element names; coordinate systems ``S_um`` in µm and ``S_level0`` in
level-0 pixels, one pair per slide so slides never overlap):

==================  ===========================================================================
``S_image``         the slide: ``full`` = every pyramid level, read lazily through
                    :class:`~cscvision.slides.slide.Slide` tile by tile while the zarr is
                    written (a full-resolution copy: gigabytes per slide); ``thumbnail`` =
                    one small image; ``none`` = no image
``S_tiles``         one square per tile, in µm (intrinsic frame = ``S_um``)
``S_scores``        the stitched score maps (one channel per target, NaN off the tiles)
``S_cells``         cell centroids (points, µm) with their type, from a ``cscvision cells``
                    folder when given
``tiles`` (table)   the tile AnnData (:mod:`cscvision.outputs.anndata`) annotating every
                    ``S_tiles`` (``region``, ``instance_id``)
==================  ===========================================================================

spatialdata is imported only here, only when called.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cscvision.outputs.anndata import (
    ExportError,
    h5ad_ready,
    import_scverse,
    outputs_anndata,
    slide_thumbnail,
    tile_side_l0,
)

if TYPE_CHECKING:
    from cscvision.features.store import FeatureStore
    from cscvision.models.card import ModelCard
    from cscvision.outputs.slide_outputs import SlideOutputs
    from cscvision.slides.slide import Slide

IMAGE_MODES = ("none", "thumbnail", "full")
CHUNK_PX = 1024  # side of one image chunk: what one read (and one zarr chunk) holds
TABLE = "tiles"


def frames(slide_id: str, mpp: float, intrinsic: str) -> dict[str, Any]:
    """Transformations from an element's frame (``"um"`` or ``"level0"``) to both systems."""
    from spatialdata.transformations import Identity, Scale

    to_um = Scale([mpp, mpp], axes=("y", "x"))
    to_l0 = Scale([1 / mpp, 1 / mpp], axes=("y", "x"))
    if intrinsic == "um":
        return {f"{slide_id}_um": Identity(), f"{slide_id}_level0": to_l0}
    return {f"{slide_id}_level0": Identity(), f"{slide_id}_um": to_um}


def lazy_level(slide: Slide, level: int, chunk_px: int = CHUNK_PX):
    """Pyramid ``level`` of ``slide`` as a dask array (c, y, x) uint8: each chunk is one
    ``read_region`` when it is computed; nothing is read before."""
    import dask.array as da

    w, h = slide.info.level_dimensions[level]
    ds = slide.info.level_downsamples[level]
    chunks = ((3,), _splits(h, chunk_px), _splits(w, chunk_px))

    def read(block_info=None):
        (_, _), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        rgb = slide.read_region((round(x0 * ds), round(y0 * ds)), level, (x1 - x0, y1 - y0))
        return np.ascontiguousarray(rgb.transpose(2, 0, 1))

    return da.map_blocks(read, chunks=chunks, dtype=np.uint8, meta=np.empty((0, 0, 0), np.uint8))


def _splits(n: int, step: int) -> tuple[int, ...]:
    return tuple(min(step, n - i) for i in range(0, n, step))


def pyramid_image(slide: Slide, slide_id: str):
    """Every level of ``slide`` as a lazily read multiscale image (a DataTree)."""
    import xarray as xr
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import set_transformation

    levels = {}
    for level in range(slide.info.level_count):
        data = lazy_level(slide, level)
        array = xr.DataArray(data, dims=("c", "y", "x"), coords={"c": ["r", "g", "b"]})
        levels[f"scale{level}"] = xr.Dataset({"image": array})
    tree = xr.DataTree.from_dict(levels)
    set_transformation(tree, frames(slide_id, slide.info.mpp, "level0"), set_all=True)
    Image2DModel().validate(tree)
    return tree


def thumbnail_image(slide: SlideOutputs):
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale, Sequence

    thumb, px_per_um = slide_thumbnail(slide)
    um_per_px = 1 / px_per_um
    own = Scale([um_per_px, um_per_px], axes=("y", "x"))
    systems = frames(slide.slide_id, slide.slide_mpp, "um")
    return Image2DModel.parse(
        thumb.transpose(2, 0, 1),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations={k: Sequence([own, v]) for k, v in systems.items()},
    )


def tile_shapes(slide: SlideOutputs):
    """One square per tile in µm, indexed 0..N-1 in ``tiles.csv`` order."""
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel

    side_um = tile_side_l0(slide) * slide.slide_mpp
    x0 = slide.tiles["x"].to_numpy(np.float64) * slide.slide_mpp
    y0 = slide.tiles["y"].to_numpy(np.float64) * slide.slide_mpp
    squares = shapely.box(x0, y0, x0 + side_um, y0 + side_um)
    gdf = gpd.GeoDataFrame(geometry=squares, index=np.arange(len(squares)))
    return ShapesModel.parse(gdf, transformations=frames(slide.slide_id, slide.slide_mpp, "um"))


def score_image(slide: SlideOutputs):
    """The stitched maps (float32, one channel per target) on their level-0 grid."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale, Sequence, Translation

    t = slide.transform
    yx = ("y", "x")
    own = Sequence([Scale([t.px_l0, t.px_l0], axes=yx), Translation([t.y0_l0, t.x0_l0], axes=yx)])
    systems = frames(slide.slide_id, slide.slide_mpp, "level0")
    stack = np.stack([slide.maps[k] for k in slide.targets]).astype(np.float32)
    return Image2DModel.parse(
        stack,
        dims=("c", "y", "x"),
        c_coords=list(slide.targets),
        transformations={k: Sequence([own, v]) for k, v in systems.items()},
    )


def cell_points(cells: SlideOutputs):
    import pandas as pd
    from spatialdata.models import PointsModel

    from cscvision.outputs.anndata import _cell_table

    table = _cell_table(cells)
    mpp = float(table.mpp or cells.slide_mpp)
    frame = pd.DataFrame(
        {"x": table.x * mpp, "y": table.y * mpp, "cell_type": table.cell_type.astype(str)}
    )
    return PointsModel.parse(frame, transformations=frames(cells.slide_id, cells.slide_mpp, "um"))


def outputs_spatialdata(
    outputs: Mapping[str, SlideOutputs],
    *,
    image: str = "thumbnail",
    slides: Mapping[str, Slide] | None = None,
    stores: Mapping[str, FeatureStore] | None = None,
    patients: Mapping[str, str] | None = None,
    cells: Mapping[str, SlideOutputs] | None = None,
    card: ModelCard | None = None,
):
    """The batch as a SpatialData object (see the module doc); ``image="full"`` needs the
    open ``slides`` (slide id → :class:`Slide`), which must stay open until it is written."""
    sd = import_scverse("spatialdata")
    from spatialdata.models import TableModel

    if image not in IMAGE_MODES:
        raise ExportError(f"--image {image!r}: one of {', '.join(IMAGE_MODES)}")
    images, shapes, points = {}, {}, {}
    for sid, slide in outputs.items():
        shapes[f"{sid}_tiles"] = tile_shapes(slide)
        images[f"{sid}_scores"] = score_image(slide)
        if image == "full":
            images[f"{sid}_image"] = pyramid_image((slides or {})[sid], sid)
        elif image == "thumbnail":
            images[f"{sid}_image"] = thumbnail_image(slide)
        if cells is not None and sid in cells:
            points[f"{sid}_cells"] = cell_points(cells[sid])
    adata = outputs_anndata(
        outputs, stores=stores, patients=patients, cells=cells, images=False, card=card
    )
    adata.obs["region"] = [f"{s}_tiles" for s in adata.obs["slide_id"]]
    adata.obs["instance_id"] = np.concatenate([np.arange(len(s.tiles)) for s in outputs.values()])
    adata.obs = h5ad_ready(adata.obs, ("region",))
    table = TableModel.parse(
        adata, region=list(shapes), region_key="region", instance_key="instance_id"
    )
    return sd.SpatialData(images=images, shapes=shapes, points=points, tables={TABLE: table})


def write_spatialdata(sdata, path: str | Path) -> Path:
    """Write ``sdata`` to the zarr folder ``path`` through a temporary folder beside it,
    renamed into place when complete (one chunk in memory at a time: synchronous dask)."""
    import dask

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with dask.config.set(scheduler="synchronous"):
            sdata.write(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path

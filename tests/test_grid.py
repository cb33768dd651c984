"""Grid arithmetic at edges and with overlap, bounds offsets, saving and loading."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ArraySlide, tissue_like

from cscvision.slides.grid import (
    GridSpec,
    grid_coords,
    grid_is_current,
    load_grid,
    make_grid,
    save_grid,
    slide_id_of,
)
from cscvision.slides.slide import open_slide
from cscvision.testing import write_pyramid


def test_grid_covers_extent_with_edge_tile():
    xy = grid_coords((1000, 500), tile_l0=224, stride_l0=224)
    assert xy[:, 0].max() == 896 and xy[:, 1].max() == 448  # last tiles run past the edge
    assert len(np.unique(xy[:, 0])) == 5 and len(np.unique(xy[:, 1])) == 3
    assert (xy[:, 0].max() + 224) >= 1000


def test_grid_exact_fit_has_no_extra_tile():
    xy = grid_coords((896, 448), tile_l0=224, stride_l0=224)
    assert len(xy) == 4 * 2


def test_grid_overlap_and_origin():
    xy = grid_coords((448, 224), tile_l0=224, stride_l0=112, origin=(10, 20))
    assert xy[:, 0].tolist() == [10, 122, 234]
    assert set(xy[:, 1].tolist()) == {20}


def test_grid_raster_order():
    xy = grid_coords((600, 600), 224, 224)
    assert xy[:3].tolist() == [[0, 0], [224, 0], [448, 0]]


def test_tiny_slide_gets_one_tile():
    assert grid_coords((100, 50), 224, 224).tolist() == [[0, 0]]


def test_make_grid_keeps_tissue_tiles_only():
    rgb = tissue_like(2048, 2048, box=(512, 512, 1536, 1536))
    slide = ArraySlide.make(rgb, mpp=0.5)
    grid = make_grid(slide, GridSpec(tile_px=256, min_tissue=0.9))
    x, y = grid.xy_l0[:, 0], grid.xy_l0[:, 1]
    assert len(grid) == 16
    assert x.min() == 512 and y.min() == 512 and x.max() == 1280
    assert (grid.tissue >= 0.9).all()
    assert grid.cells().min() == 2 and grid.shape() == (8, 8)


def test_make_grid_with_bounds_offset_starts_at_bounds():
    rgb = tissue_like(1200, 1200, box=(300, 300, 1200, 1200))
    slide = ArraySlide.make(rgb, mpp=0.5, bounds=(300, 300, 900, 900))
    grid = make_grid(slide, GridSpec(tile_px=300, min_tissue=0.5))
    assert grid.origin_l0 == (300, 300)
    assert sorted(set(grid.xy_l0[:, 0].tolist())) == [300, 600, 900]
    assert grid.shape() == (3, 3)


def test_make_grid_with_overlap_and_resize(tmp_path):
    path = write_pyramid(
        tmp_path / "s.tif", tissue_like(2048, 2048, box=(0, 0, 2048, 2048)), mpp=0.25
    )
    with open_slide(path) as slide:
        grid = make_grid(slide, GridSpec(mpp=0.5, tile_px=128, overlap=0.5, min_tissue=0.5))
    assert grid.plan.level == 1 and grid.plan.tile_l0 == 256
    assert grid.stride_l0 == 128
    assert np.diff(np.unique(grid.xy_l0[:, 0])).tolist() == [128] * 14


def test_save_load_roundtrip_and_currency(tmp_path):
    path = write_pyramid(tmp_path / "s.tif", tissue_like(1024, 1024), mpp=0.5, levels=2)
    spec = GridSpec(tile_px=128)
    with open_slide(path) as slide:
        grid = make_grid(slide, spec)
    save_grid(grid, tmp_path / "out")
    loaded = load_grid(tmp_path / "out")
    assert np.array_equal(loaded.xy_l0, grid.xy_l0)
    assert np.allclose(loaded.tissue, grid.tissue, atol=1e-4)
    assert loaded.plan == grid.plan and loaded.spec == grid.spec
    assert grid_is_current(tmp_path / "out", path, spec)
    assert not grid_is_current(tmp_path / "out", path, GridSpec(tile_px=256))


def test_spec_validation():
    with pytest.raises(ValueError, match="overlap"):
        GridSpec(overlap=1.0)


def test_slide_id():
    assert slide_id_of("/a/b/case-01.svs") == "case-01"
    assert slide_id_of("x.ome.tiff") == "x"


def test_spec_rejects_bad_mask_mpp_and_min_tissue():
    with pytest.raises(ValueError, match="mask_mpp"):
        GridSpec(mask_mpp=0)
    with pytest.raises(ValueError, match="min_tissue"):
        GridSpec(min_tissue=50)


def test_save_grid_failure_leaves_no_sidecar_of_an_older_grid(tmp_path, monkeypatch):
    import cscvision.slides.grid

    path = write_pyramid(tmp_path / "s.tif", tissue_like(1024, 1024), mpp=0.5, levels=2)
    with open_slide(path) as slide:
        grid = make_grid(slide, GridSpec(tile_px=128))
    save_grid(grid, tmp_path / "out")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cscvision.slides.grid, "write_csv", crash)
    with pytest.raises(OSError):
        save_grid(grid, tmp_path / "out")
    assert not (tmp_path / "out" / "tiles.json").exists()  # the old one no longer vouches


def test_saved_files_are_readable_by_group_as_umask_allows(tmp_path):
    import os
    import stat

    path = write_pyramid(tmp_path / "s.tif", tissue_like(512, 512), mpp=0.5, levels=1)
    with open_slide(path) as slide:
        grid = make_grid(slide, GridSpec(tile_px=128))
    old = os.umask(0o022)
    try:
        table, sidecar = save_grid(grid, tmp_path / "out")
    finally:
        os.umask(old)
    for p in (table, sidecar):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p  # not mkstemp's 0o600

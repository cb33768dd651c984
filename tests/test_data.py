"""Training data: cached tile tables, batch datasets, DataModule, augmentations, balance."""

from __future__ import annotations

import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch

from cscvision.labels.annotations import DEFAULT_CLASS_MAP, AnnotationError
from cscvision.labels.cohort import read_cohort
from cscvision.slides.grid import GridSpec
from cscvision.slides.slide import open_slide
from cscvision.testing import write_pyramid, write_toy_cohort
from cscvision.training.augment import (
    AUGMENT_PRESETS,
    augment_batch,
    dihedral,
    hed_jitter,
    to_unit_float,
)
from cscvision.training.data import (
    DataError,
    TileBatchDataset,
    TileDataModule,
    cache_key,
    pos_weight,
    prepare_cohort,
    prepare_slide,
    sample_weights,
    subsample,
)

SPEC = GridSpec(mpp=2.0, tile_px=32, mask_mpp=4.0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    csv = write_toy_cohort(tmp_path_factory.mktemp("toy"), n_slides=4, n_patients=4)
    return read_cohort(csv)


@pytest.fixture(scope="module")
def tiles(cohort, tmp_path_factory):
    splits = dict(zip([e.slide_id for e in cohort], ["train", "train", "val", "test"], strict=True))
    cache = tmp_path_factory.mktemp("cache")
    return prepare_cohort(
        cohort, splits, spec=SPEC, class_map=DEFAULT_CLASS_MAP, cache_dir=cache, progress=False
    )


def test_prepared_tiles_have_soft_targets(tiles):
    train = tiles["train"][0]
    assert train.xy_l0.dtype == np.int64 and train.xy_l0.shape[1] == 2
    assert train.targets.shape == (len(train), 2)
    assert 0 <= train.targets.min() and train.targets.max() <= 1
    # the toy slides have both targets on part of the tissue, with partial tiles at edges
    assert (train.targets == 1).any() and (train.targets == 0).any()
    assert ((train.targets > 0) & (train.targets < 1)).any()
    assert [len(tiles[s]) for s in ("train", "val", "test")] == [2, 1, 1]


def test_cache_is_reused_and_keyed_by_annotation_mtime(cohort, tmp_path):
    entry = cohort[0]
    first, _ = prepare_slide(
        entry, split="train", spec=SPEC, class_map=DEFAULT_CLASS_MAP, cache_dir=tmp_path
    )
    (folder,) = tmp_path.iterdir()
    key = json.loads((folder / "key.json").read_text())["key"]
    assert key == cache_key(entry.slide_path, entry.annotation_path, SPEC, DEFAULT_CLASS_MAP)
    again, _ = prepare_slide(
        entry, split="train", spec=SPEC, class_map=DEFAULT_CLASS_MAP, cache_dir=tmp_path
    )
    np.testing.assert_array_equal(first.targets, again.targets)
    assert len(list(tmp_path.iterdir())) == 1
    stat = os.stat(entry.annotation_path)
    os.utime(entry.annotation_path, (stat.st_atime, stat.st_mtime + 5))
    assert cache_key(entry.slide_path, entry.annotation_path, SPEC, DEFAULT_CLASS_MAP) != key
    other = GridSpec(mpp=2.0, tile_px=32, mask_mpp=4.0, min_tissue=0.9)
    assert cache_key(entry.slide_path, entry.annotation_path, other, DEFAULT_CLASS_MAP) != key


def test_batches_carry_coordinates_targets_and_slide(tiles):
    dm = TileDataModule(slides=tiles, batch_size=8, num_workers=0)
    ds = dm.datasets["val"]
    batch = ds.__getitems__([5, 0, 3, 11])
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.uint8
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)
    assert batch["xy"].dtype == torch.int64 and batch["target"].dtype == torch.float32
    (val_slide,) = tiles["val"]
    assert dm.slide_ids[int(batch["slide_idx"][0])] == val_slide.slide_id
    row_of = {tuple(xy): i for i, xy in enumerate(val_slide.xy_l0.tolist())}
    with open_slide(val_slide.slide_path) as slide:
        for image, xy, target in zip(batch["image"], batch["xy"], batch["target"], strict=True):
            expected = slide.read_tile(tuple(xy.tolist()), val_slide.plan)
            np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), expected)
            np.testing.assert_array_equal(
                target.numpy(), val_slide.targets[row_of[tuple(xy.tolist())]]
            )


def test_slides_are_opened_lazily_per_worker(tiles):
    dm = TileDataModule(slides=tiles, batch_size=16, eval_batch_size=16, num_workers=2)
    ds = dm.datasets["train"]
    assert ds.open_slide_count() == 0
    seen = [b["xy"] for b in dm.val_dataloader()]
    assert ds.open_slide_count() == 0 and dm.datasets["val"].open_slide_count() == 0
    assert sum(len(x) for x in seen) == len(dm.datasets["val"])
    ds.__getitems__([0])
    assert ds.open_slide_count() == 1
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.open_slide_count() == 0 and len(clone) == len(ds)


def test_train_loader_visits_every_tile_once_per_epoch(tiles):
    dm = TileDataModule(slides=tiles, batch_size=7, num_workers=0, seed=3)
    ds = dm.datasets["train"]
    batches = list(dm.train_dataloader())
    keys = torch.cat([torch.cat([b["slide_idx"][:, None], b["xy"]], 1) for b in batches])
    assert len(keys) == (len(ds) // 7) * 7  # drop_last
    assert len({tuple(k) for k in keys.tolist()}) == len(keys)


def test_balance_weights():
    targets = np.array([[1, 0], [0, 0], [0, 0], [0, 0.5]], np.float32)
    np.testing.assert_allclose(pos_weight(targets), [3.0, 7.0])
    w = sample_weights(targets)
    np.testing.assert_allclose(w, [3.0, 1.0, 1.0, 4.0])
    dm = TileDataModule(slides={}, balance="sampler")
    assert len(dm.datasets["train"]) == 0
    with pytest.raises(ValueError, match="balance"):
        TileDataModule(slides={}, balance="oversample")


def test_subsample_is_seeded_and_keeps_raster_order(tiles):
    slide = tiles["train"][0]
    a, b = subsample(slide, 10, seed=1), subsample(slide, 10, seed=1)
    np.testing.assert_array_equal(a.xy_l0, b.xy_l0)
    assert len(a) == 10 and not np.array_equal(a.xy_l0, subsample(slide, 10, seed=2).xy_l0)
    order = np.lexsort((a.xy_l0[:, 0], a.xy_l0[:, 1]))
    np.testing.assert_array_equal(order, np.arange(10))
    assert subsample(slide, None, 0) is slide


# --- bad input ------------------------------------------------------------------------------------


def _blank_cohort(tmp_path, names, annotations=None):
    rows = ["slide_id,patient_id,slide_path,annotation_path"]
    glass = np.full((512, 512, 3), 243, np.uint8)
    for i, name in enumerate(names):
        write_pyramid(tmp_path / f"{name}.tif", glass, mpp=0.5, tile_px=256, levels=2)
        ann = ""
        if annotations:
            ann = f"{name}.geojson"
            (tmp_path / ann).write_text(json.dumps(annotations))
        rows.append(f"{name},P{i},{name}.tif,{ann}")
    (tmp_path / "cohort.csv").write_text("\n".join(rows) + "\n")
    return read_cohort(tmp_path / "cohort.csv")


def test_slides_without_tissue_are_skipped_then_fatal(cohort, tmp_path):
    blank = _blank_cohort(tmp_path, ["glass"])
    entries = [*cohort[:2], *blank]
    splits = {cohort[0].slide_id: "train", cohort[1].slide_id: "val", "glass": "train"}
    kwargs = dict(spec=SPEC, class_map=DEFAULT_CLASS_MAP, cache_dir=tmp_path / "c", progress=False)
    with pytest.warns(UserWarning, match=r"glass\.tif: no tissue tiles"):
        out = prepare_cohort(entries, splits, **kwargs)
    assert [t.slide_id for t in out["train"]] == [cohort[0].slide_id]
    with pytest.raises(DataError, match="no train slide"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare_cohort(blank, {"glass": "train"}, **kwargs)
    with pytest.raises(DataError, match="cohort is empty"):
        prepare_cohort([], {}, **kwargs)


def _feature(name, ring):
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"objectType": "annotation", "classification": {"name": name}},
    }


def test_annotations_outside_the_slide_name_the_file(cohort, tmp_path):
    far = [[5000, 5000], [6000, 5000], [6000, 6000], [5000, 5000]]
    path = tmp_path / "far.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [_feature("CSC", far)]}))
    entry = cohort[0].__class__(**{**cohort[0].__dict__, "annotation_path": path})
    with pytest.raises(AnnotationError, match=r"far\.geojson.*outside"):
        prepare_slide(
            entry, split="train", spec=SPEC, class_map=DEFAULT_CLASS_MAP, cache_dir=tmp_path
        )


def test_unmapped_classes_warn_once_with_the_list(cohort, tmp_path):
    ring = [[100, 100], [300, 100], [300, 300], [100, 100]]
    path = tmp_path / "odd.geojson"
    features = [_feature("Mystery", ring), _feature("Stemness-rich", ring)]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    entries = [cohort[0].__class__(**{**e.__dict__, "annotation_path": path}) for e in cohort[:2]]
    splits = {entries[0].slide_id: "train", entries[1].slide_id: "val"}
    with pytest.warns(UserWarning, match=r"'Mystery' in .*odd\.geojson") as record:
        prepare_cohort(
            entries,
            splits,
            spec=SPEC,
            class_map=DEFAULT_CLASS_MAP,
            cache_dir=tmp_path / "c",
            progress=False,
        )
    assert sum("Mystery" in str(w.message) for w in record) == 1


# --- augmentations -----------------------------------------------------------------------------


def _tiles_u8(n=6, px=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, px, px), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("preset", sorted(AUGMENT_PRESETS))
def test_presets_keep_shape_dtype_and_range(preset):
    x = to_unit_float(_tiles_u8())
    torch.manual_seed(0)
    y = augment_batch(x, AUGMENT_PRESETS[preset])
    assert y.shape == x.shape and y.dtype == torch.float32
    assert 0 <= float(y.min()) and float(y.max()) <= 1
    if preset == "none":
        assert torch.equal(x, y)


def test_dihedral_moves_pixels_without_changing_them():
    x = to_unit_float(_tiles_u8(n=32))
    torch.manual_seed(0)
    y = dihedral(x)
    # each tile is one of the 8 symmetries of the input tile (content, hence labels, kept)
    for a, b in zip(x, y, strict=True):
        candidates = [torch.rot90(a, k, (1, 2)) for k in range(4)]
        candidates += [c.flip(-1) for c in candidates]
        assert any(torch.equal(b, c) for c in candidates)
    assert not torch.equal(x, y)  # 32 tiles: some moved


def test_marked_region_fraction_survives_every_augmentation():
    x = torch.full((8, 3, 32, 32), 0.9)
    x[:, :, :8, :16] = 0.2  # a dark "annotated" region: 1/8 of each tile
    torch.manual_seed(1)
    y = augment_batch(x, AUGMENT_PRESETS["strong"].__class__(dihedral=True, hed_alpha=0.1))
    dark = (y.mean(dim=1) < 0.55).float().mean(dim=(1, 2))
    torch.testing.assert_close(dark, torch.full((8,), 1 / 8))


def test_hed_jitter_matches_a_numpy_reference_and_is_identity_at_zero():
    from cscvision.training.augment import HED_FROM_RGB, RGB_FROM_HED

    x = to_unit_float(_tiles_u8(n=2, px=8)).clamp_min(1 / 255)
    torch.testing.assert_close(hed_jitter(x, 0.0, 0.0), x, atol=1e-5, rtol=0)
    torch.manual_seed(5)
    y = hed_jitter(x, 0.2, 0.05)
    torch.manual_seed(5)
    alpha = torch.rand(2, 3) * 0.4 + 0.8
    beta = torch.rand(2, 3) * 0.1 - 0.05
    for i in range(2):
        od = -np.log(x[i].permute(1, 2, 0).numpy().astype(np.float64))
        hed = od @ HED_FROM_RGB.numpy() * alpha[i].numpy() + beta[i].numpy()
        ref = np.clip(np.exp(-(hed @ RGB_FROM_HED.numpy())), 0, 1)
        np.testing.assert_allclose(y[i].permute(1, 2, 0).numpy(), ref, atol=1e-4)


def test_dataset_rejects_mixed_tile_sizes(tiles):
    from cscvision.training.data import SlideSource

    a = tiles["train"][0]
    big = a.plan.__class__(**{**a.plan.__dict__, "tile_px": 64})
    sources = [SlideSource(a.slide_path, a.plan, None), SlideSource(a.slide_path, big, None)]
    with pytest.raises(ValueError, match="one size"):
        TileBatchDataset(sources, np.zeros(1, np.int64), np.zeros((1, 2)), np.zeros((1, 2)))


def test_bounds_offset_is_added_to_qupath_geojson_only(tmp_path):
    """QuPath writes coordinates relative to the bounds corner; ASAP writes level-0 ones."""
    from conftest import ArraySlide, tissue_like

    from cscvision.training.data import label_slide

    bx, by = 256, 128
    rgb = tissue_like(1024, 768, box=(0, 0, 1024, 768))
    slide = ArraySlide.make(rgb, bounds=(bx, by, 768, 640))
    spec = GridSpec(mpp=0.5, tile_px=128, mask_mpp=4.0)
    x0, y0, x1, y1 = 512, 384, 768, 640  # level-0 square of 2 x 2 tiles
    xml = tmp_path / "a.xml"
    coords = "".join(
        f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>'
        for i, (x, y) in enumerate([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])
    )
    xml.write_text(
        '<ASAP_Annotations><Annotations><Annotation Name="a" Type="Polygon" '
        f'PartOfGroup="CSC"><Coordinates>{coords}</Coordinates></Annotation></Annotations>'
        "</ASAP_Annotations>"
    )
    geojson = tmp_path / "a.geojson"
    ring = [[x0 - bx, y0 - by], [x1 - bx, y0 - by], [x1 - bx, y1 - by], [x0 - bx, y0 - by]]
    ring.insert(3, [x0 - bx, y1 - by])
    doc = {"type": "FeatureCollection", "features": [_feature("CSC", ring)]}
    geojson.write_text(json.dumps(doc))
    for path in (xml, geojson):
        grid, targets, _, _ = label_slide(slide, path, spec, DEFAULT_CLASS_MAP)
        inside = (grid.xy_l0[:, 0] >= x0) & (grid.xy_l0[:, 0] < x1)
        inside &= (grid.xy_l0[:, 1] >= y0) & (grid.xy_l0[:, 1] < y1)
        assert inside.sum() == 4, path
        np.testing.assert_allclose(targets[:, 0], inside.astype(np.float32), err_msg=str(path))


def test_cache_key_follows_annotation_content_even_with_size_and_mtime_kept(tmp_path):
    """An edit restored with the old mtime (cp -p, rsync -t, unzip) must not hit the cache."""
    slide = tmp_path / "s.tif"
    slide.write_bytes(b"x")
    ann = tmp_path / "a.geojson"
    ann.write_text('{"type": "FeatureCollection", "features": [], "v": 1}')
    stat = os.stat(ann)
    key = cache_key(slide, ann, SPEC, DEFAULT_CLASS_MAP)
    ann.write_text('{"type": "FeatureCollection", "features": [], "v": 2}')
    os.utime(ann, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cache_key(slide, ann, SPEC, DEFAULT_CLASS_MAP) != key


def test_lab_jitter_moves_each_tiles_lab_statistics_by_its_draw():
    """RandStainNA-style jitter: with no spread a tile is unchanged; with a mean shift only,
    the tile's L*a*b* mean moves by the drawn shift (the generator's own draw, replayed)
    and its standard deviations stay."""
    from cscvision.slides.stain import rgb_to_lab
    from cscvision.training.augment import lab_jitter

    g = torch.Generator().manual_seed(0)
    base = torch.tensor([0.75, 0.55, 0.7]).view(1, 3, 1, 1)
    x = (base + 0.08 * torch.rand(3, 3, 16, 16, generator=g)).clamp(0, 1)
    torch.testing.assert_close(lab_jitter(x, (0.0, 0.0, 0.0), 0.0), x, atol=2e-4, rtol=0)
    torch.manual_seed(5)
    out = lab_jitter(x, (3.0, 2.0, 2.0), 0.0)
    torch.manual_seed(5)
    shift = torch.randn(3, 3, 1, 1) * torch.tensor([3.0, 2.0, 2.0]).view(1, 3, 1, 1)
    before, after = rgb_to_lab(x * 255), rgb_to_lab(out * 255)
    moved = after.mean((2, 3)) - before.mean((2, 3))
    torch.testing.assert_close(moved, shift.view(3, 3), atol=0.05, rtol=0)
    torch.testing.assert_close(after.std((2, 3)), before.std((2, 3)), atol=0.05, rtol=0)

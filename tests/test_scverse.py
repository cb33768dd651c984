"""cscvision export anndata / spatialdata, read back by anndata, squidpy, scanpy, spatialdata.

Known answers: tile centres in µm from ``tiles.csv`` corners and ``summary.json``; a tile's
square, carried by spatialdata's own transformations to level-0 pixels, covers exactly the
slide pixels OpenSlide reads there; squidpy's neighbourhood enrichment and cscvision's
colocation quotient agree in sign on two slides of known geometry (a niche: positive;
segregated targets: negative).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cscvision.cli import main
from cscvision.core.geometry import MapTransform
from cscvision.models.card import read_card
from cscvision.outputs.anndata import ExportError, card_json
from cscvision.outputs.read import BatchOutputs, SlideOutputs, read_outputs
from cscvision.outputs.statistics import colocation_quotient, gap_kernel
from cscvision.outputs.summary import DEFAULT_WITHIN_UM

anndata = pytest.importorskip("anndata")


@pytest.fixture(scope="module")
def exported(demo_batch, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("scverse")
    h5ad = out / "tiles.h5ad"
    argv = ["export", "anndata", str(demo_batch["out"]), "--out", str(h5ad)]
    assert main([*argv, "--model", str(demo_batch["model"])]) == 0
    return {"h5ad": h5ad, "out": out, "outputs": read_outputs(demo_batch["out"])}


def test_h5ad_has_one_observation_per_tile_with_centres_in_um(exported):
    adata = anndata.read_h5ad(exported["h5ad"])
    outputs = exported["outputs"]
    assert adata.n_obs == sum(len(s.tiles) for s in outputs.values())
    for sid, slide in outputs.items():
        tiles = pd.read_csv(slide.folder / "tiles.csv")
        summary = json.loads((slide.folder / "summary.json").read_text())
        side, mpp = summary["resolution"]["tile_l0"], summary["resolution"]["slide_mpp"]
        mine = adata[adata.obs["slide_id"] == sid]
        centres = (tiles[["x", "y"]].to_numpy() + side / 2) * mpp
        np.testing.assert_allclose(mine.obsm["spatial"], centres)
        for column in [c for c in tiles.columns if c.startswith("prob_")]:
            np.testing.assert_allclose(mine.obs[column], tiles[column])
            np.testing.assert_allclose(
                mine[:, column.removeprefix("prob_")].X.ravel(), tiles[column]
            )
        entry = adata.uns["spatial"][sid]
        thumb = entry["images"]["hires"]
        w = summary["dimensions"][0]
        assert entry["scalefactors"]["tissue_hires_scalef"] == pytest.approx(
            thumb.shape[1] / (w * mpp)
        )
        assert entry["scalefactors"]["spot_diameter_fullres"] == pytest.approx(side * mpp)
    assert adata.uns["cscvision"]["X"] == "scores"
    card = json.loads(adata.uns["cscvision"]["model_card"])
    want = read_card(exported["outputs"]["SYN-P001-S01"].summary["model"]["name"]).to_json()
    assert card == json.loads(json.dumps(want))  # tuples read back as lists


def test_a_card_of_another_model_is_refused(exported):
    card = read_card("demo")
    other = dataclasses.replace(card, name="someone-else")
    with pytest.raises(ExportError, match=r"someone-else.*made by demo-synthetic"):
        card_json(other, exported["outputs"])


def test_h5ad_reads_back_equal(exported):
    written = anndata.read_h5ad(exported["h5ad"])
    built = exported["outputs"].to_anndata()
    assert list(written.obs.index) == list(built.obs.index)
    assert list(written.obs.columns) == list(built.obs.columns)
    for column in built.obs.columns:  # read back, categories are str where built are object
        mine, back = built.obs[column], written.obs[column]
        if isinstance(mine.dtype, pd.CategoricalDtype):
            assert list(back.astype(str)) == list(mine.astype(str)), column
        else:
            assert back.dtype == mine.dtype, column
            np.testing.assert_array_equal(back.to_numpy(), mine.to_numpy(), err_msg=column)
    np.testing.assert_array_equal(written.X, built.X)
    np.testing.assert_array_equal(written.obsm["spatial"], built.obsm["spatial"])
    for sid in built.uns["spatial"]:
        np.testing.assert_array_equal(
            written.uns["spatial"][sid]["images"]["hires"],
            built.uns["spatial"][sid]["images"]["hires"],
        )


def test_missing_slide_file_is_one_clear_error_and_nothing_written(demo_batch, tmp_path, capsys):
    copy = tmp_path / "infer"
    slide = next(iter(read_outputs(demo_batch["out"]).values()))
    folder = copy / slide.slide_id
    folder.mkdir(parents=True)
    for name in ("tiles.csv", "maps.npz"):
        (folder / name).write_bytes((slide.folder / name).read_bytes())
    summary = dict(slide.summary, slide_path=str(tmp_path / "gone.tiff"))
    (folder / "summary.json").write_text(json.dumps(summary))
    target = tmp_path / "out" / "a.h5ad"
    assert main(["export", "anndata", str(copy), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert "gone.tiff not found" in err and "--no-image" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert main(["export", "anndata", str(copy), "--out", str(target), "--no-image"]) == 0
    assert "spatial" in anndata.read_h5ad(target).uns


def test_core_imports_no_scverse_package_and_export_names_the_extra(demo_batch, tmp_path):
    out = str(demo_batch["out"])
    code = (
        "import sys\n"
        "for m in ('anndata', 'spatialdata', 'squidpy', 'scanpy'): sys.modules[m] = None\n"
        "import cscvision, cscvision.cli\n"
        "cscvision.cli.build_parser()\n"
        "from cscvision.outputs.read import read_outputs\n"
        f"assert len(read_outputs({out!r})) == 2\n"
        "from cscvision.cli import main\n"
        f"raise SystemExit(main(['export', 'anndata', {out!r}, '--out', 'x.h5ad']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 2, done.stderr
    assert 'needs anndata, which is not installed here: pip install "cscvision[scverse]"' in (
        done.stderr
    )
    assert not (tmp_path / "x.h5ad").exists()


# --- squidpy against cscvision's own statistics ---------------------------------------------


def grid_slide(stem: np.ndarray, immuno: np.ndarray, *, mpp: float = 0.25) -> SlideOutputs:
    """A slide whose tiles are the pixels of two 0/1 maps (448 px tiles, no overlap)."""
    side = 448
    rows, cols = np.indices(stem.shape)
    tiles = pd.DataFrame(
        {
            "x": (cols * side).ravel(),
            "y": (rows * side).ravel(),
            "tissue": 1.0,
            "prob_stemness": np.where(stem, 0.9, 0.1).ravel(),
            "prob_immunosuppressive": np.where(immuno, 0.9, 0.1).ravel(),
        }
    )
    maps = {"stemness": stem.astype(np.float32), "immunosuppressive": immuno.astype(np.float32)}
    summary = {"slide_id": "G", "resolution": {"tile_l0": side}, "settings": {}}
    return SlideOutputs(
        slide_id="G", folder=Path("."), tiles=tiles, maps=maps,
        tissue_map=np.ones(stem.shape, np.float32), transform=MapTransform(0, 0, side),
        slide_mpp=mpp, summary=summary,
    )  # fmt: skip


def niche() -> tuple[np.ndarray, np.ndarray]:
    """Stemness blocks, each ringed by immunosuppressive tiles."""
    stem, ring = np.zeros((30, 30), bool), np.zeros((30, 30), bool)
    for r0, c0 in [(3, 3), (3, 18), (18, 3), (18, 18)]:
        ring[r0 - 1 : r0 + 6, c0 - 1 : c0 + 6] = True
        stem[r0 : r0 + 5, c0 : c0 + 5] = True
    return stem, ring & ~stem


def segregated() -> tuple[np.ndarray, np.ndarray]:
    stem, immuno = np.zeros((30, 30), bool), np.zeros((30, 30), bool)
    stem[:, :10], immuno[:, 20:] = True, True
    return stem, immuno


def squidpy_z(slide: SlideOutputs) -> float:
    squidpy = pytest.importorskip("squidpy")
    adata = BatchOutputs({"G": slide}).to_anndata(images=False)
    stem = adata.obs["prob_stemness"] >= 0.5
    immuno = adata.obs["prob_immunosuppressive"] >= 0.5
    labels = np.select([stem & immuno, stem, immuno], ["both", "stemness", "immuno"], "neither")
    adata.obs["cluster"] = pd.Categorical(labels.astype(object))
    tile_um = 448 * slide.slide_mpp
    squidpy.gr.spatial_neighbors(adata, coord_type="generic", radius=1.5 * tile_um)
    squidpy.gr.nhood_enrichment(adata, cluster_key="cluster", n_perms=200, seed=0)
    z = adata.uns["cluster_nhood_enrichment"]["zscore"]
    names = list(adata.obs["cluster"].cat.categories)
    return float(z[names.index("stemness"), names.index("immuno")])


def own_cq(slide: SlideOutputs) -> float:
    a, b = slide.maps["stemness"] > 0.5, slide.maps["immunosuppressive"] > 0.5
    weight = slide.tissue_map.astype(np.float64)
    kernel = gap_kernel(448 * slide.slide_mpp, DEFAULT_WITHIN_UM)
    return float(colocation_quotient(weight * a, (weight * b)[None], weight, kernel)[0])


@pytest.mark.parametrize(("layout", "sign"), [(niche, 1), (segregated, -1)])
def test_squidpy_nhood_enrichment_agrees_in_sign_with_colocation_quotient(layout, sign):
    slide = grid_slide(*layout())
    z, cq = squidpy_z(slide), own_cq(slide)
    assert np.sign(z) == sign, z
    assert np.sign(cq - 1) == sign, cq


# --- feature stores and scanpy ---------------------------------------------------------------


@pytest.mark.slow  # numba compiles umap's and pynndescent's kernels (~30 s of CPU)
def test_embeddings_from_feature_stores_feed_scanpy(exported, tmp_path):
    scanpy = pytest.importorskip("scanpy")
    from cscvision.features.store import FeatureStore, write_feature_store

    rng = np.random.default_rng(0)
    truth = {}
    for sid, slide in exported["outputs"].items():
        xy = slide.tiles[["x", "y"]].to_numpy(np.int32)
        feats = rng.normal(size=(len(xy), 8)).astype(np.float16)
        order = rng.permutation(len(xy))  # stored in another order: matched by corner
        store = FeatureStore(xy[order], feats[order], encoder="test", weights_sha256="0",
                             slide_id=sid)  # fmt: skip
        write_feature_store(tmp_path / f"{sid}.h5", store)
        truth[sid] = feats.astype(np.float32)
    out = tmp_path / "emb.h5ad"
    argv = ["export", "anndata", str(exported["outputs"][sid].folder.parent), "--out", str(out)]
    assert main([*argv, "--features", str(tmp_path), "--no-image"]) == 0
    adata = anndata.read_h5ad(out)
    for sid, feats in truth.items():
        np.testing.assert_array_equal(adata[adata.obs["slide_id"] == sid].X, feats)
    assert adata.uns["cscvision"]["X"] == "feature-store embeddings"
    scanpy.pp.neighbors(adata, use_rep="X", n_neighbors=10)
    scanpy.tl.umap(adata)
    assert adata.obsm["X_umap"].shape == (adata.n_obs, 2)
    assert np.isfinite(adata.obsm["X_umap"]).all()


# --- spatialdata -------------------------------------------------------------------------------


@pytest.mark.slow  # writes both slides' full pyramids
def test_spatialdata_tile_square_lies_over_its_pixels(demo_batch, tmp_path):
    spatialdata = pytest.importorskip("spatialdata")
    import openslide
    from spatialdata.transformations import Identity, get_transformation

    zarr = tmp_path / "batch.zarr"
    argv = ["export", "spatialdata", str(demo_batch["out"]), "--out", str(zarr)]
    assert main([*argv, "--image", "full"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["batch.zarr"]
    sdata = spatialdata.read_zarr(zarr)
    slide = next(iter(read_outputs(demo_batch["out"]).values()))
    sid, side = slide.slide_id, int(slide.summary["resolution"]["tile_l0"])
    shapes = spatialdata.transform(
        sdata.shapes[f"{sid}_tiles"], to_coordinate_system=f"{sid}_level0"
    )
    table = sdata.tables["tiles"]
    rows = table.obs[table.obs["region"] == f"{sid}_tiles"]
    pick = int(np.argmax(slide.tiles["prob_stemness"]))  # a tile with tissue
    row = rows[rows["instance_id"] == pick].iloc[0]
    x, y = int(slide.tiles["x"][pick]), int(slide.tiles["y"][pick])
    assert (row["x_l0"], row["y_l0"]) == (x, y)
    assert row["prob_stemness"] == pytest.approx(slide.tiles["prob_stemness"][pick])
    np.testing.assert_allclose(shapes.geometry[pick].bounds, (x, y, x + side, y + side), atol=1e-6)
    image = sdata.images[f"{sid}_image"]["scale0"]["image"]
    pixels = image[:, y : y + side, x : x + side].values.transpose(1, 2, 0)
    with openslide.OpenSlide(slide.summary["slide_path"]) as osr:
        truth = np.asarray(osr.read_region((x, y), 0, (side, side)).convert("RGB"))
    np.testing.assert_array_equal(pixels, truth)
    assert isinstance(get_transformation(image, f"{sid}_level0"), Identity)
    scores = sdata.images[f"{sid}_scores"]  # its own transformation takes the tile centre
    affine = get_transformation(scores, f"{sid}_level0").to_affine_matrix(
        input_axes=("x", "y"), output_axes=("x", "y")
    )
    col, row_, _ = np.floor(np.linalg.inv(affine) @ [x + side / 2, y + side / 2, 1]).astype(int)
    want_col, want_row = (int(v) for v in slide.transform.to_map(x + side / 2, y + side / 2))
    assert (col, row_) == (want_col, want_row)
    stored = scores.sel(c="stemness").values[row_, col]
    assert stored == pytest.approx(slide.maps["stemness"][want_row, want_col])

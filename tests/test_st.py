"""Spatial transcriptomics: Space Ranger layouts, HEST .h5ad, panel scores, labels st, training."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("scanpy")
pytest.importorskip("pyarrow")

import anndata
import pandas as pd

from cscvision.cli import main as cli_main
from cscvision.labels.cohort import read_cohort
from cscvision.labels.programmes import (
    DEFAULT_PANELS,
    ProgrammeConfig,
    match_genes,
    score_programmes,
)
from cscvision.labels.st import (
    POSITION_COLUMNS,
    STError,
    read_hest,
    read_spaceranger,
    read_st,
    spots_to_level0,
    tile_corners,
)
from cscvision.labels.table import read_label_table
from cscvision.synth import write_cohort
from cscvision.synth.visium import PANEL_GENES, spot_grid
from cscvision.training.tilecache import DataError, prepare_slide


@pytest.fixture(scope="module")
def visium_cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("visium")
    return write_cohort(out, n_slides=2, n_patients=2, size_px=1536, seed=3, visium=True)


@pytest.fixture(scope="module")
def outs(visium_cohort) -> Path:
    return visium_cohort.parent / "SYN-P001-S01_visium" / "outs"


def test_synth_panels_are_the_default_panels():
    assert {k: tuple(v) for k, v in PANEL_GENES.items()} == DEFAULT_PANELS


def test_spot_grid_is_visium_hexagonal():
    grid = spot_grid(2000, 2000, 0.5, 100.0)  # 1 mm square: 200 px pitch
    rows = grid[grid[:, 0] == 0]
    assert np.allclose(np.diff(rows[:, 2]), 200.0)  # 100 µm centre to centre
    assert np.allclose(np.unique(grid[:, 3])[1] - np.unique(grid[:, 3])[0], 100 * np.sqrt(3))
    odd = grid[grid[:, 0] == 1]
    assert (odd[:, 1] % 2 == 1).all() and (rows[:, 1] % 2 == 0).all()  # array_col parity
    assert odd[0, 2] - rows[0, 2] == pytest.approx(100.0)  # odd rows shifted half a pitch


def test_outs_has_space_ranger_files_and_columns(outs):
    assert (outs / "filtered_feature_bc_matrix.h5").exists()
    header = (outs / "spatial" / "tissue_positions.csv").read_text().splitlines()[0]
    assert header == ",".join(POSITION_COLUMNS)
    factors = json.loads((outs / "spatial" / "scalefactors_json.json").read_text())
    assert factors["spot_diameter_fullres"] == pytest.approx(110.0)  # 55 µm at 0.5 µm/px
    assert {"tissue_hires_scalef", "tissue_lowres_scalef", "fiducial_diameter_fullres"} <= set(
        factors
    )


def test_three_position_layouts_give_the_same_spots(outs, tmp_path):
    reference = read_spaceranger(outs)
    assert reference.layout == "spaceranger:tissue_positions.csv" and len(reference) > 10
    table = pd.read_csv(outs / "spatial" / "tissue_positions.csv")
    for layout in ("tissue_positions_list.csv", "tissue_positions.parquet"):
        copy = tmp_path / layout / "outs"
        shutil.copytree(outs, copy)
        (copy / "spatial" / "tissue_positions.csv").unlink()
        if layout.endswith(".parquet"):
            table.to_parquet(copy / "spatial" / layout, index=False)
        else:  # Space Ranger < 2.0: same columns, no header
            table.to_csv(copy / "spatial" / layout, index=False, header=False)
        sample = read_st(copy.parent)  # the run folder above outs/ works too
        assert sample.layout == f"spaceranger:{layout}"
        assert list(sample.adata.obs_names) == list(reference.adata.obs_names)
        np.testing.assert_array_equal(sample.centres_px, reference.centres_px)
        assert sample.n_dropped == reference.n_dropped > 0
        assert (sample.adata.X != reference.adata.X).nnz == 0


def test_spot_centres_are_x_from_pxl_col(outs):
    sample = read_spaceranger(outs)
    table = pd.read_csv(outs / "spatial" / "tissue_positions.csv").set_index("barcode")
    first = table.loc[sample.adata.obs_names[0]]
    assert tuple(sample.centres_px[0]) == (first.pxl_col_in_fullres, first.pxl_row_in_fullres)
    assert (table.loc[sample.adata.obs_names, "in_tissue"] == 1).all()


def test_hest_h5ad_fixture_reads(tmp_path):
    rng = np.random.default_rng(0)
    genes = [*DEFAULT_PANELS["stemness"], *DEFAULT_PANELS["immunosuppressive"]]
    genes += [f"G{i}" for i in range(60)]
    counts = rng.poisson(3, size=(5, len(genes))).astype(np.float32)
    adata = anndata.AnnData(counts)
    # object dtype: anndata 0.12 cannot write pandas 3's Arrow-backed string indexes
    adata.obs_names = pd.Index([f"spot{i}" for i in range(5)], dtype=object)
    adata.var_names = pd.Index(genes, dtype=object)
    adata.obs["in_tissue"] = [1, 1, 1, 0, 1]
    adata.obsm["spatial"] = np.array([[100, 50], [300, 50], [200, 223], [9, 9], [400, 223.5]])
    adata.uns["spatial"] = {"ST": {"scalefactors": {"spot_diameter_fullres": 110.0}}}
    path = tmp_path / "st" / "TENX99.h5ad"
    path.parent.mkdir()
    adata.write_h5ad(path)
    sample = read_st(path)
    assert sample.layout == "hest:h5ad" and len(sample) == 4 and sample.n_dropped == 1
    assert sample.spot_diameter_px == 110.0
    np.testing.assert_array_equal(sample.centres_px[:, 0], [100, 300, 200, 400])
    xy = tile_corners(spots_to_level0(sample.centres_px, (1000, 1000)), 224.0)
    assert xy.tolist()[0] == [-12, -62]  # centred: 100 - 112, 50 - 112
    scores, used = score_programmes(sample.adata, ProgrammeConfig(method="zscore"))
    assert scores.shape == (4, 2) and used["stemness"] == list(DEFAULT_PANELS["stemness"])


def test_hest_spot_diameter_from_metadata_json(tmp_path):
    adata = anndata.AnnData(np.ones((2, 3), np.float32))
    adata.obs_names = pd.Index(["a", "b"], dtype=object)
    adata.var_names = pd.Index(["x", "y", "z"], dtype=object)
    adata.obsm["spatial"] = np.array([[1.0, 2.0], [3.0, 4.0]])
    (tmp_path / "st").mkdir()
    (tmp_path / "metadata").mkdir()
    adata.write_h5ad(tmp_path / "st" / "S1.h5ad")
    meta = {"spot_diameter": 55.0, "pixel_size_um_estimated": 0.25}
    (tmp_path / "metadata" / "S1.json").write_text(json.dumps(meta))
    assert read_hest(tmp_path / "st" / "S1.h5ad").spot_diameter_px == pytest.approx(220.0)


def test_panel_without_genes_names_panel_and_genes():
    panels = {"stemness": ("CD44", "SOX2"), "custom": ("NOPE1", "NOPE2", "CD44")}
    with pytest.raises(STError, match=r"panel 'custom'.*absent: NOPE1, NOPE2.*present: CD44"):
        match_genes(panels, ["CD44", "SOX2", "GAPDH"], source="x.h5")


def test_absent_genes_listed_in_one_warning_and_case_insensitive_match():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = match_genes(DEFAULT_PANELS, ["cd44", "Prom1", "FOXP3", "IL10"], source="m")
    assert found == {"stemness": ["cd44", "Prom1"], "immunosuppressive": ["FOXP3", "IL10"]}
    assert len(caught) == 1 and "SOX2" in str(caught[0].message)
    assert "CD274" in str(caught[0].message)


def test_spots_outside_the_slide_are_an_error():
    with pytest.raises(STError, match="outside the 100x100 px slide"):
        spots_to_level0(np.array([[50.0, 50.0], [150.0, 20.0]]), (100, 100), source="outs")
    xy = spots_to_level0(np.array([[10.0, 20.0]]), (100, 100), scale=2.0, offset_px=(5, 1))
    assert xy.tolist() == [[25.0, 41.0]]


def test_scores_follow_the_ground_truth(outs):
    sample = read_spaceranger(outs)
    truth = pd.read_csv(outs.parent / "spot_truth.csv").set_index("barcode")
    truth = truth.loc[list(sample.adata.obs_names)]
    for method in ("score_genes", "zscore"):
        scores, _ = score_programmes(sample.adata, ProgrammeConfig(method=method))
        for j, name in enumerate(("stemness", "immunosuppressive")):
            if truth[f"{name}_fraction"].std() > 0.05:
                r = np.corrcoef(scores[:, j], truth[f"{name}_fraction"])[0, 1]
                assert r > 0.6, (method, name, r)


def test_labels_st_cli_writes_tables_and_a_train_cohort(visium_cohort, tmp_path, capsys):
    panels = tmp_path / "panels.yaml"
    panels.write_text("tile_px: 56\nmpp: 2.0\nbinarize_quantile: 0.75\nmethod: zscore\n")
    out = tmp_path / "labels"
    args = ["labels", "st", str(visium_cohort), "--panels", str(panels), "--out", str(out)]
    assert cli_main(args) == 0
    assert "wrote 2 of 2 tile-label tables" in capsys.readouterr().out
    entries = read_cohort(out / "cohort.csv")
    assert [e.slide_id for e in entries] == ["SYN-P001-S01", "SYN-P002-S01"]
    table = read_label_table(entries[0].label_path)
    assert table.source == "st" and (table.tile_px, table.mpp) == (56, 2.0)
    assert table.targets == ("stemness", "immunosuppressive", "stemness_high",
                             "immunosuppressive_high")  # fmt: skip
    assert set(np.unique(table.values[:, 2])) <= {0.0, 1.0}
    assert table.provenance["spot_diameter_um"] == pytest.approx(55.0)
    # centred on the spots: tile of 56 px at 2 µm/px = 224 level-0 px
    sample = read_spaceranger(visium_cohort.parent / "SYN-P001-S01_visium" / "outs")
    np.testing.assert_array_equal(table.xy_l0, np.round(sample.centres_px - 112).astype(int))
    assert cli_main(args) == 2  # exists: needs --overwrite (bad input, as every command)
    from cscvision.labels.annotations import DEFAULT_CLASS_MAP
    from cscvision.slides.grid import GridSpec

    tiles, _ = prepare_slide(entries[0], split="train", spec=GridSpec(mpp=2.0, tile_px=56),
                             class_map=DEFAULT_CLASS_MAP, cache_dir=tmp_path / "c",
                             targets=("stemness",))  # fmt: skip
    assert len(tiles) == len(table) and tiles.targets.shape == (len(table), 1)
    with pytest.raises(DataError, match=r"56 px at 2\.0 µm/px, but the config's grid is 224 px"):
        prepare_slide(entries[0], split="train", spec=GridSpec(), class_map=DEFAULT_CLASS_MAP,
                      cache_dir=tmp_path / "c", targets=("stemness",))  # fmt: skip


def test_labels_st_records_a_broken_sample_and_labels_the_others(visium_cohort, tmp_path, capsys):
    cohort = tmp_path / "cohort"
    shutil.copytree(visium_cohort.parent, cohort)
    matrix = cohort / "SYN-P001-S01_visium" / "outs" / "filtered_feature_bc_matrix.h5"
    matrix.write_bytes(b"not an HDF5 file")  # a truncated download
    out = tmp_path / "labels"
    args = ["labels", "st", str(cohort / visium_cohort.name), "--out", str(out)]
    assert cli_main(args) == 1
    captured = capsys.readouterr()
    assert "wrote 1 of 2 tile-label tables" in captured.out
    assert "not labelled: SYN-P001-S01:" in captured.err
    assert [e.slide_id for e in read_cohort(out / "cohort.csv")] == ["SYN-P002-S01"]
    errors = (out / "errors.csv").read_text().splitlines()
    assert errors[0] == "slide_id,reason" and errors[1].startswith("SYN-P001-S01,")
    assert len(errors) == 2 and (out / "SYN-P002-S01.labels.csv").exists()
    assert not (out / "SYN-P001-S01.labels.csv").exists()


# --- the real tools' readers on synthetic folders ------------------------------------------------


@pytest.mark.parametrize("layout", ["2.0", "1.x"])
def test_scanpy_read_visium_reads_synthetic_outs(tmp_path, layout):
    """scanpy's own Visium reader (what squidpy and most notebooks use) opens both layouts,
    and its spot coordinates are the ones cscvision's reader gives."""
    import scanpy as sc

    write_cohort(tmp_path, n_slides=1, n_patients=1, size_px=1024, seed=5, visium=True,
                 visium_layout=layout)  # fmt: skip
    outs = tmp_path / "SYN-P001-S01_visium" / "outs"
    names = {"2.0": "tissue_positions.csv", "1.x": "tissue_positions_list.csv"}
    assert sorted(p.name for p in (outs / "spatial").glob("tissue_positions*")) == [names[layout]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scanpy points to squidpy's reader
        adata = sc.read_visium(outs)
    ours = read_spaceranger(outs)
    library = adata.uns["spatial"]["SYN-P001-S01"]
    assert library["metadata"]["software_version"].startswith("spaceranger-")
    assert library["scalefactors"]["spot_diameter_fullres"] == pytest.approx(110.0)
    assert list(adata.obs_names) == list(ours.adata.obs_names)
    # scanpy's obsm["spatial"] is (x, y) = (pxl_col, pxl_row) in full-resolution pixels
    np.testing.assert_allclose(adata.obsm["spatial"].astype(float), ours.centres_px)
    assert (adata.X != ours.adata.X).nnz == 0


def test_10x_h5_carries_the_root_attributes_of_a_real_file(outs):
    import h5py

    with h5py.File(outs / "filtered_feature_bc_matrix.h5") as f:
        attrs = dict(f.attrs)
    real = {"chemistry_description", "filetype", "library_ids", "original_gem_groups",
            "software_version", "version"}  # fmt: skip
    assert real <= set(attrs)
    assert attrs["library_ids"][0] == b"SYN-P001-S01" and attrs["filetype"][0] == b"matrix"
    assert attrs["version"][0] == 2 and attrs["version"].dtype == np.int32

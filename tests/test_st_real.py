"""`labels st` on a real Space Ranger 1.0.0 output (trimmed; tests/data/spaceranger_1.0.0).

The lowres H&E image stands in for the slide: its µm/px follows from the scale factors
(55 µm spot = ``spot_diameter_fullres`` full-res px; lowres = full-res × ``tissue_lowres_scalef``)
and ``st_scale`` maps full-res pixels onto it. Tiles at 0.5 µm/px are upsampled from it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("scanpy")

from PIL import Image

from cscvision.cli import main as cli_main
from cscvision.labels.st import read_spaceranger
from cscvision.labels.table import read_label_table
from cscvision.slides.tissue import tissue_mask

FIXTURE = Path(__file__).parent / "data" / "spaceranger_1.0.0"
SPOT_UM = 55.0
PANELS = """\
panels:
  programme_a: [ENSG00000175756, ENSG00000242485, ENSG00000160075]
  programme_b: [ENSG00000078808, ENSG00000224051, ENSG00000187642]
method: {method}
tile_px: 224
mpp: 0.5
"""


def _factors() -> dict:
    return json.loads((FIXTURE / "spatial" / "scalefactors_json.json").read_text())


def _lowres_mpp() -> float:
    f = _factors()
    return SPOT_UM / (f["spot_diameter_fullres"] * f["tissue_lowres_scalef"])


def _manifest(tmp_path: Path, scale: float) -> Path:
    slide = FIXTURE / "spatial" / "tissue_lowres_image.png"
    path = tmp_path / "manifest.csv"
    path.write_text(
        f"slide_id,patient_id,slide_path,st_path,st_scale\nSR100,P1,{slide},{FIXTURE},{scale}\n"
    )
    return path


@pytest.mark.parametrize("method", ["zscore", "score_genes"])
def test_labels_st_on_the_real_space_ranger_output(tmp_path, method, capsys):
    (tmp_path / "panels.yaml").write_text(PANELS.format(method=method))
    manifest = _manifest(tmp_path, _factors()["tissue_lowres_scalef"])
    out = tmp_path / "out"
    args = ["labels", "st", str(manifest), "--panels", str(tmp_path / "panels.yaml")]
    rc = cli_main([*args, "--out", str(out), "--slide-mpp", f"{_lowres_mpp():.4f}"])
    assert rc == 0, capsys.readouterr().err
    table = read_label_table(out / "SR100.labels.csv")
    assert table.xy_l0.shape == (100, 2) and table.targets == ("programme_a", "programme_b")
    assert np.isfinite(table.values).all() and (table.values.std(0) > 0).all()
    side = json.loads((out / "SR100.labels.json").read_text())
    assert side["provenance"]["layout"] == "spaceranger:tissue_positions_list.csv"
    assert side["provenance"]["spot_diameter_um"] == pytest.approx(SPOT_UM, rel=1e-3)
    # the spots land on the image's tissue: tile centres on the tool's tissue mask of the
    # lowres image (tissue covers ~40 % of the image, so chance would give ~0.4)
    rgb = np.asarray(Image.open(FIXTURE / "spatial" / "tissue_lowres_image.png").convert("RGB"))
    mask = tissue_mask(rgb, _lowres_mpp())
    tile_l0 = 224 * 0.5 / _lowres_mpp()
    centre = np.round(table.xy_l0 + tile_l0 / 2).astype(int)
    on_tissue = mask[centre[:, 1], centre[:, 0]].mean()
    assert 0.3 < mask.mean() < 0.5 and on_tissue >= 0.9


def test_the_wrong_image_scale_is_refused_naming_the_columns(tmp_path, capsys):
    (tmp_path / "panels.yaml").write_text(PANELS.format(method="zscore"))
    manifest = _manifest(tmp_path, _factors()["tissue_hires_scalef"])  # hires scale, lowres image
    out = tmp_path / "out"
    args = ["labels", "st", str(manifest), "--panels", str(tmp_path / "panels.yaml")]
    rc = cli_main([*args, "--out", str(out), "--slide-mpp", "13.67"])
    assert rc == 1
    reason = (out / "errors.csv").read_text()
    assert "fall outside" in reason and "st_scale" in reason


def test_default_panels_on_ensembl_ids_say_so(tmp_path, capsys):
    manifest = _manifest(tmp_path, _factors()["tissue_lowres_scalef"])
    out = tmp_path / "out"
    rc = cli_main(["labels", "st", str(manifest), "--out", str(out), "--slide-mpp", "13.67"])
    assert rc == 1
    reason = (out / "errors.csv").read_text()
    assert "panel 'stemness' has 0 of its genes" in reason
    assert "Ensembl id, e.g. ENSG" in reason


def test_scanpy_and_cscvision_read_the_real_output_alike():
    import scanpy as sc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        adata = sc.read_visium(FIXTURE)
    ours = read_spaceranger(FIXTURE)
    assert adata.uns["spatial"]["custom"]["metadata"]["software_version"] == "spaceranger-1.0.0"
    assert list(adata.obs_names) == list(ours.adata.obs_names) and len(ours) == 100
    np.testing.assert_allclose(adata.obsm["spatial"].astype(float), ours.centres_px)

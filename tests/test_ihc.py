"""IHC labels: stain separation on a real DAB image, registration of real and synthetic
pairs against known transforms, synthetic IHC pairs, and `cscvision labels ihc` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import CMU_SVS, ArraySlide
from PIL import Image
from scipy import ndimage
from skimage import color

from cscvision.labels.ihc import dab_channel, deconvolution_matrix, macenko_vectors
from cscvision.labels.registration import register_slides
from cscvision.synth.ihc import DAB_OD, read_pair_transform


def _cos(a, b) -> float:
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


def test_stain_separation_on_real_ihc(ihc_png):
    rgb = np.asarray(Image.open(ihc_png).convert("RGB"))
    h, dab = macenko_vectors(rgb)
    assert _cos(dab, DAB_OD) > 0.9 and _cos(h, (0.650, 0.704, 0.286)) > 0.9
    ours, tissue = dab_channel(rgb, deconvolution_matrix(np.stack([h, dab])))
    reference = color.rgb2hed(rgb)[..., 2]  # scikit-image's fixed H-E-DAB vectors
    assert np.corrcoef(ours[tissue], reference[tissue])[0, 1] > 0.85
    fixed, _ = dab_channel(rgb, deconvolution_matrix(None))
    assert np.corrcoef(fixed.ravel(), reference.ravel())[0, 1] > 0.99
    brown = rgb[..., 2].astype(int) < rgb[..., 0].astype(int) - 30  # visibly brown pixels
    assert ours[brown].mean() > ours[~brown & tissue].mean() + 0.1


def _moved_copy(rgb: np.ndarray, deg: float, flip: bool, pad: int):
    """``rgb`` mirrored, rotated about its centre and padded on white; returns the copy and the
    true map from copy pixels (x, y) to original pixels."""
    src = rgb[:, ::-1] if flip else rgb
    h, w = src.shape[:2]
    side = int(np.ceil(np.hypot(h, w))) + 2 * pad
    a = np.deg2rad(deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    centre_out, centre_in = np.array([side, side]) / 2, np.array([w, h]) / 2

    def to_src(xy):  # copy (x, y) -> (flipped) source (x, y)
        return (np.asarray(xy) - centre_out) @ rot.T + centre_in

    yy, xx = np.mgrid[0:side, 0:side]
    s = to_src(np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], 1)) - 0.5
    out = np.stack(
        [ndimage.map_coordinates(src[..., c].astype(float), [s[:, 1], s[:, 0]], order=1, cval=255.0)
         for c in range(3)], axis=-1)  # fmt: skip

    def truth(xy):
        p = to_src(xy)
        return np.stack([w - p[:, 0], p[:, 1]], 1) if flip else p

    return out.reshape(side, side, 3).astype(np.uint8), truth


@pytest.mark.parametrize("deg,flip", [(137.0, True), (-58.0, False)])
def test_registers_a_real_image_against_a_moved_copy(ihc_png, deg, flip):
    rgb = np.asarray(Image.open(ihc_png).convert("RGB"))
    mpp = 2.0  # ihc.png states none; any value works, the errors below are in its µm
    copy, truth = _moved_copy(rgb, deg, flip, pad=40)
    reg, qc = register_slides(ArraySlide.make(rgb, mpp), ArraySlide.make(copy, mpp))
    assert reg.ok, reg.reason
    assert reg.flip == flip and qc.ndim == 3
    yy, xx = np.mgrid[20:492:8, 20:492:8]
    p = np.stack([xx.ravel(), yy.ravel()], 1) + 0.5
    err_um = np.linalg.norm(truth(reg.map_l0(p)) - p, axis=1) * mpp
    assert np.median(err_um) < 6 and np.percentile(err_um, 90) < 12


def test_unrelated_image_is_refused(ihc_png, cmu_svs):
    from cscvision.slides.slide import open_slide

    rgb = np.asarray(Image.open(ihc_png).convert("RGB"))
    with open_slide(cmu_svs) as svs:
        skin = svs.thumbnail(2.0)
    reg, _ = register_slides(ArraySlide.make(skin, 2.0), ArraySlide.make(rgb, 2.0))
    assert not reg.ok and reg.reason


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from cscvision.synth import write_cohort

    folder = tmp_path_factory.mktemp("ihc")
    write_cohort(folder, n_slides=2, n_patients=2, size_px=2048, seed=4,
                 ihc_markers=("CD44", "FOXP3"))  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def one_pair(tmp_path_factory) -> Path:
    """``S.tiff`` and its synthetic CD44 IHC slide ``S_CD44.tiff`` with the truth."""
    from cscvision.synth import write_slide

    folder = tmp_path_factory.mktemp("one_pair")
    write_slide(folder / "S.tiff", size_px=1280, seed=3, ihc_markers=("CD44",))
    return folder


def test_synthetic_pair_truth_maps_ihc_tissue_onto_he_tissue(one_pair):
    from cscvision.slides.slide import open_slide

    tmp_path = one_pair
    truth = json.loads((tmp_path / "S_CD44_truth.json").read_text())
    assert truth["marker"] == "CD44" and truth["marks"] == "Stemness-rich"
    labels = np.asarray(Image.open(tmp_path / "S_labels.png"))
    with open_slide(tmp_path / "S_CD44.tiff") as ihc:
        thumb = ihc.thumbnail(8.0)
        assert ihc.info.dimensions == (truth["width_px"], truth["height_px"])
    od = -np.log(np.clip(thumb, 1, 255) / 255.0).sum(-1)
    ys, xs = np.nonzero(od > 0.3)
    hx, hy = read_pair_transform(truth)((xs + 0.5) * 16, (ys + 0.5) * 16)
    inside = (labels[np.clip(hy // 16, 0, labels.shape[0] - 1).astype(int),
                     np.clip(hx // 16, 0, labels.shape[1] - 1).astype(int)] & 1) > 0  # fmt: skip
    assert inside.mean() > 0.95


def test_ihc_pyramid_is_read_by_tifffile_as_by_openslide(one_pair):
    """tifffile's own parser (pages, SubIFD-free pyramid, resolution tags, JPEG tiles via
    imagecodecs) reads the IHC slide as OpenSlide does: same levels, µm/px, pixels."""
    import tifffile

    from cscvision.slides.slide import open_slide

    path = one_pair / "S_CD44.tiff"
    truth = json.loads((one_pair / "S_CD44_truth.json").read_text())
    with tifffile.TiffFile(path) as tif, open_slide(path) as slide:
        series = tif.series[0]
        assert series.axes == "YXS" and series.dtype == np.uint8
        dims = [(lv.shape[1], lv.shape[0]) for lv in series.levels]
        assert dims == list(slide.info.level_dimensions) and len(dims) >= 3
        page = series.levels[0].keyframe
        assert page.is_tiled and page.compression == tifffile.COMPRESSION.JPEG
        x_res, unit = page.get_resolution(), page.resolutionunit
        assert unit == tifffile.RESUNIT.CENTIMETER
        assert 1e4 / x_res[0] == pytest.approx(truth["mpp"], rel=1e-4) == slide.info.mpp
        pixels = series.levels[1].asarray()
        w, h = dims[1]
        theirs = np.asarray(slide.read_region((0, 0), 1, (w, h)))[..., :3]
    diff = np.abs(pixels.astype(int) - theirs.astype(int))
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 8  # two JPEG decoders


@pytest.mark.slow
def test_labels_ihc_cli_end_to_end(pair, tmp_path, capsys, cmu_svs):
    manifest = (pair / "ihc_manifest.csv").read_text().splitlines()
    assert manifest[0] == "slide_id,patient_id,slide_path,ihc_path,marker" and len(manifest) == 5
    _labels_end_to_end(pair, tmp_path)


def _labels_end_to_end(pair, tmp_path):
    import yaml

    from cscvision.cli import main
    from cscvision.labels.cohort import read_cohort
    from cscvision.labels.table import read_label_table

    cfg = tmp_path / "markers.yaml"
    cfg.write_text(yaml.safe_dump({"markers": {"CD44": "stemness", "FOXP3": "immunosuppressive"}}))
    rows = (pair / "ihc_manifest.csv").read_text().splitlines()
    # a third slide whose "IHC" is unrelated tissue (the real skin slide): refused, not labelled
    rows.append(f"SYN-P001-S01-bad,SYN-P001,SYN-P001-S01.tiff,{CMU_SVS},CD44")
    manifest = pair / "manifest_bad.csv"
    manifest.write_text("\n".join(rows) + "\n")
    out = tmp_path / "labels"
    assert main(["labels", "ihc", str(manifest), "--markers", str(cfg), "--out", str(out)]) == 1
    assert "SYN-P001-S01-bad" in (out / "errors.csv").read_text()
    assert not (out / "SYN-P001-S01-bad.labels.csv").exists()
    entries = read_cohort(out / "cohort.csv")
    assert [e.slide_id for e in entries] == ["SYN-P001-S01", "SYN-P002-S01"]
    from sklearn.metrics import roc_auc_score

    for e in entries:
        table = read_label_table(e.label_path)
        assert table.source == "ihc" and table.targets[:2] == ("stemness", "immunosuppressive")
        labels = np.asarray(Image.open(pair / f"{e.slide_id}_labels.png"))
        for j, bit in enumerate((8, 16)):
            cells = [
                labels[y // 16 : (y + 224) // 16, x // 16 : (x + 224) // 16] for x, y in table.xy_l0
            ]
            gt = np.array([((c & bit) > 0).mean() >= 0.5 for c in cells])
            if 0 < gt[table.valid].sum() < table.valid.sum():
                assert roc_auc_score(gt[table.valid], table.values[table.valid, j]) > 0.9
        geo = json.loads((out / f"{e.slide_id}.ihc.geojson").read_text())
        assert geo["features"][0]["properties"]["objectType"] == "annotation"
    # the QC pictures' header band (its right end) is the verdict's colour
    from cscvision.labels.registration_figure import VERDICT_RGB

    def band(stem: str) -> np.ndarray:
        rgb = np.asarray(Image.open(out / "registration" / f"{stem}_qc.png").convert("RGB"))
        return rgb[4, -4].astype(int)

    assert np.abs(band("SYN-P001-S01-bad_CD44") - VERDICT_RGB["refused"]).max() <= 8
    verdict = json.loads((out / "registration" / "SYN-P001-S01_CD44.json").read_text())["qc"]
    assert np.abs(band("SYN-P001-S01_CD44") - VERDICT_RGB[verdict]).max() <= 8


def test_registration_json_round_trip_and_units():
    from cscvision.labels.registration import Registration

    a = np.deg2rad(30)
    m = np.array([[np.cos(a), -np.sin(a), 100.0], [np.sin(a), np.cos(a), -50.0], [0, 0, 1]])
    reg = Registration(
        fixed_path="he.svs", moving_path="ihc.svs", fixed_mpp=0.5, moving_mpp=0.25,
        matrix_um=m, flip=False, rotation_deg=30.0, n_matches=40, n_inliers=30,
        error_um={"median": 1.0, "p90": 2.0}, tissue_dice=0.9, ok=True,
        flow_um=np.ones((2, 3, 3), np.float32), flow_step_um=50.0,
    )  # fmt: skip
    back = Registration.from_dict(json.loads(json.dumps(reg.to_dict())))
    np.testing.assert_allclose(back.matrix_um, m)
    # level-0 px of the H&E (0.5 µm/px) -> µm -> matrix (+ 1 µm flow) -> IHC px (0.25 µm/px)
    xy_um = np.array([[200.0, 0.0]]) * 0.5
    want = (xy_um @ m[:2, :2].T + m[:2, 2] + 1.0) / 0.25
    np.testing.assert_allclose(back.map_l0(np.array([[200.0, 0.0]])), want, rtol=1e-6)

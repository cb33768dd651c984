"""Synthetic cohort: OpenSlide-readable pyramids, QuPath truth, determinism, colour vs texture."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import uuid

import numpy as np
import openslide
import pytest
import shapely
from PIL import Image
from scipy import ndimage
from skimage.filters import threshold_otsu

from cscvision.cli import main as cli_main
from cscvision.slides.slide import open_slide
from cscvision.synth import (
    COHORT_COLUMNS,
    LABEL_BITS,
    make_layout,
    sample_lab_profile,
    sample_slide_profile,
    write_cohort,
    write_slide,
)
from cscvision.synth.layout import IMMUNO, NECROSIS, STEMNESS, TUMOR
from cscvision.synth.pyramid import PyramidSpec
from cscvision.synth.render import STEM_BIT, TISSUE_BIT, TUMOR_BIT, SlideRenderer

TARGETS = (STEMNESS, IMMUNO)
ALLOWED = {TUMOR, NECROSIS, STEMNESS, IMMUNO, "Pen mark", "Fold", "Bubble", "Out of focus"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    csv_path = write_cohort(out, n_slides=3, n_patients=2, size_px=1536, seed=11)
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return csv_path, rows


def test_cohort_csv(cohort):
    csv_path, rows = cohort
    assert csv_path.read_text().splitlines()[0] == ",".join(COHORT_COLUMNS)
    assert [r["slide_id"] for r in rows] == ["SYN-P001-S01", "SYN-P001-S02", "SYN-P002-S01"]
    for r in rows:
        assert re.fullmatch(r"SYN-P\d{3}-S\d{2}", r["slide_id"])
        assert r["slide_id"].startswith(r["patient_id"] + "-")
        for col in ("slide_path", "annotation_path"):
            assert not r[col].startswith("/")  # relative to the CSV's folder
            assert (csv_path.parent / r[col]).is_file()


def test_slides_open_in_openslide_with_mpp(cohort):
    csv_path, rows = cohort
    for r in rows:
        path = csv_path.parent / r["slide_path"]
        props = openslide.OpenSlide(str(path)).properties
        assert props["openslide.vendor"] == "generic-tiff"
        assert float(props["openslide.mpp-x"]) == pytest.approx(0.5)
        assert props["tiff.ResolutionUnit"] == "centimeter"
        with open_slide(path) as slide:
            info = slide.info
            assert info.mpp == pytest.approx(0.5)
            assert info.mpp_source in ("openslide", "tiff-resolution")
            assert info.level_count >= 3
            steps = np.array(info.level_downsamples[1:]) / np.array(info.level_downsamples[:-1])
            assert set(np.round(steps).astype(int)) <= {2, 4}
            rgb = slide.read_region((0, 0), 0, info.dimensions)
        assert rgb.shape == (1536, 1536, 3)
        mask = np.asarray(Image.open(csv_path.parent / f"{r['slide_id']}_labels.png"))
        grey = rgb.mean(axis=2).reshape(96, 16, 96, 16).mean(axis=(1, 3))  # 16 px = 8 µm
        tissue = (mask & LABEL_BITS["Tissue"]) > 0
        assert 0.15 < tissue.mean() < 0.85
        assert grey[tissue].mean() < grey[~tissue].mean() - 20  # stained tissue on glass


def test_geojson_is_qupath_shaped(cohort):
    csv_path, rows = cohort
    seen = set()
    for r in rows:
        doc = json.loads((csv_path.parent / r["annotation_path"]).read_text())
        assert doc["type"] == "FeatureCollection"
        ids = [f["id"] for f in doc["features"]]
        assert len(ids) == len(set(ids))
        for f in doc["features"]:
            assert f["type"] == "Feature"
            assert uuid.UUID(f["id"]).version == 4
            assert f["properties"]["objectType"] == "annotation"
            cls = f["properties"]["classification"]
            assert cls["name"] in ALLOWED
            assert len(cls["color"]) == 3 and all(0 <= int(c) <= 255 for c in cls["color"])
            geom = f["geometry"]
            assert geom["type"] in ("Polygon", "MultiPolygon")
            polys = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
            for rings in polys:
                for ring in rings:
                    assert ring[0] == ring[-1] and len(ring) >= 4
                    xy = np.asarray(ring)
                    assert xy.min() >= 0 and xy.max() <= 1536
            shape = shapely.geometry.shape(geom)
            assert shape.is_valid and shape.area > 0
            seen.add(cls["name"])
    assert set(TARGETS) <= seen and TUMOR in seen


def _geojson_mask(doc: dict, name: str, shape: tuple[int, int], px: float) -> np.ndarray:
    """Independent rasterisation: pixel centres tested against the GeoJSON polygons."""
    geoms = [
        shapely.geometry.shape(f["geometry"])
        for f in doc["features"]
        if f["properties"]["classification"]["name"] == name
    ]
    if not geoms:
        return np.zeros(shape, bool)
    union = shapely.union_all(geoms)
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    return shapely.contains_xy(union, (cols + 0.5) * px, (rows + 0.5) * px)


def test_label_mask_agrees_with_polygons(cohort):
    csv_path, rows = cohort
    for r in rows:
        folder = csv_path.parent
        truth = json.loads((folder / f"{r['slide_id']}_truth.json").read_text())
        mask = np.asarray(Image.open(folder / f"{r['slide_id']}_labels.png"))
        assert mask.dtype == np.uint8
        px = truth["label_mask"]["mpp"] / truth["mpp"]
        assert mask.shape == (int(np.ceil(1536 / px)),) * 2
        doc = json.loads((folder / r["annotation_path"]).read_text())
        for name in (TUMOR, STEMNESS, IMMUNO, NECROSIS):
            ours = (mask & LABEL_BITS[name]) > 0
            ref = _geojson_mask(doc, name, mask.shape, px)
            union = (ours | ref).sum()
            if union:
                assert (ours & ref).sum() / union > 0.95, (r["slide_id"], name)
        for name in TARGETS:  # every target is on tissue
            assert not ((mask & LABEL_BITS[name]) > 0)[(mask & LABEL_BITS["Tissue"]) == 0].any()


def test_thumbnail_has_outlines(cohort):
    csv_path, rows = cohort
    thumb = np.asarray(Image.open(csv_path.parent / f"{rows[0]['slide_id']}_thumb.png"))
    assert thumb.ndim == 3 and max(thumb.shape[:2]) <= 1024
    orange = (thumb[..., 0] == 255) & (thumb[..., 1] == 170) & (thumb[..., 2] == 0)
    assert orange.sum() > 20  # stemness-rich outline colour


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_seed_same_bytes(tmp_path):
    for name in ("a", "b"):
        write_slide(tmp_path / name / "s.tiff", size_px=1024, seed=5, slide_id="S")
    write_slide(tmp_path / "c" / "s.tiff", size_px=1024, seed=6, slide_id="S")
    a, b, c = (_digests(tmp_path / n) for n in "abc")
    assert a == b and len(a) == 8  # slide, 4 truth files, cell table + sidecar + cell truth
    assert a["s.tiff"] != c["s.tiff"]


def test_existing_outputs_need_overwrite(tmp_path):
    write_cohort(tmp_path, n_slides=1, n_patients=1, size_px=256, seed=0)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_cohort(tmp_path, n_slides=1, n_patients=1, size_px=256, seed=0)
    write_cohort(tmp_path, n_slides=1, n_patients=1, size_px=256, seed=0, overwrite=True)


def test_parallel_workers_write_the_same_bytes(tmp_path):
    for name, workers in (("one", 1), ("two", 2)):
        write_cohort(
            tmp_path / name, n_slides=2, n_patients=1, size_px=384, seed=4, workers=workers
        )
    assert _digests(tmp_path / "one") == _digests(tmp_path / "two")


def _cli(argv: list[str]) -> int:
    return cli_main(["synth", *argv])  # through the one wrapper (exit statuses)


def test_cli(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--slides", "2", "--patients", "1", "--size", "320"]
    assert _cli(argv) == 0
    out = capsys.readouterr().out
    assert "wrote 2 slides" in out and "cohort.csv" in out
    assert (tmp_path / "SYN-P001-S02.tiff").is_file()
    assert _cli(argv) == 2  # refuses to overwrite: bad input, one line
    err = capsys.readouterr().err
    assert "--overwrite" in err and err.startswith("cscvision synth: ") and err.count("\n") == 1
    assert _cli([*argv, "--overwrite"]) == 0
    assert _cli([*argv, "--tile", "100"]) == 2


def test_regions_and_niche_on_most_slides():
    shares = []
    for seed in range(12):
        layout = make_layout(np.random.default_rng(seed), width_px=8192, height_px=8192, mpp=0.5)
        tissue = layout.tissue.area
        shares.append(
            [layout.regions[STEMNESS].area / tissue, layout.regions[IMMUNO].area / tissue,
             layout.niche.area / tissue]
        )  # fmt: skip
        assert layout.regions[STEMNESS].within(layout.tissue.buffer(1))
    shares = np.array(shares)
    assert (shares[:, 2] > 0.01).mean() >= 0.9  # the niche is on (almost) every slide
    for col in (0, 1):  # each target covers roughly 10-35 % of the tissue
        assert ((shares[:, col] > 0.08) & (shares[:, col] < 0.4)).mean() >= 0.9


def _renderer(seed: int, size: int, artefact_rate: float = 1.0) -> SlideRenderer:
    rng = np.random.default_rng([seed, 1])
    layout = make_layout(rng, width_px=size, height_px=size, mpp=0.5, artefact_rate=artefact_rate)
    lab = sample_lab_profile(np.random.default_rng([seed, 2]))
    stain = sample_slide_profile(np.random.default_rng([seed, 3]), lab)
    return SlideRenderer(layout, stain, seed=seed)


def test_windows_join_without_seams():
    for seed in range(40):  # a slide with every artefact kind, blur patches included
        r = _renderer(seed, 2048, artefact_rate=3.0)
        if len(r.layout.artefacts.named()) == 4:
            break
    bx0, by0, _, _ = (int(v) for v in r.layout.artefacts.blur.bounds)
    for x0, y0 in ((900, 700), (bx0, by0)):
        whole = r.render(x0, y0, 300, 300)
        parts = [r.render(x0 + dx, y0 + dy, 150, 150) for dy in (0, 150) for dx in (0, 150)]
        top, bottom = np.concatenate(parts[:2], axis=1), np.concatenate(parts[2:], axis=1)
        np.testing.assert_array_equal(whole, np.concatenate([top, bottom], axis=0))


def test_pyramid_levels():
    assert PyramidSpec(1024, 1024, 0.5).level_shapes() == [(1024, 1024), (256, 256), (64, 64)]
    shapes = PyramidSpec(16384, 12000, 0.5).level_shapes()
    assert shapes[:4] == [(12000, 16384), (3000, 4096), (750, 1024), (188, 256)]


# -- colour is not a shortcut ------------------------------------------------------------------
def _tiles(seed: int, size: int = 3584, tile: int = 224):
    """Pure tissue tiles of one slide (stemness >= 90 % or <= 10 %), rendered one by one.

    Returns the tiles, whether each is stemness-rich, and whether each is bulk tumour.
    """
    r = _renderer(seed, size, artefact_rate=0.0)
    bits = r.bits(0, 0, size // 8, size // 8, scale=1 / 8)
    tiles, stem, tumour = [], [], []
    for ty in range(0, size - tile + 1, tile):
        for tx in range(0, size - tile + 1, tile):
            b = bits[ty // 8 : (ty + tile) // 8, tx // 8 : (tx + tile) // 8]
            share = ((b & STEM_BIT) > 0).mean()
            if (b & TISSUE_BIT).mean() >= 0.95 and not 0.1 < share < 0.9:
                tiles.append(r.render(tx, ty, tile, tile))
                stem.append(share >= 0.9)
                tumour.append(((b & TUMOR_BIT) > 0).mean() >= 0.9)
    return tiles, np.array(stem), np.array(tumour)


def colour_histogram(rgb: np.ndarray) -> np.ndarray:
    q = (rgb // 32).astype(np.int64)  # 8 levels per channel, 512 joint bins
    h = np.bincount((q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2]).ravel(), minlength=512)
    return h / h.sum()


def nuclear_texture(rgb: np.ndarray) -> np.ndarray:
    """Stain-blind: count and size of dark blobs above the tile's own Otsu threshold."""
    dark = ndimage.gaussian_filter(255.0 - rgb.astype(np.float32).mean(axis=2), 1.0)
    labels, _ = ndimage.label(dark > threshold_otsu(dark))
    areas = np.bincount(labels.ravel())[1:]
    areas = areas[areas >= 8]
    median = np.median(areas) if len(areas) else 0.0
    return np.array([np.log1p(len(areas)), np.log1p(median)])


def _logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, steps: int = 400):
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    w, b = np.zeros(z.shape[1]), 0.0
    weight = np.where(y, 0.5 / y.mean(), 0.5 / (1 - y.mean()))  # balanced classes
    for _ in range(steps):
        g = weight * (1 / (1 + np.exp(-(z @ w + b))) - y)
        w -= 0.5 * (z.T @ g / len(y) + l2 * w)
        b -= 0.5 * g.mean()
    return lambda xn: ((xn - mu) / sd) @ w + b


def auroc(score: np.ndarray, y: np.ndarray) -> float:
    ranks = np.empty(len(score))
    ranks[np.argsort(score)] = np.arange(1, len(score) + 1)
    n_pos = y.sum()
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(y) - n_pos)))


def _cross_slide_auroc(slides, feature) -> float:
    """Train on half the slides, score the other half, and the other way round; mean AUROC."""
    feats = [(np.array([feature(t) for t in tiles]), y) for tiles, y in slides]
    half = len(feats) // 2
    scores = []
    for train, test in ((feats[:half], feats[half:]), (feats[half:], feats[:half])):
        clf = _logistic(
            np.concatenate([f for f, _ in train]), np.concatenate([y for _, y in train])
        )
        y_test = np.concatenate([y for _, y in test])
        scores.append(auroc(clf(np.concatenate([f for f, _ in test])), y_test))
    return float(np.mean(scores))


def colour_moments(rgb: np.ndarray) -> np.ndarray:
    flat = rgb.reshape(-1, 3).astype(np.float32)
    return np.concatenate([flat.mean(axis=0), flat.std(axis=0)])


@pytest.mark.slow
def test_colour_is_not_a_shortcut():
    """Per-slide stain varies more than the classes differ in colour; morphology carries."""
    rendered = [_tiles(seed) for seed in range(16)]
    y = np.concatenate([stem for _, stem, _ in rendered])
    assert y.sum() >= 80 and (~y).sum() >= 500
    everything = [(tiles, stem) for tiles, stem, _ in rendered]
    colour = _cross_slide_auroc(everything, colour_histogram)
    texture = _cross_slide_auroc(everything, nuclear_texture)
    assert colour < 0.7, f"colour histograms predict stemness on unseen slides: {colour:.2f}"
    assert texture > 0.9, f"nuclear texture should: {texture:.2f}"
    # Against the look-alike, bulk tumour, even colour means and spreads are near chance.
    hard = [
        ([t for t, keep in zip(tiles, stem | tumour, strict=True) if keep], stem[stem | tumour])
        for tiles, stem, tumour in rendered
    ]
    assert _cross_slide_auroc(hard, colour_moments) < 0.7
    assert _cross_slide_auroc(hard, nuclear_texture) > 0.9

"""Macenko/Vahadane templates unmix each slide with its own stains (slides.slide_stains), in
inference and in training: known answers on slides made from known stains and amounts."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from cscvision.inference.predict import predict_slide
from cscvision.inference.settings import InferSettings
from cscvision.models.backbones import get_model
from cscvision.models.card import ModelCard
from cscvision.models.export import export_model, load_model
from cscvision.slides.slide import open_slide
from cscvision.slides.slide_stains import slide_stains
from cscvision.slides.stain import (
    OD_BETA,
    StainReference,
    angle_deg,
    normalise_batch,
)
from cscvision.testing import write_pyramid

# the slide's stains (Ruifrok & Johnston) and the template's, 15-20 degrees apart
A = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]])
B = np.array([[0.55, 0.76, 0.35], [0.20, 0.85, 0.49]])
A2 = np.array([[0.70, 0.62, 0.35], [0.10, 0.95, 0.30]])
A, B, A2 = (m / np.linalg.norm(m, axis=1, keepdims=True) for m in (A, B, A2))
REF_MAX = np.array([1.4, 0.9])
TILE = 64


def _concentrations(side: int, seed: int, border: int = 48) -> np.ndarray:
    """Known amounts [side, side, 2]: nuclei (mostly H), stroma (mostly E), mixtures and
    specks of glass, inside a border of glass."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(4, (side, side), p=[0.25, 0.35, 0.3, 0.1])
    conc = np.zeros((side, side, 2))
    n = [(kind == k).sum() for k in range(3)]
    conc[kind == 0] = np.c_[rng.gamma(6, 0.15, n[0]), rng.gamma(1, 0.03, n[0])]
    conc[kind == 1] = np.c_[rng.gamma(1, 0.03, n[1]), rng.gamma(6, 0.1, n[1])]
    conc[kind == 2] = rng.gamma(4, 0.12, (n[2], 2))
    glass = np.ones((side, side), bool)
    glass[border:-border, border:-border] = False
    conc[glass] = 0.0
    return conc


def _rgb(conc: np.ndarray, stains: np.ndarray) -> np.ndarray:
    return np.clip(np.round(255 * np.exp(-conc @ stains)), 0, 255).astype(np.uint8)


def _slide(path, stains: np.ndarray, side: int, seed: int, border: int = 48):
    conc = _concentrations(side, seed, border)
    rgb = _rgb(conc, stains)
    return write_pyramid(path, rgb, mpp=1.0, levels=1, compression="deflate"), conc


def _template(method: str = "macenko") -> StainReference:
    return StainReference(
        method=method,
        stain_matrix=tuple(map(tuple, B.tolist())),
        max_concentration=tuple(REF_MAX.tolist()),
        source="stains B",
    )


def _expected(conc: np.ndarray) -> np.ndarray:
    """The tile recomposed from its true amounts under the template's stains B, each stain
    scaled so its 99th percentile over the tile's tissue is the template's."""
    flat = conc.reshape(-1, 2)
    tissue = np.linalg.norm(flat @ A, axis=1) > OD_BETA
    scale = REF_MAX / np.percentile(flat[tissue], 99, axis=0)
    return _rgb(conc * scale, B).astype(float)


@pytest.fixture(scope="module")
def infer_world(tmp_path_factory):
    """A slide made of stains A, and a model whose card keeps a template of stains B and
    feeds its net ``x / 255`` (mean 0, sd 1), so the net's input is the normalised tile."""
    folder = tmp_path_factory.mktemp("slide_stains")
    path, conc = _slide(folder / "a.tif", A, 640, seed=0)
    card = ModelCard(name="stain", backbone="small_cnn", tile_px=TILE, mpp=1.0,
                     mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                     stain=_template().to_dict())  # fmt: skip
    torch.manual_seed(0)
    model = load_model(export_model(get_model("small_cnn", 2), card, folder / "model"))
    seen: list[torch.Tensor] = []
    model.net.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach() * 255))
    settings = InferSettings(device="cpu", workers=0, batch_size=512, min_tissue=0.99)
    pred = predict_slide(path, model, settings, progress=False)
    tiles = torch.cat(seen).permute(0, 2, 3, 1).float().numpy()
    return {"path": path, "conc": conc, "pred": pred, "tiles": tiles, "card": model.card}


def test_infer_unmixes_each_slide_with_its_own_stains(infer_world):
    """Known answer: infer's tile input is the tile recomposed from its true amounts C under
    the template's stains B; unmixing with B itself (the template's stains, the old path)
    is far from it."""
    pred, tiles, conc = infer_world["pred"], infer_world["tiles"], infer_world["conc"]
    assert len(tiles) == len(pred.grid.xy_l0) > 40
    errors, old_errors = [], []
    for tile, (x, y) in zip(tiles, pred.grid.xy_l0, strict=True):
        truth = _expected(conc[y : y + TILE, x : x + TILE])
        errors.append(np.abs(tile - truth))
        raw = torch.from_numpy(_rgb(conc[y : y + TILE, x : x + TILE], A)).permute(2, 0, 1)
        old = normalise_batch(raw[None], _template())[0].permute(1, 2, 0).numpy()
        old_errors.append(np.abs(old - truth))
    errors, old_errors = np.stack(errors), np.stack(old_errors)
    # measured: median 0.97 and p95 4.6 grey levels; the old path 5.3 and 31
    assert np.median(errors) < 2 and np.percentile(errors, 95) < 7
    assert np.median(old_errors) > 4 and np.percentile(old_errors, 95) > 20


def test_infer_records_the_slide_stains_in_its_summary(infer_world):
    """The slide's fitted stains are A's (within 2 degrees), and the recorded angles to the
    template's are A's angles to B."""
    record = infer_world["pred"].stain
    assert record["method"] == "macenko"
    fitted = np.asarray(record["slide_stain_matrix"])
    assert max(angle_deg(f, a) for f, a in zip(fitted, A, strict=True)) < 2.0
    truth = [angle_deg(a, b) for a, b in zip(A, B, strict=True)]
    np.testing.assert_allclose(record["angle_to_template_deg"], truth, atol=2.0)
    from cscvision.outputs.summary import summarize

    summary = summarize(infer_world["pred"], infer_world["card"], {}, {}, [])
    assert json.loads(json.dumps(summary))["stain_normalisation"] == record


def test_a_slide_without_tissue_warns_once_and_keeps_the_template_stains(tmp_path):
    path = write_pyramid(tmp_path / "glass.tif", np.full((512, 512, 3), 244, np.uint8),
                         mpp=1.0, levels=1, compression="deflate")  # fmt: skip
    template = _template()
    with open_slide(path) as slide:
        with pytest.warns(UserWarning, match=r"glass\.tif: its own stains cannot be fitted"):
            source = slide_stains(slide, template)
        assert source is template  # the old path: the template's stains
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per slide: cached
            assert slide_stains(slide, template) is template
        reinhard = StainReference(method="reinhard", lab_mean=(70, 9, -5), lab_std=(9, 5, 5))
        assert slide_stains(slide, reinhard) is None  # Reinhard needs no source


def test_training_normalises_each_tile_with_its_own_slide_stains(tmp_path):
    """``data.stain``: tiles of two slides in one batch are each unmixed with their own
    slide's stains, as the per-slide call by hand; swapping the slides changes the result."""
    from cscvision.training.lit import TileClassifier

    slides = [
        _slide(tmp_path / f"s{i}.tif", m, 512, seed=i, border=8)[0] for i, m in enumerate((A, A2))
    ]
    template = _template()
    system = TileClassifier(backbone="small_cnn", stain=template.to_dict(), augment="none",
                            channels_last=False, mean=(0, 0, 0), std=(1, 1, 1))  # fmt: skip
    system.use_slide_stains([(str(p), None) for p in slides])
    fitted = [np.asarray(own.stain_matrix) for own in system.stain_sources]
    for own, truth in zip(fitted, (A, A2), strict=True):  # each slide's own, not B
        assert max(angle_deg(f, t) for f, t in zip(own, truth, strict=True)) < 2.0
    tiles, slide_idx = [], torch.tensor([0, 1, 1, 0])
    for k, i in enumerate(slide_idx.tolist()):
        with open_slide(slides[i]) as s:
            tiles.append(s.read_region((60 + 40 * k, 80), 0, (TILE, TILE)))
    image = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()
    got = system.prepare_images(image, train=False, slide_idx=slide_idx) * 255
    by_hand = []
    for k, i in enumerate(slide_idx.tolist()):
        with open_slide(slides[i]) as s:
            own = slide_stains(s, template)
        by_hand.append(normalise_batch(image[k : k + 1], template, source=own)[0])
        torch.testing.assert_close(got[k], by_hand[k], atol=1e-3, rtol=1e-4)
    swapped = system.prepare_images(image, train=False, slide_idx=1 - slide_idx) * 255
    assert (swapped - got).abs().mean() > 3
    # the OOD record's features are read from the same per-slide normalised tiles
    from cscvision.models.ood import collect_features

    card = ModelCard(name="s", backbone="small_cnn", tile_px=TILE, mpp=1.0)
    stained = ModelCard(name="s", backbone="small_cnn", tile_px=TILE, mpp=1.0,
                        stain=template.to_dict())  # fmt: skip
    batch = {"image": image, "target": torch.zeros(4, 2), "slide_idx": slide_idx}
    ours = collect_features(system.net, [batch], stained, stain_sources=system.stain_sources)
    hand = collect_features(system.net, [{**batch, "image": torch.stack(by_hand)}], card)
    np.testing.assert_allclose(ours[0], hand[0], rtol=1e-4, atol=1e-4)

"""Inference: stitching, predictions on a planted slide, bounds offsets, batches and resume."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openslide
import pytest
import torch

from cscvision.core.geometry import area_fraction
from cscvision.core.guard import slide_lock
from cscvision.inference.predict import predict_grid, predict_slide
from cscvision.inference.stitch import choose_sub, map_layout, stitch
from cscvision.models.backbones import get_model
from cscvision.models.export import ModelCard, export_model, load_model
from cscvision.outputs.slide_folder import write_slide_outputs
from cscvision.slides.grid import GridSpec, detect_tissue, make_grid
from cscvision.slides.slide import open_slide
from cscvision.testing import output_snapshot, write_pyramid

ROOT = Path(__file__).resolve().parents[1]
TILE = 64  # tile side in px at 0.5 µm/px = level 0 of the planted slides

# Planted slide: glass, pink tissue, and three tile-aligned blocks (x0, y0, x1, y1).
GLASS, TISSUE = (243, 243, 243), (200, 120, 160)
STEM, IMMUNE, NICHE = (170, 90, 210), (200, 60, 100), (170, 40, 210)
TISSUE_BOX = (128, 192, 1920, 1408)
BLOCKS = {
    "stem": ((512, 384, 896, 768), STEM),
    "immune": ((1024, 768, 1408, 1152), IMMUNE),
    "niche": ((1280, 384, 1536, 640), NICHE),
}


# A small variant for batches: (x0, y0, x1, y1) boxes painted in this order.
SMALL = (((64, 64, 448, 320), TISSUE), ((128, 128, 256, 256), STEM),
         ((256, 192, 384, 320), IMMUNE), ((256, 128, 320, 192), NICHE))  # fmt: skip


def planted_rgb(width: int = 2048, height: int = 1536, boxes=None) -> np.ndarray:
    rgb = np.full((height, width, 3), GLASS, np.uint8)
    for (x0, y0, x1, y1), colour in boxes or [(TISSUE_BOX, TISSUE), *BLOCKS.values()]:
        rgb[y0:y1, x0:x1] = colour
    return rgb


def expected_probs(rgb: tuple[int, int, int]) -> tuple[float, float]:
    """The planted model's output for a tile of one colour (see ``planted_model``)."""
    r, g, b = (c / 255 for c in rgb)
    logits = torch.tensor([40 * (b - r), 80 * (75 / 255 - g)])
    return tuple(torch.sigmoid(logits).tolist())


def planted_net() -> torch.nn.Module:
    """small_cnn with hand-set weights: every conv passes the three colour channels through
    unchanged (centre tap 1), batch norms are identities, and the head computes
    stemness = 40 (blue - red), immunosuppressive = 80 (75/255 - green) on the tile's
    per-channel value (exact for a tile of one colour)."""
    net = get_model("small_cnn", 2)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.zero_()
                k = m.kernel_size[0] // 2
                for c in range(3):
                    m.weight[c, c, k, k] = 1.0
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.fill_(1)
                m.bias.zero_()
                m.running_mean.zero_()
                m.running_var.fill_(1 - m.eps)
            elif isinstance(m, torch.nn.Linear):
                m.weight.zero_()
                m.bias.zero_()
                m.weight[0, 2], m.weight[0, 0] = 40.0, -40.0
                m.weight[1, 1], m.bias[1] = -80.0, 80 * 75 / 255
    return net


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("planted")
    slide = write_pyramid(folder / "planted.tif", planted_rgb(), mpp=0.5, compression="deflate")
    card = ModelCard(
        name="planted",
        backbone="small_cnn",
        tile_px=TILE,
        mpp=0.5,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        colors={"stemness": (230, 60, 40), "immunosuppressive": (40, 120, 230)},
        thresholds={"stemness": 0.5, "immunosuppressive": 0.5},
    )
    small = write_pyramid(folder / "small.tif", planted_rgb(512, 384, SMALL), mpp=0.5,
                          compression="deflate")  # fmt: skip
    model_dir = export_model(planted_net(), card, folder / "model")
    return {"slide": slide, "small": small, "model_dir": model_dir, "model": load_model(model_dir)}


def _inside(xy: np.ndarray, box: tuple[int, int, int, int], tile_l0: float) -> np.ndarray:
    x0, y0, x1, y1 = box
    x, y = xy[:, 0], xy[:, 1]
    return (x >= x0) & (y >= y0) & (x + tile_l0 <= x1) & (y + tile_l0 <= y1)


# --- stitching (pure) --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overlap", "sub", "foot"), [(0.0, 1, 1), (0.5, 2, 4), (0.75, 1, 4), (0.25, 3, 4)]
)
def test_map_layout_puts_tiles_on_whole_map_pixels(overlap, sub, foot):
    assert choose_sub(overlap) == sub
    stride = 224 * (1 - overlap)
    layout = map_layout((10, 20), (5, 7), tile_l0=224, stride_l0=stride, sub=sub)
    assert layout.foot_px == foot
    assert layout.transform.px_l0 == pytest.approx(stride / sub)
    assert layout.shape == (4 * sub + foot, 6 * sub + foot)
    assert layout.foot_px * layout.transform.px_l0 == pytest.approx(224)


def _full_grid(rows: int, cols: int) -> np.ndarray:
    rr, cc = np.mgrid[0:rows, 0:cols]
    return np.stack([cc.ravel(), rr.ravel()], axis=1)


def test_constant_predictions_give_a_constant_map_across_tile_borders():
    cells = _full_grid(6, 8)
    layout = map_layout((0, 0), (6, 8), tile_l0=224, stride_l0=112, sub=choose_sub(0.5))
    maps = stitch(cells, np.full((len(cells), 2), [0.3, 0.8], np.float32), layout)
    assert np.isfinite(maps).all()
    np.testing.assert_allclose(maps[0], 0.3, atol=1e-6)
    np.testing.assert_allclose(maps[1], 0.8, atol=1e-6)


def test_blending_smooths_the_steps_between_tiles():
    cells = _full_grid(4, 12)
    probs = (cells[:, :1] % 2).astype(np.float32)  # alternating 0/1 columns of tiles
    hard = stitch(cells, probs, map_layout((0, 0), (4, 12), tile_l0=64, stride_l0=64, sub=1))
    assert np.abs(np.diff(hard[0], axis=1)).max() == 1.0  # a seam at every tile border
    blended_layout = map_layout((0, 0), (4, 12), tile_l0=64, stride_l0=32, sub=2)
    blended = stitch(cells, probs, blended_layout)
    assert np.abs(np.diff(blended[0], axis=1)).max() < 0.75


def test_uncovered_map_pixels_are_nan():
    cells = np.array([[0, 0], [2, 0]])
    layout = map_layout((0, 0), (1, 3), tile_l0=64, stride_l0=64, sub=1)
    maps = stitch(cells, np.array([[0.2], [0.9]]), layout)
    assert maps[0, 0, 0] == pytest.approx(0.2) and maps[0, 0, 2] == pytest.approx(0.9)
    assert np.isnan(maps[0, 0, 1])


def test_area_fraction_partitions_the_mask():
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) < 0.4
    layout = map_layout((0, 0), (6, 9), tile_l0=96, stride_l0=96, sub=1)
    scale = 1 / 16  # mask px per level-0 px
    fraction = area_fraction(mask, scale, layout.transform, layout.shape)
    cell_mask_px = (96 * scale) ** 2  # 6 x 6 mask pixels: the map covers 36 x 54 of them
    assert fraction.sum() * cell_mask_px == pytest.approx(mask[:36].sum(), rel=1e-6)
    assert fraction[:, -1].max() <= 5 / 6  # the last column is one sixth beyond the mask
    assert fraction.min() >= 0 and fraction.max() <= 1


# --- prediction on a planted slide -------------------------------------------------------


def test_predictions_land_on_the_planted_tiles(planted):
    pred = predict_slide(planted["slide"], planted["model"], progress=False)
    grid = pred.grid
    assert pred.targets == ("stemness", "immunosuppressive")
    assert grid.plan.tile_l0 == TILE and len(grid) > 300
    background = _inside(grid.xy_l0, TISSUE_BOX, TILE)
    for box, colour in BLOCKS.values():
        inside = _inside(grid.xy_l0, box, TILE)
        assert inside.sum() >= 16
        np.testing.assert_allclose(pred.probs[inside], [expected_probs(colour)] * inside.sum(),
                                   atol=2e-3)  # fmt: skip
        background &= ~_inside(grid.xy_l0, (box[0] - TILE, box[1] - TILE, box[2] + TILE,
                                            box[3] + TILE), TILE)  # fmt: skip
    np.testing.assert_allclose(pred.probs[background], [expected_probs(TISSUE)] * background.sum(),
                               atol=2e-3)  # fmt: skip
    # The stitched map (one pixel per tile here) agrees at each block's centre.
    for name, target in (("stem", 0), ("immune", 1), ("niche", 0), ("niche", 1)):
        (x0, y0, x1, y1), _ = BLOCKS[name]
        col, row = pred.map_transform.to_map((x0 + x1) / 2, (y0 + y1) / 2)
        assert pred.maps[target, int(row), int(col)] > 0.95


def test_workers_threads_and_amp_give_the_same_predictions(planted):
    slide, model = planted["small"], planted["model"]
    base = predict_slide(slide, model, progress=False)
    assert len(base.grid) > 10
    processes = predict_slide(
        slide, model, workers=2, reader="processes", batch_size=16, progress=False
    )
    np.testing.assert_array_equal(processes.grid.xy_l0, base.grid.xy_l0)
    np.testing.assert_allclose(processes.probs, base.probs, atol=1e-6)
    threads = predict_slide(
        slide, model, workers=3, reader="threads", batch_size=10, progress=False
    )
    np.testing.assert_allclose(threads.probs, base.probs, atol=1e-6)
    amp = predict_slide(slide, model, amp=True, progress=False)
    np.testing.assert_allclose(amp.probs, base.probs, atol=0.05)


def test_overlap_maps_are_finer_and_keep_the_pattern(planted):
    pred = predict_slide(planted["slide"], planted["model"], overlap=0.5, progress=False)
    assert pred.map_transform.px_l0 == pytest.approx(TILE / 4)
    (x0, y0, x1, y1), _ = BLOCKS["stem"]
    cols, rows = pred.map_transform.to_map(np.array([x0, x1]), np.array([y0, y1]))
    inner = pred.maps[0, int(rows[0]) + 4 : int(rows[1]) - 4, int(cols[0]) + 4 : int(cols[1]) - 4]
    assert inner.size and inner.min() > 0.95
    assert np.nanmax(pred.maps[0, : int(rows[0]) - 8]) < 0.6  # tissue above the block


def test_bounds_offset_is_subtracted_in_geojson_only(planted, tmp_path):
    bx, by = 96, 32
    with open_slide(planted["slide"]) as slide:
        w, h = slide.info.dimensions
        slide.info = dataclasses.replace(slide.info, bounds=(bx, by, w - bx, h - by))
        thumb, mask = detect_tissue(slide, 8.0)
        grid = make_grid(slide, GridSpec(mpp=0.5, tile_px=TILE), mask=mask)
    assert tuple(grid.origin_l0) == (bx, by) and set(grid.xy_l0[:, 0] % TILE) == {bx % TILE}
    pred = predict_grid(grid, planted["model"], thumb=thumb, mask=mask, progress=False)
    write_slide_outputs(pred, tmp_path, planted["model"].card)
    features = json.loads((tmp_path / "planted.geojson").read_text())["features"]
    tiles = [f for f in features if f["properties"]["objectType"] == "tile"]
    corners = np.array([f["geometry"]["coordinates"][0][0] for f in tiles])
    np.testing.assert_array_equal(corners, grid.xy_l0 - [bx, by])
    table = np.loadtxt(tmp_path / "tiles.csv", delimiter=",", skiprows=1, usecols=(0, 1))
    np.testing.assert_array_equal(table, grid.xy_l0)  # tiles.csv stays in level-0 pixels
    stem = [
        f for f in features
        if f["properties"].get("classification", {}).get("name") == "stemness"
        and f["properties"]["measurements"]["Mean immunosuppressive probability"] < 0.5
    ]  # fmt: skip
    assert len(stem) == 1
    ring = np.array(stem[0]["geometry"]["coordinates"][0])
    (x0, y0, x1, y1), _ = BLOCKS["stem"]
    expected = np.array([x0 - bx, y0 - by, x1 - bx, y1 - by])
    got = np.array([*ring.min(axis=0), *ring.max(axis=0)])
    assert np.abs(got - expected).max() <= TILE  # tiles straddling the edge: ± one tile


def test_real_svs_end_to_end(cmu_svs, tmp_path):
    torch.manual_seed(0)
    card = ModelCard(name="random", backbone="small_cnn", tile_px=128, mpp=1.0)
    model = load_model(export_model(get_model("small_cnn", 2), card, tmp_path / "m"))
    pred = predict_slide(cmu_svs, model, progress=False)
    plan = pred.grid.plan
    assert plan.level == 0 and plan.read_px in (256, 257)  # 1 µm/px from 0.499: ~2x down
    assert len(pred.grid) > 10 and np.isfinite(pred.probs).all()
    summary = write_slide_outputs(pred, tmp_path / "out", card)
    assert summary["resolution"]["resize_factor"] == pytest.approx(128 / plan.read_px)
    assert 0.2 < summary["analysed_tissue_mm2"] / summary["tissue_mm2"] <= 1.0
    for target in card.targets:
        with openslide.OpenSlide(
            tmp_path / "out" / f"cmu_small_region_likelihood_map_{target}.tif"
        ) as o:
            assert o.dimensions == (2220 // 16, 2967 // 16)  # floor: ASAP's integer scale


# --- the command: batches, failures, resume ----------------------------------------------


def _infer(args: list[str], **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cscvision", "infer", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def batch(planted, tmp_path_factory) -> dict:
    """Three small slides and a broken one, run once uninterrupted into ``reference``."""
    folder = tmp_path_factory.mktemp("batch")
    slides = []
    for i in range(3):  # different tissue offsets, so the slides differ
        rgb = np.roll(planted_rgb(512, 384, SMALL), 32 * i, axis=1)
        slides.append(write_pyramid(folder / f"s{i}.tif", rgb, mpp=0.5, compression="deflate"))
    (folder / "broken.tif").write_bytes(b"II*\x00 this is not a slide")
    info = {"folder": folder, "slides": slides, "model_dir": planted["model_dir"]}
    info["reference"] = folder / "reference"
    info["reference_run"] = _infer(_args(info, info["reference"]))
    return info


def _args(batch: dict, out: Path, *extra: str) -> list[str]:
    slides = [*batch["slides"], batch["folder"] / "broken.tif"]
    return [*map(str, slides), "--model", str(batch["model_dir"]), "--out", str(out),
            "--overlap", "0.5", "--workers", "0", *extra]  # fmt: skip


def test_batch_records_a_broken_slide_and_finishes_the_others(batch):
    done, out = batch["reference_run"], batch["reference"]
    assert done.returncode == 1, done.stderr
    assert "3 done, 0 skipped (complete), 1 failed" in done.stdout
    errors = (out / "errors.csv").read_text()
    assert "broken" in errors and "broken.tif" in errors
    results = (out / "results.csv").read_text().splitlines()
    assert [r.split(",")[2] for r in results[1:]] == ["ok", "ok", "ok", "failed"]
    for i in range(3):
        names = {p.name for p in (out / f"s{i}").iterdir() if p.name != ".cscvision.lock"}
        assert names == {
            "tiles.csv", "maps.npz", "overlay_stemness.png", "overlay_immunosuppressive.png",
            f"s{i}_likelihood_map_stemness.tif", f"s{i}_likelihood_map_immunosuppressive.tif",
            f"s{i}.geojson", "summary.json",
        }  # fmt: skip


def test_killed_run_resumes_to_identical_outputs(batch, tmp_path):
    out = tmp_path / "killed"
    # Holding s2's lock (the run waits for it), the run cannot end before it is killed.
    with slide_lock(out / "s2"):
        proc = subprocess.Popen(
            [sys.executable, "-m", "cscvision", "infer", *_args(batch, out, "--wait")],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        # Kill it as soon as it starts writing the second slide's outputs.
        deadline = time.monotonic() + 120
        while not (out / "s1").exists() and time.monotonic() < deadline:
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (out / "s0" / "summary.json").exists()
    assert not (out / "s2" / "summary.json").exists(), "the run finished before it was killed"
    again = _infer(_args(batch, out))
    assert again.returncode == 1, again.stderr  # the broken slide still fails
    assert "2 done, 1 skipped (complete)" in again.stdout or "1 done, 2 skipped" in again.stdout
    assert output_snapshot(out) == output_snapshot(
        batch["reference"]
    )  # no partial or temporary file left


def test_shards_split_the_batch_and_overwrite_redoes_slides(batch, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(batch["reference"], out)
    ids = set()
    for shard, extra, done in (
        ("0/2", (), "0 done, 1 skipped"),
        ("1/2", ("--overwrite",), "2 done"),
    ):
        result = _infer(_args(batch, out, "--shard", shard, *extra))
        assert done in result.stdout, result.stderr
        name = f"results_shard{shard[0]}of2.csv"
        ids |= {line.split(",")[0] for line in (out / name).read_text().splitlines()[1:]}
        assert (out / f"errors_shard{shard[0]}of2.csv").exists()
    assert ids == {"s0", "s1", "s2", "broken"}
    redone = {
        k: v for k, v in output_snapshot(out).items() if not k.startswith(("results", "errors"))
    }
    reference = output_snapshot(batch["reference"])
    assert redone == {k: v for k, v in reference.items() if k in redone}
    assert set(reference) - set(redone) == {"results.csv", "errors.csv"}


def test_bad_flags_are_refused(batch, tmp_path):
    result = _infer(_args(batch, tmp_path, "--overlap", "0.9"))
    assert result.returncode == 2 and "--overlap 0.9" in result.stderr
    result = _infer(_args(batch, tmp_path, "--threads", "0"))
    assert result.returncode == 2 and "--threads 0" in result.stderr

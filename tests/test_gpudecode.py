"""Device decode path, run on CPU tensors: stream splicing, batch layout, assembly and
resizing against the CPU fast path (which equals OpenSlide's pixels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

from cscvision.slides.gpudecode import (
    DeviceTileReader,
    batch_layout,
    box_reduce,
    fetch_streams,
)
from cscvision.slides.slide import ReadPlan, open_slide
from cscvision.slides.storedtiles import StoredLevel, full_stream
from cscvision.testing import texture_tile_fn, write_pyramid

torch.set_num_threads(1)
CPU = torch.device("cpu")
WIDTH, HEIGHT = 1100, 900  # 5 x 4 stored tiles of 256 px, partial at the right and bottom


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpudecode")
    rgb = texture_tile_fn(seed=4)(0, 0, 0, WIDTH, HEIGHT)
    return {
        "generic": write_pyramid(root / "generic.tif", rgb, levels=1),
        "aperio": write_pyramid(root / "aperio.svs", rgb, aperio=True, levels=1),
        "deflate": write_pyramid(root / "deflate.tif", rgb, compression="deflate", levels=1),
    }


def plan(read_px: int, tile_px: int) -> ReadPlan:
    return ReadPlan(
        mpp=0.5 * read_px / tile_px,
        tile_px=tile_px,
        level=0,
        downsample=1.0,
        read_px=read_px,
        tile_l0=read_px,
    )


# Inside, across seams, over the right and bottom edges, past them, on a missing corner.
SPOTS = np.array([[0, 0], [300, 260], [WIDTH - 200, 100], [900, HEIGHT - 60], [1200, 1000]])


def device_and_cpu(path: Path, read_plan: ReadPlan) -> tuple[np.ndarray, np.ndarray]:
    with open_slide(path) as slide:
        reader = DeviceTileReader.open(str(path), slide.info, CPU)
        assert reader is not None
        got = reader.read(SPOTS, read_plan).numpy().transpose(0, 2, 3, 1)
        reader.close()
        want = np.stack([slide.read_tile(tuple(map(int, xy)), read_plan) for xy in SPOTS])
    return got.astype(np.int16), want.astype(np.int16)


@pytest.mark.parametrize("name", ["generic", "aperio"])
@pytest.mark.parametrize(("read_px", "tile_px"), [(256, 256), (224, 224), (448, 224), (512, 128)])
def test_device_tiles_equal_the_cpu_fast_path(slides, name, read_px, tile_px):
    # Assembly, cropping, white outside the level and box reduction by 2 and 4 are exact
    # (torch's CPU decoder is libjpeg-turbo with the same settings on these files).
    got, want = device_and_cpu(slides[name], plan(read_px, tile_px))
    assert got.shape == want.shape == (len(SPOTS), tile_px, tile_px, 3)
    np.testing.assert_array_equal(got, want)


def test_non_whole_factors_are_close_to_lanczos(slides):
    # 3x: (sum + 4) // 9 against PIL's fixed-point division; 1.5x: bilinear vs Lanczos.
    for read_px, tile_px, mean_max in ((192, 64, 0.1), (150, 100, 3.0)):
        got, want = device_and_cpu(slides["generic"], plan(read_px, tile_px))
        diff = np.abs(got - want)
        per_channel = diff.mean(axis=(0, 1, 2))
        assert per_channel.max() <= mean_max, (read_px, tile_px, per_channel, diff.max())
        assert diff.max() <= (1 if read_px % tile_px == 0 else 255)


def test_box_reduce_is_pils_reduce():
    rgb = np.random.default_rng(3).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    for factor in (2, 3, 4):
        want = np.asarray(Image.fromarray(rgb).reduce(factor)).astype(np.int16)
        image = torch.from_numpy(rgb).permute(2, 0, 1)[None]
        got = box_reduce(image, factor)[0].permute(1, 2, 0).numpy().astype(np.int16)
        assert np.abs(got - want).max() <= (0 if factor in (2, 4) else 1), factor


def test_spliced_aperio_streams_decode_alone(slides):
    with open_slide(slides["aperio"]) as slide:
        reader = DeviceTileReader.open(str(slides["aperio"]), slide.info, CPU)
        lvl = reader.reader.levels[0]
        assert lvl.header  # shared JPEG tables, so a stored stream alone is incomplete
        streams = fetch_streams(reader.reader, lvl, np.array([0, 7]))
        for index, stream in zip((0, 7), streams, strict=True):
            assert stream.startswith(lvl.header)
            want = reader.reader._decode(lvl, index)
            np.testing.assert_array_equal(simplejpeg.decode_jpeg(stream), want)
        reader.close()
    assert full_stream(b"\xff\xd8abc", b"") == b"\xff\xd8abc"
    assert full_stream(b"\xff\xd8abc", b"\xff\xd8HDR") == b"\xff\xd8HDRabc"


def test_batch_layout_known_answer():
    # 3 x 2 tiles of 100 px, tile 4 (row 1, col 1) missing.
    counts = np.array([10, 10, 10, 10, 0, 10])
    lvl = StoredLevel(page=0, width=300, height=200, tile_w=100, tile_h=100,
                      offsets=np.zeros(6, np.int64), bytecounts=counts, header=b"",
                      colorspace="YCBCR")  # fmt: skip
    layout = batch_layout(lvl, np.array([[50, 50], [200, 100]]), side=100)
    assert layout.indices.tolist() == [0, 1, 3, 5]  # tile 2 is not touched, 4 is missing
    white = len(layout.indices)
    # 2 x 2 tiles per region: region 0 spans tiles 0, 1 / 3, 4 (missing: white); region 1
    # spans tile 5 and three places outside the level.
    assert layout.slots[0].tolist() == [[0, 1], [2, white]]
    assert layout.slots[1].tolist() == [[3, white], [white, white]]
    assert layout.offset.tolist() == [[50, 50], [0, 0]]


def test_slides_without_jpeg_tiles_are_not_served(slides):
    with open_slide(slides["deflate"]) as slide:
        assert DeviceTileReader.open(str(slides["deflate"]), slide.info, CPU) is None


def test_bench_gpu_exits_cleanly_without_cuda():
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(root))
    done = subprocess.run([sys.executable, str(root / "scripts" / "bench_gpu.py")], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout and "nothing measured" in done.stdout


def test_predict_with_device_decode_equals_cpu_decode(slides):
    # The whole inference path with --decode gpu, run on the CPU device: same tiles, so the
    # same probabilities as the CPU fast path (1 µm/px from level 0: a 2x reduction).
    from cscvision.inference.predict import TileBatches, predict_tiles, prepare_slide
    from cscvision.models.backbones import get_model
    from cscvision.models.export import LoadedModel, ModelCard

    card = ModelCard(name="random", backbone="small_cnn", tile_px=64, mpp=1.0,
                     mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                     colors={"a": (230, 60, 40), "b": (40, 120, 230)},
                     thresholds={"a": 0.5, "b": 0.5})  # fmt: skip
    torch.manual_seed(0)
    model = LoadedModel(net=get_model("small_cnn", 2).eval(), card=card, path=Path("."))
    prepared = prepare_slide(slides["aperio"], card, batch_size=16, min_tissue=0.0)
    assert len(prepared.grid) > 16
    want = predict_tiles(prepared.grid, model, batch_size=16, decode="cpu", progress=False)
    batches = TileBatches(prepared.grid, 16)
    got = predict_tiles(prepared.grid, model, batch_size=16, decode="gpu", progress=False,
                        dataset=batches)  # fmt: skip
    assert batches.decode_device == CPU  # served by the device path, not handed back
    np.testing.assert_array_equal(got, want)

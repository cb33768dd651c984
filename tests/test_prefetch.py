"""Next-slide prefetch: the next pending slide is prepared in the background, and a
prepared slide scores exactly as one prepared on the spot."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from cscvision.inference.predict import TileBatches, predict_slide, prepare_slide
from cscvision.inference.prefetch import NextSlide
from cscvision.models.backbones import get_model
from cscvision.models.export import LoadedModel, ModelCard
from cscvision.slides.batch import SlideJob
from cscvision.slides.slide import SlideError
from cscvision.testing import texture_tile_fn, write_pyramid

torch.set_num_threads(1)


def jobs(*names: str) -> list[SlideJob]:
    return [SlideJob(slide_path=Path(f"{n}.tif"), slide_id=n) for n in names]


def test_the_next_pending_job_is_prepared_in_the_background():
    made: list[tuple[str, str]] = []
    release = threading.Event()

    def prepare(job: SlideJob) -> str:
        if job.slide_id == "c":
            release.wait(10)  # still running in the background when "a" is taken
        made.append((job.slide_id, threading.current_thread().name))
        return f"ready {job.slide_id}"

    batch = jobs("a", "b", "c")
    with NextSlide(batch, prepare, pending=lambda job: job.slide_id != "b") as nxt:
        assert nxt.take(batch[0]) == "ready a"  # nothing ahead: prepared here
        assert made == [("a", threading.current_thread().name)]
        release.set()
        assert nxt.take(batch[2]) == "ready c"  # "b" is complete: skipped
    assert made[1][0] == "c" and made[1][1].startswith("next-slide")


def test_a_failed_preparation_raises_for_its_own_job():
    def prepare(job: SlideJob) -> str:
        if job.slide_id == "bad":
            raise SlideError("bad.tif: corrupt")
        return job.slide_id

    batch = jobs("ok", "bad", "last")
    with NextSlide(batch, prepare) as nxt:
        assert nxt.take(batch[0]) == "ok"
        with pytest.raises(SlideError, match=r"bad\.tif"):
            nxt.take(batch[1])
        assert nxt.take(batch[2]) == "last"


@pytest.fixture(scope="module")
def slide_and_model(tmp_path_factory) -> tuple[Path, LoadedModel]:
    folder = tmp_path_factory.mktemp("prefetch")
    rgb = texture_tile_fn(seed=1)(0, 0, 0, 640, 512).copy()
    rgb[:, :160] = 243  # glass on the left
    slide = write_pyramid(folder / "s.tif", rgb, mpp=0.5, levels=1)
    card = ModelCard(
        name="random",
        backbone="small_cnn",
        tile_px=64,
        mpp=0.5,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        colors={"stemness": (230, 60, 40), "immunosuppressive": (40, 120, 230)},
        thresholds={"stemness": 0.5, "immunosuppressive": 0.5},
    )
    torch.manual_seed(0)
    net = get_model("small_cnn", 2).eval()
    return slide, LoadedModel(net=net, card=card, path=folder)


def test_prepared_slide_reads_ahead_and_scores_as_a_fresh_one(slide_and_model):
    slide, model = slide_and_model
    prepared = prepare_slide(slide, model.card, batch_size=8, read_ahead=2)
    assert set(prepared.batches.ready) == {0, 1}
    fresh = TileBatches(prepared.grid, 8)
    for index in (0, 1):
        ahead = prepared.batches.ready[index]
        again = fresh.read(index)
        assert torch.equal(ahead["image"], again["image"])
        assert torch.equal(ahead["xy"], again["xy"])
    fresh.close()
    want = predict_slide(slide, model, batch_size=8, progress=False)
    got = predict_slide(slide, model, batch_size=8, progress=False, prepared=prepared)
    np.testing.assert_array_equal(got.probs, want.probs)
    np.testing.assert_array_equal(got.grid.xy_l0, want.grid.xy_l0)
    assert not prepared.batches.ready  # the batches read ahead were used, not read twice

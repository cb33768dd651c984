"""``cscvision infer --ray``: the same outputs as the local path, failures, resume, workers.

One local Ray instance (2 CPUs, no dashboard) serves the whole module; the CLI runs in
this process and finds it connected. Tests that need Ray skip when it is not installed.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tissue_like

from cscvision.cli import main
from cscvision.inference.distributed import WorkerPlan, dispatch, plan_workers
from cscvision.models.backbones import get_model
from cscvision.models.export import ModelCard, export_model
from cscvision.slides.batch import SlideJob
from cscvision.testing import output_snapshot, write_pyramid

SLIDES = ("s0", "s1", "s2")


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason='Ray is not installed (pip install "cscvision[ray]")')
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> dict:
    """Three small slides, a broken one, and a small random model."""
    folder = tmp_path_factory.mktemp("raybatch")
    slides = []
    for i, name in enumerate(SLIDES):  # different tissue boxes, so the slides differ
        rgb = tissue_like(768, 512, seed=i, box=(64 + 32 * i, 64, 640, 448 - 32 * i))
        slides.append(write_pyramid(folder / f"{name}.tif", rgb, mpp=0.5, compression="jpeg"))
    broken = folder / "broken.tif"
    broken.write_bytes(b"II*\x00 this is not a slide")
    torch.manual_seed(0)
    card = ModelCard(name="random", backbone="small_cnn", tile_px=32, mpp=1.0)
    model_dir = export_model(get_model("small_cnn", 2), card, folder / "model")
    return {"folder": folder, "slides": [*slides, broken], "model_dir": model_dir}


def _infer(batch: dict, out: Path, *extra: str) -> int:
    args = ["infer", *map(str, batch["slides"]), "--model", str(batch["model_dir"]),
            "--out", str(out), "--overlap", "0.5", "--workers", "0", *extra]  # fmt: skip
    return main(args)


@pytest.fixture(scope="module")
def runs(batch, ray_local, tmp_path_factory) -> dict:
    """The batch run once on the local path and once on Ray."""
    root = tmp_path_factory.mktemp("rayruns")
    codes = {
        "local": _infer(batch, root / "local"),
        "ray": _infer(batch, root / "ray", "--ray", "--ray-workers", "2"),
    }
    return {"root": root, "codes": codes}


# --- planning (pure) -----------------------------------------------------------------------


def test_plan_is_one_worker_per_gpu_else_per_cpus():
    assert plan_workers({"CPU": 16, "GPU": 4}) == WorkerPlan(4, 1, 1.0)
    assert plan_workers({"CPU": 16, "GPU": 4}, device="cpu", cpus_per_worker=4).workers == 4
    assert plan_workers({"CPU": 16, "GPU": 2}, workers=4) == WorkerPlan(4, 1, 0.5)
    assert plan_workers({"CPU": 16, "GPU": 2}, workers=3).gpus_per_worker == 0.5  # packs
    assert plan_workers({"CPU": 7}, cpus_per_worker=2) == WorkerPlan(3, 2, 0.0)
    assert plan_workers({"CPU": 1}, cpus_per_worker=2).workers == 1
    with pytest.raises(ValueError, match="no GPU"):
        plan_workers({"CPU": 8}, device="cuda")
    with pytest.raises(ValueError, match="--ray-workers 0"):
        plan_workers({"CPU": 8}, workers=0)


# --- the command on Ray --------------------------------------------------------------------


def test_ray_outputs_are_those_of_the_local_path(batch, runs):
    assert runs["codes"] == {"local": 1, "ray": 1}  # the broken slide fails on both
    local, ray = output_snapshot(runs["root"] / "local"), output_snapshot(runs["root"] / "ray")
    assert sorted(local) == sorted(ray)
    for name in SLIDES:  # every output of every slide is there, byte for byte
        for file in (
            "tiles.csv", "maps.npz", "summary.json", f"{name}.geojson",
            f"{name}_likelihood_map_stemness.tif", "overlay_stemness.png",
        ):  # fmt: skip
            assert f"{name}/{file}" in ray
    differing = [k for k in local if local[k] != ray[k]]
    assert differing == []


def test_a_broken_slide_is_an_error_row_and_the_others_finish(runs):
    out = runs["root"] / "ray"
    errors = (out / "errors.csv").read_text().splitlines()
    assert len(errors) == 2 and errors[1].startswith("broken,") and "broken.tif" in errors[1]
    status = {
        r.split(",")[0]: r.split(",")[2] for r in (out / "results.csv").read_text().splitlines()[1:]
    }
    assert status == {"s0": "ok", "s1": "ok", "s2": "ok", "broken": "failed"}


def test_ray_resume_skips_complete_slides(batch, runs, tmp_path, capsys):
    out = tmp_path / "resume"
    shutil.copytree(runs["root"] / "ray", out)
    (out / "s1" / "summary.json").unlink()  # s1 was interrupted
    kept = {p: p.stat().st_mtime_ns for p in (out / "s0").iterdir()}
    capsys.readouterr()
    assert _infer(batch, out, "--ray") == 1
    assert "1 done, 2 skipped (complete), 1 failed" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "s0").iterdir()} == kept  # not rewritten
    assert output_snapshot(out) == output_snapshot(runs["root"] / "ray")


def test_a_worker_that_dies_fails_its_slide_and_is_replaced(ray_local):
    @ray_local.remote(num_cpus=0)
    class Worker:
        def ready(self) -> str:
            return "up"

        def run(self, job: SlideJob) -> str | None:
            if job.slide_id == "crash":
                os._exit(1)  # as a segfault in a decoder would
            return None if job.slide_id != "bad" else "SlideError: bad"

    jobs = [SlideJob(Path(f"{n}.tif"), n) for n in ("a", "crash", "b", "bad", "c", "d")]
    actors = [Worker.remote()]
    outcome = dispatch(jobs, actors, spawn=Worker.remote, progress=False)
    assert outcome["crash"].startswith("RayActorError")
    assert outcome["bad"] == "SlideError: bad"
    assert [outcome[n] for n in "abcd"] == [None] * 4
    assert len(actors) == 1  # the dead worker was replaced


def test_without_ray_the_flag_says_how_to_install_it(batch, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    assert _infer(batch, tmp_path / "out", "--ray") == 2
    assert 'pip install "cscvision[ray]"' in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_workers_hold_results_in_order(runs):
    """results.csv lists the slides in the order given, whatever order Ray finished them."""
    rows = (runs["root"] / "ray" / "results.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == [*SLIDES, "broken"]
    probs = np.loadtxt(runs["root"] / "ray" / "s0" / "tiles.csv", delimiter=",", skiprows=1)
    assert len(probs) > 10 and np.isfinite(probs).all()


# --- cscvision features --ray ---------------------------------------------------------------


@pytest.fixture(scope="module")
def feature_runs(batch, ray_local, tmp_path_factory) -> dict:
    """``cscvision features`` on the batch, once locally and once on Ray."""
    pytest.importorskip("h5py")
    from cscvision.models.encoders import save_random_weights

    root = tmp_path_factory.mktemp("rayfeatures")
    weights = save_random_weights("test-vit-tiny", root / "tiny.safetensors")

    def features(out: Path, *extra: str) -> int:
        return main(["features", *map(str, batch["slides"]), "--encoder", "test-vit-tiny",
                     "--weights", str(weights), "--out", str(out), "--workers", "0",
                     "--threads", "1", *extra])  # fmt: skip

    codes = {"local": features(root / "local"), "ray": features(root / "ray", "--ray")}
    return {"root": root, "codes": codes, "features": features}


def test_features_on_ray_writes_the_stores_of_the_local_path(feature_runs):
    from cscvision.features.store import read_feature_store

    assert feature_runs["codes"] == {"local": 1, "ray": 1}  # the broken slide fails on both
    local, ray = feature_runs["root"] / "local", feature_runs["root"] / "ray"
    for name in SLIDES:
        a, b = read_feature_store(local / f"{name}.h5"), read_feature_store(ray / f"{name}.h5")
        assert len(a) > 0 and a.slide_id == b.slide_id == name
        np.testing.assert_array_equal(a.xy_l0, b.xy_l0)
        np.testing.assert_array_equal(a.features, b.features)
        assert (a.encoder, a.weights_sha256, a.grid) == (b.encoder, b.weights_sha256, b.grid)

    def rows(out: Path) -> list[list[str]]:  # paths aside (each run its own --out)
        lines = (out / "results.csv").read_text().splitlines()[1:]
        return [[c for k, c in enumerate(line.split(",")) if k not in (1, 5)] for line in lines]

    assert rows(ray) == rows(local)
    assert [r[:2] for r in rows(ray)] == [
        ["s0", "done"], ["s1", "done"], ["s2", "done"], ["broken", "failed"]
    ]  # fmt: skip
    errors = (ray / "errors.csv").read_text().splitlines()
    assert len(errors) == 2 and errors[1].startswith("broken,") and "broken.tif" in errors[1]


def test_features_on_ray_resume_skips_complete_stores(feature_runs, tmp_path, capsys):
    out = tmp_path / "resume"
    shutil.copytree(feature_runs["root"] / "ray", out)
    (out / "s1.h5").unlink()  # s1 never finished
    kept = (out / "s0.h5").stat().st_mtime_ns
    capsys.readouterr()
    assert feature_runs["features"](out, "--ray") == 1
    assert "1 done, 2 skipped (complete), 1 failed" in capsys.readouterr().out
    assert (out / "s0.h5").stat().st_mtime_ns == kept and (out / "s1.h5").exists()


def _deleting_setup(*, device):
    """A Ray worker's job whose slide file is deleted while it is read, and whose reader then
    fails as OpenSlide does on a slide that went away."""
    import openslide

    def process(job: SlideJob) -> None:
        Path(job.slide_path).unlink()
        raise openslide.OpenSlideError("Passing closed slide object")

    return process


def test_a_slide_deleted_under_a_ray_worker_is_reported_as_gone(batch, tmp_path):
    from cscvision.inference.distributed import JobWorker

    victim = Path(shutil.copy(batch["slides"][0], tmp_path / "gone.tif"))
    worker = JobWorker(_deleting_setup, device="cpu")
    reason = worker.run(SlideJob(victim, "gone"))
    assert reason.startswith(f"SlideError: {victim}: the slide file went away")
    assert "Passing closed slide object" not in reason

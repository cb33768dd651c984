"""Real ``cscvision infer`` processes: stopped by SIGTERM mid-batch, two at once on one --out."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tissue_like

from cscvision.core.guard import slide_lock
from cscvision.core.io import read_csv
from cscvision.models.backbones import get_model
from cscvision.models.export import ModelCard, export_model
from cscvision.testing import output_snapshot, write_pyramid

ROOT = Path(__file__).resolve().parents[1]
N_SLIDES = 4

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> dict:
    """Four small slides, a tiny model, and one uninterrupted reference run."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("batch")
    card = ModelCard(name="tiny", backbone="small_cnn", tile_px=32, mpp=1.0)
    model = export_model(get_model("small_cnn", 2), card, folder / "model")
    (folder / "slides").mkdir()
    for i in range(N_SLIDES):
        rgb = tissue_like(512, 512, seed=i, box=(64 + 16 * i, 64, 448, 448))
        write_pyramid(folder / "slides" / f"s{i}.tif", rgb, mpp=0.5, levels=1)
    info = {"folder": folder, "model": model, "slides": folder / "slides"}
    done = _run(info, folder / "reference")
    assert done.returncode == 0, done.stderr
    info["reference"] = folder / "reference"
    return info


def _cmd(batch: dict, out: Path, *extra: str) -> list[str]:
    model = str(batch["model"])
    return [sys.executable, "-m", "cscvision", "infer", str(batch["slides"]), "--model", model,
            "--out", str(out), "--workers", "0", "--threads", "1", *extra]  # fmt: skip


def _run(batch: dict, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(batch, out, *extra), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def _rows(out: Path) -> dict[str, dict[str, str]]:
    return {r["slide_id"]: {k: v for k, v in r.items() if k != "seconds"}
            for r in read_csv(out / "results.csv")}  # fmt: skip


def _temporaries(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if ".tmp" in p.name]


def _signalled_mid_batch(batch: dict, out: Path, started: str, held: str, signum: int
                         ) -> tuple[subprocess.Popen, str]:  # fmt: skip
    """An ``infer --wait`` run, sent ``signum`` once slide ``started`` has begun; the ended
    process and its stderr.

    The test holds the lock of slide ``held`` (a later one), so the run cannot finish before
    the signal however fast or slow this machine is: at worst it waits there for the lock.
    """
    with slide_lock(out / held):
        proc = subprocess.Popen(_cmd(batch, out, "--wait"), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            while not (out / started).exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert proc.poll() is None, proc.communicate()[1]
            proc.send_signal(signum)
            _, stderr = proc.communicate(timeout=120)  # a lost signal leaves it waiting: fails
        finally:
            proc.kill()
    return proc, stderr


def test_sigterm_mid_batch_then_rerun_gives_the_uninterrupted_outputs(batch, tmp_path):
    out = tmp_path / "out"
    proc, stderr = _signalled_mid_batch(batch, out, "s1", "s3", signal.SIGTERM)
    assert proc.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and "re-run the same command to resume" in stderr
    assert "Traceback" not in stderr
    assert not _temporaries(out)
    rows = _rows(out)  # written for what finished
    assert "s0" in rows and "s3" not in rows
    assert not (out / "s3" / "summary.json").exists(), "the run finished before the signal"
    again = _run(batch, out)
    assert again.returncode == 0, again.stderr
    assert output_snapshot(out) == output_snapshot(batch["reference"])


def test_sigint_ends_the_batch_with_130(batch, tmp_path):
    out = tmp_path / "out"
    proc, stderr = _signalled_mid_batch(batch, out, "s0", "s2", signal.SIGINT)
    assert proc.returncode == 130, stderr
    assert "stopped by SIGINT" in stderr and not _temporaries(out)
    assert (out / "results.csv").exists() and (out / "errors.csv").exists()


def test_two_runs_on_one_out_never_corrupt_or_drop_anything(batch, tmp_path):
    out = tmp_path / "out"
    procs = [subprocess.Popen(_cmd(batch, out, *extra), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for extra in ((), ("--wait",))]  # fmt: skip
    results = [p.communicate(timeout=600) for p in procs]
    for proc, (_, stderr) in zip(procs, results, strict=True):
        assert proc.returncode == 0, stderr
    reference = output_snapshot(batch["reference"])
    mine = output_snapshot(out)
    slides = {k: v for k, v in reference.items() if not k.startswith(("results", "errors"))}
    assert {k: v for k, v in mine.items() if k in slides} == slides
    assert set(mine) == set(reference)
    assert _rows(out) == _rows(batch["reference"])
    assert not _temporaries(out)
    # each slide was scored by exactly one run (the other skipped it as busy or complete)
    done = sum(int(s.split(" done")[0].split()[-1]) for s, _ in results)
    assert done == N_SLIDES

"""docs/tutorials/scverse.md runs as written: its bash and python blocks, in order, in one
folder holding the two stand-in slides it scores (the ``cscvision synth`` of
docs/tutorials/index.md, at its size and seed, without the slides and extras it leaves
unused)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from test_docs import fenced_blocks, run_page

from cscvision.cli import main

pytest.importorskip("squidpy")
pytest.importorskip("spatialdata")

PAGE = Path(__file__).resolve().parents[1] / "docs" / "tutorials" / "scverse.md"
STAND_IN = "synth --out slides --slides 2 --patients 2 --size 1536 --seed 0"


@pytest.mark.slow
def test_scverse_tutorial_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(shlex.split(STAND_IN)) == 0
    ran = [b.lang for b in fenced_blocks(PAGE.read_text(encoding="utf-8"))]
    assert ran == ["bash", "python", "python", "bash", "python"]
    run_page(PAGE, tmp_path, {"__name__": "__tutorial__"})  # one namespace: a notebook
    assert (tmp_path / "figures" / "nhood_enrichment.png").stat().st_size > 0
    assert (tmp_path / "figures" / "stemness.png").stat().st_size > 0
    assert (tmp_path / "batch.zarr" / "tables" / "tiles").is_dir()

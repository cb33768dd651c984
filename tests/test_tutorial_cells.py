"""docs/tutorials/cells.md runs as written: its bash and python blocks, in order, in one
folder holding the tutorials' stand-in cohort (the ``cscvision synth`` of
docs/tutorials/index.md, without its Visium folders and slide labels, which this page
does not use)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from test_docs import fenced_blocks, run_page

from cscvision.cli import main

PAGE = Path(__file__).resolve().parents[1] / "docs" / "tutorials" / "cells.md"
STAND_IN = "synth --out slides --slides 4 --patients 4 --size 2048 --seed 0"


@pytest.mark.slow
def test_cells_tutorial_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(shlex.split(STAND_IN)) == 0
    ran = [b.lang for b in fenced_blocks(PAGE.read_text(encoding="utf-8"))]
    assert ran.count("bash") == 2 and ran.count("python") == 2
    run_page(PAGE, tmp_path, {"__name__": "__tutorial__"})
    summary = (tmp_path / "cells" / "SYN-P001-S01" / "summary.json").read_text()
    assert '"inflammatory"' in summary and "density_inflammatory" in summary
    assert (tmp_path / "cells" / "SYN-P001-S01" / "overlay_density_inflammatory.png").exists()

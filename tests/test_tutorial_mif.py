"""docs/tutorials/mif.md runs as written: its bash and python blocks, in order, in an empty
folder (the page makes its own synthetic slides)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_docs import fenced_blocks, run_page

PAGE = Path(__file__).resolve().parents[1] / "docs" / "tutorials" / "mif.md"


@pytest.mark.slow
def test_mif_tutorial_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ran = [b.lang for b in fenced_blocks(PAGE.read_text(encoding="utf-8"))]
    assert ran.count("bash") == 4 and ran.count("python") == 2
    run_page(PAGE, tmp_path, {"__name__": "__tutorial__"})
    out = capsys.readouterr().out
    sensitivity = float(re.search(r"Treg sensitivity ([\d.]+)", out)[1])
    specificity = float(re.search(r"specificity ([\d.]+)", out)[1])
    assert sensitivity > 0.85 and specificity > 0.95
    assert (tmp_path / "mif_labels" / "cohort.csv").exists()
    assert (tmp_path / "mif_cells" / "SYN-P001-S01" / "overlay_density_treg.png").exists()

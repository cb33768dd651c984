"""docs/tutorials/cells-phenotype.md runs as written: its bash and python blocks, in order,
in an empty folder (the page makes its own synthetic slides)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_docs import fenced_blocks, run_page

PAGE = Path(__file__).resolve().parents[1] / "docs" / "tutorials" / "cells-phenotype.md"


@pytest.mark.slow
def test_cells_phenotype_tutorial_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ran = [b.lang for b in fenced_blocks(PAGE.read_text(encoding="utf-8"))]
    assert ran.count("bash") == 4 and ran.count("python") == 2
    run_page(PAGE, tmp_path, {"__name__": "__tutorial__"})
    rows = (tmp_path / "cells" / "immune_phenotypes.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("slide_id,scope,phenotype")
    designs = {
        line.split('"design": "')[1].split('"')[0]
        for line in (p.read_text() for p in (tmp_path / "slides").glob("*_truth.json"))
    }
    assert designs == {"inflamed", "excluded", "desert"}  # the page's seed shows all three

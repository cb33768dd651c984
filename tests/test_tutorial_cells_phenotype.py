"""docs/tutorials/cells-phenotype.md runs as written: its bash and python blocks, in order,
in an empty folder (the page makes its own synthetic slides)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from cscvision.cli import main

PAGE = Path(__file__).resolve().parents[1] / "docs" / "tutorials" / "cells-phenotype.md"


def blocks(text: str) -> list[tuple[str, str]]:
    return [(m[1], m[2]) for m in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", text, re.M | re.S)]


@pytest.mark.slow
def test_cells_phenotype_tutorial_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ran = []
    for lang, code in blocks(PAGE.read_text(encoding="utf-8")):
        if lang == "python":
            exec(compile(code, str(PAGE), "exec"), {"__name__": "__tutorial__"})
        elif lang == "bash":
            for line in (c for c in code.splitlines() if c.strip() and not c.startswith("#")):
                words = shlex.split(line)
                assert words[0] == "cscvision", line
                assert main(words[1:]) == 0, line
        ran.append(lang)
    assert ran.count("bash") == 4 and ran.count("python") == 2
    rows = (tmp_path / "cells" / "immune_phenotypes.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("slide_id,scope,phenotype")
    designs = {
        line.split('"design": "')[1].split('"')[0]
        for line in (p.read_text() for p in (tmp_path / "slides").glob("*_truth.json"))
    }
    assert designs == {"inflamed", "excluded", "desert"}  # the page's seed shows all three

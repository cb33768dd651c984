"""docs/tutorials/cells.md runs as written: its bash and python blocks, in order, in one
folder holding the tutorials' stand-in cohort (the ``cscvision synth`` of
docs/tutorials/index.md, without its Visium folders and slide labels, which this page
does not use)."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from cscvision.cli import main

PAGE = Path(__file__).resolve().parents[1] / "docs" / "tutorials" / "cells.md"
STAND_IN = "synth --out slides --slides 4 --patients 4 --size 2048 --seed 0"


def blocks(text: str) -> list[tuple[str, str]]:
    return [(m[1], m[2]) for m in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", text, re.M | re.S)]


@pytest.mark.slow
def test_cells_tutorial_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(shlex.split(STAND_IN)) == 0
    ran = []
    for lang, code in blocks(PAGE.read_text(encoding="utf-8")):
        if lang == "python":
            exec(compile(code, str(PAGE), "exec"), {"__name__": "__tutorial__"})
        elif lang == "bash":
            for line in (c for c in code.splitlines() if c.strip() and not c.startswith("#")):
                words = shlex.split(line)
                if words[0] == "cscvision":
                    assert main(words[1:]) == 0, line
                else:
                    subprocess.run(["bash", "-ec", line], check=True)
        ran.append(lang)
    assert ran.count("bash") == 2 and ran.count("python") == 2
    summary = (tmp_path / "cells" / "SYN-P001-S01" / "summary.json").read_text()
    assert '"inflammatory"' in summary and "density_inflammatory" in summary
    assert (tmp_path / "cells" / "SYN-P001-S01" / "overlay_density_inflammatory.png").exists()

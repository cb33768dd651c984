"""docs/tutorials/scverse.md runs as written: its bash and python blocks, in order, in one
folder holding the two stand-in slides it scores (the ``cscvision synth`` of
docs/tutorials/index.md, at its size and seed, without the slides and extras it leaves
unused)."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from cscvision.cli import main

pytest.importorskip("squidpy")
pytest.importorskip("spatialdata")

PAGE = Path(__file__).resolve().parents[1] / "docs" / "tutorials" / "scverse.md"
STAND_IN = "synth --out slides --slides 2 --patients 2 --size 1536 --seed 0"


def blocks(text: str) -> list[tuple[str, str]]:
    return [(m[1], m[2]) for m in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", text, re.M | re.S)]


@pytest.mark.slow
def test_scverse_tutorial_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(shlex.split(STAND_IN)) == 0
    ran, notebook = [], {"__name__": "__tutorial__"}  # one namespace: cells of one notebook
    for lang, code in blocks(PAGE.read_text(encoding="utf-8")):
        if lang == "python":
            exec(compile(code, str(PAGE), "exec"), notebook)
        elif lang == "bash":
            joined = re.sub(r"\s*\\\n\s*", " ", code)
            for line in (c for c in joined.splitlines() if c.strip() and not c.startswith("#")):
                words = shlex.split(line)
                if words[0] == "cscvision":
                    assert main(words[1:]) == 0, line
                else:
                    subprocess.run(["bash", "-ec", line], check=True)
        ran.append(lang)
    assert ran == ["bash", "python", "python", "bash", "python"]
    assert (tmp_path / "figures" / "nhood_enrichment.png").stat().st_size > 0
    assert (tmp_path / "figures" / "stemness.png").stat().st_size > 0
    assert (tmp_path / "batch.zarr" / "tables" / "tiles").is_dir()

"""docs/tutorials/mif.md runs as written: its bash and python blocks, in order, in an empty
folder (the page makes its own synthetic slides)."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from cscvision.cli import main

PAGE = Path(__file__).resolve().parents[1] / "docs" / "tutorials" / "mif.md"


def blocks(text: str) -> list[tuple[str, str]]:
    return [(m[1], m[2]) for m in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", text, re.M | re.S)]


@pytest.mark.slow
def test_mif_tutorial_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
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
    assert ran.count("bash") == 4 and ran.count("python") == 2
    out = capsys.readouterr().out
    sensitivity = float(re.search(r"Treg sensitivity ([\d.]+)", out)[1])
    specificity = float(re.search(r"specificity ([\d.]+)", out)[1])
    assert sensitivity > 0.85 and specificity > 0.95
    assert (tmp_path / "mif_labels" / "cohort.csv").exists()
    assert (tmp_path / "mif_cells" / "SYN-P001-S01" / "overlay_density_treg.png").exists()

"""The manual: its tutorials run as written, the README's example runs, the site builds.

Every ``bash`` and ``python`` block of a tutorial page runs, in page order, in one empty
folder that first gets the stand-in cohort of ``docs/tutorials/index.md``. A block titled
with a file name (```` ```yaml title="x.yaml" ````) is written to that file. A block titled
``Not run by the tests: REASON`` is skipped, and REASON must be one the issue allows (a GPU,
real foundation-model weights, a cluster). ``cscvision ...`` commands without shell syntax
run in this process through ``cscvision.cli.main`` (no interpreter start per command);
everything else runs under ``bash -e`` with this environment's ``bin`` first on ``PATH``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "docs" / "tutorials"
# Run after the index (the stand-in cohort); each page needs only what the index made.
PAGES = ("qupath-annotations", "ihc", "spatial-transcriptomics", "mil", "cluster", "notebook")
NOT_RUN = "Not run by the tests:"
ALLOWED_REASONS = re.compile(r"\b(GPU|weights|cluster|SLURM)\b", re.I)
SHELL_SYNTAX = re.compile(r"[|&;<>$`*?(){}]")
FILE_TITLE = re.compile(r"^[\w.-]+(/[\w.-]+)*\.\w+$")


@dataclass(frozen=True)
class Block:
    lang: str
    title: str
    code: str
    line: int

    @property
    def skipped_because(self) -> str | None:
        return self.title[len(NOT_RUN) :].strip() if self.title.startswith(NOT_RUN) else None


def fenced_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown page, indented ones (in lists) included."""
    blocks, lines, i = [], text.splitlines(), 0
    opening = re.compile(r"^(\s*)```(\w*)\s*(.*)$")
    while i < len(lines):
        m = opening.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, attrs = len(m[1]), m[2], m[3]
        title = re.search(r'title="([^"]*)"', attrs)
        body, j = [], i + 1
        while not re.match(rf"^\s{{{indent}}}```\s*$", lines[j]):
            body.append(lines[j][indent:])
            j += 1
        blocks.append(Block(lang, title[1] if title else "", "\n".join(body) + "\n", i + 1))
        i = j + 1
    return blocks


def shell_commands(code: str) -> list[str]:
    """A bash block's commands: continuation lines joined, comment lines dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", code)
    return [c for c in joined.splitlines() if c.strip() and not c.lstrip().startswith("#")]


def run_shell(command: str, cwd: Path, where: str) -> None:
    words = shlex.split(command, comments=True)
    if words[0] == "cscvision" and not SHELL_SYNTAX.search(command.split("#")[0]):
        from cscvision.cli import main

        assert main(words[1:]) == 0, f"{where}: {command}"
        return
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(
        ["bash", "-eo", "pipefail", "-c", command], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, f"{where}: {command}\n{done.stdout}\n{done.stderr}"
    print(done.stdout, end="")


def run_page(page: Path, cwd: Path, namespace: dict) -> None:
    """Run one page's blocks in order; ``bash`` state (variables) lasts one block."""
    for block in fenced_blocks(page.read_text(encoding="utf-8")):
        where = f"{page.relative_to(ROOT)}:{block.line}"
        reason = block.skipped_because
        if reason is not None:
            assert ALLOWED_REASONS.search(reason), f"{where}: not runnable only for a GPU, "
            continue
        if FILE_TITLE.match(block.title):
            (cwd / block.title).parent.mkdir(parents=True, exist_ok=True)
            (cwd / block.title).write_text(block.code, encoding="utf-8")
        elif block.lang == "bash":
            commands = shell_commands(block.code)
            if any(SHELL_SYNTAX.search(c.split("#")[0]) for c in commands):
                run_shell("\n".join(commands), cwd, where)  # variables cross lines: one bash
            else:
                for command in commands:
                    run_shell(command, cwd, where)
        elif block.lang == "python":
            exec(compile(block.code, where, "exec"), namespace)


@pytest.fixture(scope="module")
def tutorial_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tutorials")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        run_page(TUTORIALS / "index.md", folder, {})
    finally:
        os.chdir(cwd)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("name", PAGES)
def test_tutorial_runs_as_written(name, tutorial_folder, monkeypatch):
    monkeypatch.chdir(tutorial_folder)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    run_page(TUTORIALS / f"{name}.md", tutorial_folder, {"__name__": "__tutorial__"})


def test_every_tutorial_page_is_run():
    """A new tutorial page cannot be left untested: it is in PAGES, or a test file of its
    own names it (as ``tests/test_tutorial_<name>.py`` may)."""
    tests = {p: p.read_text(encoding="utf-8") for p in Path(__file__).parent.glob("test_*.py")}
    for page in TUTORIALS.glob("*.md"):
        if page.stem == "index" or page.stem in PAGES:
            continue
        elsewhere = [p.name for p, text in tests.items() if p.name != Path(__file__).name
                     and f"tutorials/{page.name}" in text.replace('" / "', "/")]  # fmt: skip
        assert elsewhere, f"{page.relative_to(ROOT)}: no test runs it; add it to PAGES"
    for name in PAGES:
        blocks = fenced_blocks((TUTORIALS / f"{name}.md").read_text(encoding="utf-8"))
        assert any(b.lang in ("bash", "python") and not b.skipped_because for b in blocks), name
        for b in blocks:  # every skipped block gives an allowed reason
            assert b.skipped_because is None or ALLOWED_REASONS.search(b.skipped_because), (
                f"{name}.md:{b.line}: {b.title}"
            )


def test_fenced_blocks_parser():
    text = (
        "x\n```bash\ncscvision a \\\n  --b 1  # c\n# only a comment\n```\n"
        '1. step\n\n   ```yaml title="m.yaml"\n   k: 1\n   ```\n'
        '```bash title="Not run by the tests: needs a GPU"\nrm -rf /\n```\n'
    )
    b = fenced_blocks(text)
    assert [x.lang for x in b] == ["bash", "yaml", "bash"]
    assert shell_commands(b[0].code) == ["cscvision a --b 1  # c"]
    assert b[1].title == "m.yaml" and b[1].code == "k: 1\n"
    assert b[2].skipped_because == "needs a GPU"


# --- the site ------------------------------------------------------------------------------------

ASSET_URL = re.compile(
    r"""<(?:link|script|img|source|iframe|audio|video|embed)\b[^>]*?\b(?:href|src|srcset)\s*=\s*["']?\s*((?:https?:)?//[^"'\s>]+)"""
    r"""|@import\s+(?:url\()?\s*["']?((?:https?:)?//[^"')\s;]+)"""
    r"""|url\(\s*["']?((?:https?:)?//[^"')\s]+)""",
    re.I,
)


def external_assets(text: str) -> list[str]:
    """URLs on the network that a page or stylesheet would load when viewed (stylesheets,
    scripts, images, fonts); ordinary links (<a href>) are not loads."""
    return [next(g for g in m.groups() if g) for m in ASSET_URL.finditer(text)]


def test_external_asset_finder():
    page = (
        '<link rel="stylesheet" href="https://fonts.googleapis.com/css?family=Roboto">'
        '<script src="//cdn.example.org/x.js"></script><img alt="" src="assets/a.png">'
        '<a href="https://diataxis.fr/">a link</a><style>@import "https://x.org/y.css";</style>'
        "body{background:url(https://x.org/bg.png)} .i{mask-image:url('data:image/svg+xml;a')}"
    )
    assert external_assets(page) == [
        "https://fonts.googleapis.com/css?family=Roboto",
        "//cdn.example.org/x.js",
        "https://x.org/y.css",
        "https://x.org/bg.png",
    ]


@pytest.mark.slow
def test_site_builds_strict_and_offline(tmp_path):
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert "WARNING" not in log, log
    pages = {p.relative_to(site).as_posix() for p in site.rglob("*.html")}
    assert {"index.html", "reference/cli.html", "reference/api.html"} <= pages
    found = {
        f"{p.relative_to(site)}: {url}"
        for p in site.rglob("*")
        if p.suffix in (".html", ".css")
        for url in external_assets(p.read_text(encoding="utf-8", errors="replace"))
    }
    assert not found, "assets loaded from the network:\n" + "\n".join(sorted(found))
    # the generated references hold what the code holds
    from cscvision.cli import COMMANDS

    cli = (site / "reference" / "cli.html").read_text(encoding="utf-8")
    assert all(f"cscvision {c}" in cli for c in COMMANDS) and "--permutations" in cli
    api = (site / "reference" / "api.html").read_text(encoding="utf-8")
    assert "predict_slide" in api and "Parameters" in api

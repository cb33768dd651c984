"""The built wheel installs into another environment and works there, away from the clone.

The environment already holds torch and the other dependencies: a fresh venv whose site
reaches this interpreter's packages (all but cscvision itself) through a ``.pth`` link,
as ``--system-site-packages`` would for a system Python. Installing the wheel with the
constraints file must keep that torch, and the installed commands must find the packaged
demo model and configs from a folder outside the clone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(cmd: list, cwd: Path, env: dict, timeout: int = 240) -> str:
    done = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def _build_wheel(out: Path, env: dict) -> Path:
    """sdist, then the wheel from that sdist, so both must carry the package data."""
    cmd = [sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT]
    _run(cmd, ROOT, env)
    (wheel,) = out.glob("cscvision-*.whl")
    return wheel


def _package_files() -> set[str]:
    """Every file of the source package (code and data), as the wheel names it."""
    package = ROOT / "cscvision"
    return {
        p.relative_to(ROOT).as_posix()
        for p in package.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def _underlay(folder: Path) -> Path:
    """Links to every package of this interpreter's site except cscvision's own files."""
    folder.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(("cscvision", "__editable__")) or name.endswith(".pth"):
            continue
        (folder / entry.name).symlink_to(entry)
    return folder


def _venv_with_torch(tmp: Path, env: dict) -> Path:
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp, env)
    python = venv / "bin" / "python"
    purelib = _run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, env
    )
    Path(purelib.strip(), "_underlay.pth").write_text(f"{_underlay(tmp / 'underlay')}\n")
    return python


def _torch_of(python: Path, cwd: Path, env: dict) -> str:
    return _run([python, "-c", "import torch; print(torch.__version__, torch.__file__)"], cwd, env)


def test_wheel_installs_keeps_torch_and_runs_outside_the_clone(tmp_path):
    from cscvision.synth import write_slide

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    wheel = _build_wheel(tmp_path / "dist", env)
    with zipfile.ZipFile(wheel) as whl:  # package data of every kind ships, not only code
        assert _package_files() - set(whl.namelist()) == set()
    python = _venv_with_torch(tmp_path, env)
    work = tmp_path / "work"
    work.mkdir()
    torch_before = _torch_of(python, work, env)
    pip = [python, "-m", "pip", "install", wheel, "-c", ROOT / "constraints.txt"]
    installed = _run(pip, work, env, timeout=300)
    assert "Successfully installed" in installed and "cscvision-" in installed
    assert "Requirement already satisfied: torch>=" in installed, installed
    actions = [ln for ln in installed.splitlines() if ln.startswith(("Collecting", "Download"))]
    assert not [ln for ln in actions if "torch" in ln], installed
    assert "torch" not in installed.split("Successfully installed")[1], installed
    assert _torch_of(python, work, env) == torch_before

    bin_dir = python.parent
    where = _run([python, "-c", "import cscvision; print(cscvision.__file__)"], work, env)
    assert str(tmp_path / "venv") in where and str(ROOT) not in where
    doctor = _run([bin_dir / "cscvision", "doctor"], work, env)
    assert doctor.rstrip().endswith("ok") and "extra features:" in doctor
    write_slide(work / "slide.tiff", size_px=1024, seed=5)
    infer = [bin_dir / "cscvision", "infer", "slide.tiff", "--model", "demo", "--out", "out"]
    _run([*infer, "--threads", "1", "--workers", "0"], work, env)
    assert (work / "out/slide/summary.json").is_file()
    shown = _run([bin_dir / "cscvision", "config", "show", "default"], work, env)
    assert "every key" in shown
    demo = [bin_dir / "cscvision", "demo", "--out", "demo", "--slides", "6", "--patients", "6"]
    _run([*demo, "--size", "1024", "trainer.max_epochs=1"], work, env)
    assert (work / "demo/infer/results.csv").is_file()

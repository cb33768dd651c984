"""The one CLI wrapper (``cscvision.cli.run_command``) runs every command: bad input is one
line on stderr naming the command, and exit status 2. A command added to the parser without
a case here fails :func:`test_every_command_has_a_bad_input_case`."""

from __future__ import annotations

import argparse

import pytest

from cscvision.cli import build_parser, main
from cscvision.core.config_files import MAX_YAML_NODES

MISSING = "no/such/input"
# One bad input per command, each refused before any slide or model is read (None: the
# command takes no input that can be bad).
BAD_INPUT: dict[str, list[str]] = {
    "demo": ["--config", f"{MISSING}.yaml", "--out", "{out}"],
    "synth": ["--out", "{out}", "--tile", "100"],
    "tile": [MISSING, "--out", "{out}", "--mask-mpp", "0"],  # a missing slide: errors.csv
    "register": [MISSING, f"{MISSING}.ihc", "--out", "{out}"],
    "labels ihc": [f"{MISSING}.csv", "--markers", f"{MISSING}.yaml", "--out", "{out}"],
    "labels st": [f"{MISSING}.csv", "--out", "{out}"],
    "labels cells": [f"{MISSING}.csv", "--feature", "x", "--out", "{out}"],
    "labels mif": [f"{MISSING}.csv", "--panel", f"{MISSING}.yaml", "--out", "{out}"],
    "train": ["--config", f"{MISSING}.yaml", "--run-dir", "{out}"],
    "infer": [MISSING, "--out", "{out}", "--model", MISSING],
    "cells": [MISSING, "--out", "{out}", "--cells", MISSING],
    "stain fit": [MISSING, "--out", "{out}/ref.json"],
    "stain show": [f"{MISSING}.json"],
    "features": [MISSING, "--out", "{out}", "--encoder", "no_such_encoder"],
    "encoders": None,  # a listing: a missing --weights-dir lists every file as not found
    "mil": ["m.csv", "--labels", MISSING, "--target", "t", "--features", MISSING, "--out", "{out}"],
    "stats": [MISSING],
    "export anndata": [MISSING, "--out", "{out}"],
    "export spatialdata": [MISSING, "--out", "{out}"],
    "report": [MISSING],
    "view": [MISSING],
    "config list": None,  # takes no input
    "config show": ["no_such_config"],
    "config schema": ["--out", "{tmp}"],  # a folder, not a file
    "config copy": ["no_such_config", "{out}.yaml"],
    "doctor": None,  # a health check: a slide it cannot open is a failed check, exit 1
}


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[str]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = _commands(sub, (*prefix, name))
                found.extend(nested or [" ".join((*prefix, name))])
    return found


def test_every_command_has_a_bad_input_case():
    assert sorted(_commands(build_parser())) == sorted(BAD_INPUT)


@pytest.mark.parametrize("command", [c for c, argv in BAD_INPUT.items() if argv is not None])
def test_bad_input_is_one_line_and_exit_2(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # MISSING is relative: never there
    out = str(tmp_path / "a" / "out")
    argv = [a.format(out=out, tmp=tmp_path) for a in BAD_INPUT[command]]
    status = main([*command.split(), *argv])
    err = capsys.readouterr().err
    assert status == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"cscvision {command.split()[0]}"), err
    assert [p for p in tmp_path.rglob("*") if not p.is_dir()] == []  # nothing written


def _bomb(path):
    """Nine levels of ten aliases each: 10**9 values once expanded."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_yaml_readers_refuse_an_alias_bomb(tmp_path):
    from cscvision.cells.mif_panel import PanelError, read_panel
    from cscvision.cells.phenotype import PhenotypeError, read_config
    from cscvision.cells.readers import CellReadError, _mapping
    from cscvision.cells.types import CellTypeError, _read_config

    bomb = _bomb(tmp_path / "bomb.yaml")
    limit = f"more than {MAX_YAML_NODES:,} values"
    for read, error in (
        (read_panel, PanelError),
        (read_config, PhenotypeError),
        (_read_config, CellTypeError),
        (lambda p: _mapping("qupath", str(p)), CellReadError),
    ):
        with pytest.raises(error, match=r"bomb\.yaml") as caught:
            read(bomb)
        assert limit in str(caught.value)


def test_labels_ihc_markers_alias_bomb_is_one_line(tmp_path, capsys):
    bomb = _bomb(tmp_path / "markers.yaml")
    out = tmp_path / "out"
    status = main(["labels", "ihc", "m.csv", "--markers", str(bomb), "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and len(err.splitlines()) == 1
    assert err.startswith("cscvision labels ihc: ") and "markers.yaml" in err
    assert f"more than {MAX_YAML_NODES:,} values" in err


def test_config_copy_onto_a_folder_is_refused(tmp_path, capsys):
    folder = tmp_path / "configs"
    folder.mkdir()
    assert main(["config", "copy", "cpu_demo", str(folder), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cscvision config") and len(err.splitlines()) == 1
    assert "is a folder" in err and str(folder / "cpu_demo.yaml") in err
    assert list(folder.iterdir()) == []


def test_a_signal_outside_a_batch_loop_still_gets_the_notice_and_143():
    """SIGTERM after a batch's loop (while its tables are written) meets the wrapper's
    handler, not Python's default: a notice and exit 143, never a silent -15."""
    import subprocess
    import sys

    code = (
        "import argparse, os, signal, sys\n"
        "from cscvision.cli import run_command\n"
        "def after_the_loop(args):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return 0\n"
        "sys.exit(run_command(argparse.Namespace(command='tile', func=after_the_loop)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 143, (done.returncode, done.stderr)
    assert "stopped by" in done.stderr and "re-run to resume" in done.stderr

"""Package data (demo model, configs) found by name from anywhere; doctor's extras report."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement

import cscvision
from cscvision.cli import main
from cscvision.cli.doctor import _extras_lines, _missing
from cscvision.core.resources import packaged_dir
from cscvision.models.card import ModelError, read_card, resolve_model_dir
from cscvision.training.config import ConfigError, config_names, load_config, resolve_config

ROOT = Path(__file__).resolve().parents[1]
RESOURCES = Path(cscvision.__file__).parent / "resources"


@pytest.fixture()
def elsewhere(tmp_path, monkeypatch):
    """A working directory outside the clone."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_demo_resolves_to_the_packaged_model_from_any_directory(elsewhere):
    demo = resolve_model_dir("demo")
    assert demo == RESOURCES / "models" / "demo-synthetic"
    assert resolve_model_dir("demo-synthetic") == demo
    assert read_card("demo").name == "demo-synthetic"
    assert {p.name for p in demo.iterdir()} >= {"model.json", "model.safetensors", "README.md"}


def test_a_folder_path_wins_over_a_packaged_name(elsewhere):
    (elsewhere / "demo").mkdir()
    assert resolve_model_dir("demo") == Path("demo")
    assert resolve_model_dir(elsewhere / "demo") == elsewhere / "demo"


def test_unknown_model_names_the_choices(elsewhere):
    with pytest.raises(ModelError, match=r"nope: no such model folder.*demo, demo-synthetic"):
        resolve_model_dir("nope")
    assert resolve_model_dir("somewhere/demo") == Path("somewhere/demo")  # a path stays one
    with pytest.raises(ModelError, match="no model card"):
        read_card("somewhere/demo")


def test_demo_with_an_unknown_config_exits_2(elsewhere, capsys):
    assert main(["demo", "--config", "nope", "--out", "d"]) == 2
    assert "no packaged config" in capsys.readouterr().err
    assert not (elsewhere / "d").exists()


def test_clone_paths_are_the_packaged_files():
    assert (ROOT / "models/demo-synthetic").resolve() == resolve_model_dir("demo").resolve()
    assert (ROOT / "configs").resolve() == packaged_dir("configs").resolve()


def test_configs_by_name(elsewhere):
    assert {"cpu_demo", "default", "gpu", "multi_gpu"} <= set(config_names())
    assert config_names() == sorted(config_names())
    assert resolve_config("default") == RESOURCES / "configs" / "default.yaml"
    assert resolve_config("default.yaml") == resolve_config("default")
    assert load_config("default") == load_config(None)
    assert load_config("cpu_demo").name == "cpu_demo"
    (elsewhere / "default").write_text("name: mine\n")  # a file in the working dir wins
    assert load_config("default").name == "mine"
    with pytest.raises(
        ConfigError, match=r"nope: no such config file.*cpu_demo, cpu_head_demo, default"
    ):
        resolve_config("nope")


def test_config_command_lists_shows_and_copies(elsewhere, capsys):
    assert main(["config", "list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == config_names()
    assert "every key" in next(line for line in listed if line.startswith("default "))
    assert main(["config", "show", "default"]) == 0
    assert capsys.readouterr().out == (RESOURCES / "configs/default.yaml").read_text()
    assert main(["config", "copy", "gpu", "my.yaml"]) == 0
    assert (elsewhere / "my.yaml").read_text() == (RESOURCES / "configs/gpu.yaml").read_text()
    assert "cscvision train --config my.yaml" in capsys.readouterr().out
    assert main(["config", "copy", "gpu", "my.yaml"]) == 2  # no silent overwrite
    assert main(["config", "copy", "st_panels", "panels.yaml"]) == 0
    assert "cscvision labels st MANIFEST.csv --panels panels.yaml" in capsys.readouterr().out
    assert main(["config", "copy", "ihc_markers", "markers.yaml"]) == 0
    hint = capsys.readouterr().out
    assert "labels ihc MANIFEST.csv --markers markers.yaml" in hint and "train" not in hint
    assert main(["config", "show", "nope"]) == 2
    assert "cscvision config list" in capsys.readouterr().err


def test_train_takes_a_config_name(elsewhere, capsys):
    assert main(["train", "--config", "cpu_demo", "--print-config", "seed=7"]) == 0
    printed = capsys.readouterr().out
    assert "name: cpu_demo" in printed and "seed: 7" in printed
    assert main(["train", "--config", "nope", "--print-config"]) == 2


def test_missing_requirements_say_why():
    assert _missing(Requirement("numpy>=1"), {}) == []
    assert _missing(Requirement("surely-not-installed-xyz>=1"), {}) == [
        "surely-not-installed-xyz not installed"
    ]
    (why,) = _missing(Requirement("numpy<1"), {})
    assert why.startswith("numpy ") and "outside <1" in why
    nested = {"a": [Requirement("numpy")], "b": [Requirement("surely-not-installed-xyz")]}
    assert _missing(Requirement("cscvision[a,b]"), nested) == [
        "surely-not-installed-xyz not installed"
    ]


def test_doctor_reports_every_declared_extra():
    from importlib.metadata import metadata

    lines = _extras_lines()
    extras = metadata("cscvision").get_all("Provides-Extra") or []
    assert len(lines) == len(extras)
    for extra, line in zip(extras, lines, strict=True):
        assert line.strip().startswith(f"extra {extra}:")
        assert ": installed: " in line or f'pip install "cscvision[{extra}]"' in line


def test_infer_with_the_packaged_demo_model(elsewhere, capsys):
    from cscvision.synth import write_slide

    write_slide(elsewhere / "s.tiff", size_px=1024, seed=3)
    cmd = ["infer", "s.tiff", "--model", "demo", "--out", "out", "--workers", "0"]
    assert main([*cmd, "--threads", "1"]) == 0
    assert "model demo-synthetic" in capsys.readouterr().out
    assert (elsewhere / "out/s/summary.json").is_file()


def _canonical(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(requirements: list[Requirement]) -> set[str]:
    """Distributions these requirements reach in this environment (extras followed)."""
    from importlib.metadata import PackageNotFoundError, distribution

    seen: set[str] = set()
    todo = [(r, "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = _canonical(req.name)
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            continue  # not installed here: nothing to compare
        for wanted in sorted(req.extras) or [""]:
            key = f"{name}[{wanted}]"
            if key in seen:
                continue
            seen.add(key)
            todo += [(Requirement(t), wanted) for t in dist.requires or []]
    return {key.split("[")[0] for key in seen}


def test_constraints_pin_everything_all_installs():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    reqs = [Requirement(t) for t in project["dependencies"]]
    reqs += [Requirement(t) for t in extras["all"]]
    own = {extra for r in reqs if r.name == "cscvision" for extra in r.extras}
    reqs = [r for r in reqs if r.name != "cscvision"]
    reqs += [Requirement(t) for extra in sorted(own) for t in extras[extra]]
    pinned = {
        _canonical(line.split("==")[0])
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    reached = _closure(reqs)
    assert {"torch", "numpy", "openslide-python"} <= reached
    assert reached - pinned == set()

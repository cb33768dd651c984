"""The package's layering, as the README's architecture section states it.

Stages, lowest first; a module may import its own stage and any stage below it, never one
above. ``synth`` stands beside ``labels``: it uses only ``core``, ``slides`` and ``cells`` (it
writes cell tables through the cell stage's writer), and only the CLI uses it.
Every import counts (top of file, inside functions, under TYPE_CHECKING),
and no module may reach itself again through its imports.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cscvision"
LAYERS = (
    "core",
    "slides",
    "labels",
    "cells",
    "models",
    "features",
    "training",
    "outputs",
    "inference",
    "views",
    "cli",
)
# Stages outside the straight line, and what each may import.
SIDE_STAGES = {"synth": {"core", "slides", "cells", "synth"}}
# Top-level modules: the lazy API, ``python -m cscvision`` and test helpers sit above it all.
TOP = {"cscvision", "cscvision.__main__", "cscvision.testing"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """cscvision modules ``path`` imports, anywhere in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # submodules imported by name
    return {m for m in found if m == "cscvision" or m.startswith("cscvision.")}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {m for m in imports_of(path) if m in modules and m != name}
        for name, path in modules.items()
    }


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and module not in TOP else None


def layering_violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in edges.items():
        s = stage_of(src)
        if s is None:
            continue
        for dst in sorted(targets):
            if dst == "cscvision":  # the package root: only __version__ and the lazy API
                continue
            d = stage_of(dst)
            if d is None:
                bad.append(f"{src} imports {dst} (top-level modules are for users and tests)")
            elif s in SIDE_STAGES:
                if d not in SIDE_STAGES[s]:
                    bad.append(f"{src} imports {dst}: {s} may use only {sorted(SIDE_STAGES[s])}")
            elif d in SIDE_STAGES:
                if s != "cli":
                    bad.append(f"{src} imports {dst}: only the CLI uses {d}")
            elif LAYERS.index(d) > LAYERS.index(s):
                bad.append(f"{src} imports {dst}: {s} is below {d}")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_every_stage_is_a_known_layer():
    stages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert stages == set(LAYERS) | set(SIDE_STAGES)


def test_layers_only_point_down():
    assert layering_violations(graph()) == []


def test_models_are_loaded_and_run_through_the_model_stage_only():
    """inference/, outputs/ and views/ use models/ (card, load, kinds), never training/: a
    model is run without its training code (and without Lightning)."""
    users = ("inference", "outputs", "views")
    bad = [
        f"{src} imports {dst}"
        for src, dsts in graph().items()
        if stage_of(src) in users
        for dst in dsts
        if stage_of(dst) == "training"
    ]
    assert bad == []


KIND_SWITCHES = re.compile(
    r"""(task|kind)\s*[!=]=\s*["'](mil|tile|head|finetune)["']|if (not )?card\.encoder\b|"""
    r"""\.encoder and [\w.]*finetune_blocks|["']mil["']\s*[!=]="""
)


def test_nothing_outside_the_kind_registry_switches_on_the_model_kind():
    """The kind of a model is asked in one place, cscvision/models/kinds.py (and, for
    cards and configs of 0.1.0 that name none, ``legacy_kind`` in models/card.py)."""
    allowed = {PACKAGE / "models" / "kinds.py", PACKAGE / "models" / "card.py"}
    found = [
        f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path not in allowed
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if KIND_SWITCHES.search(line)
    ]
    assert found == []


def test_the_kind_switch_finder_finds_the_0_1_0_switches():
    for line in ('if card.task == "mil":', "if card.encoder:", 'raw = task != "mil"',
                 "if cfg.model.encoder and cfg.model.finetune_blocks:"):  # fmt: skip
        assert KIND_SWITCHES.search(line), line
    assert not KIND_SWITCHES.search('if cfg.target_type == "regression":')


def test_no_import_circles():
    # The package root imports its API only under TYPE_CHECKING (for type checkers; at run
    # time it loads lazily, test_api.py): those imports close no circle when code runs.
    edges = graph()
    edges["cscvision"] = set()
    assert cycles(edges) == []


def test_the_package_root_imports_its_api_for_type_checkers_only():
    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    top_level = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module]
    assert all(not n.module.startswith("cscvision") for n in top_level)


def test_checker_catches_an_upward_import_and_a_circle():
    edges = graph()
    edges["cscvision.slides.grid"] = {*edges["cscvision.slides.grid"], "cscvision.models.card"}
    assert any("slides is below models" in v for v in layering_violations(edges))
    edges["cscvision.core.io"] = {"cscvision.core.geometry"}
    edges["cscvision.core.geometry"] = {"cscvision.core.io"}
    assert any({"cscvision.core.io", "cscvision.core.geometry"} <= set(c) for c in cycles(edges))


def test_imports_are_absolute():
    # relative imports are resolved by imports_of, but the package uses none: one spelling
    relative = [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom) and node.level
    ]
    assert relative == []


@pytest.mark.parametrize("command", [["--help"], ["doctor", "--help"], ["infer", "--help"]])
def test_cli_help_imports_no_torch(command):
    import subprocess

    code = (
        "import sys\nfrom cscvision.cli import main\n"
        f"try:\n    main({command!r})\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'lightning' not in sys.modules, 'lightning imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_public_api_is_lazy():
    import subprocess

    code = (
        "import sys, cscvision\n"
        "from cscvision import open_slide, make_grid, read_outputs, GridSpec\n"
        "assert 'torch' not in sys.modules\n"
        "from cscvision import load_model, predict_slide, train\n"
        "assert 'torch' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_name_the_scripts_import_from_cscvision_exists():
    """Benchmarks and proofs under scripts/ import inside functions, where a moved module
    would only show when someone runs them (bench_ray.py did, after the layout change)."""
    import importlib

    missing = []
    for path in sorted((PACKAGE.parent / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cscvision"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        try:
                            importlib.import_module(f"{node.module}.{alias.name}")
                        except ImportError:
                            missing.append(f"{path.name}: from {node.module} import {alias.name}")
    assert missing == []

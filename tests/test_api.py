"""The README's Python example runs as written (from a temporary folder)."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Python\n") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_example_runs(tmp_path, capsys):
    code = readme_example()  # from a temporary folder: load_model("demo") is the packaged copy
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    assert len(code.strip().splitlines()) <= 12  # the front page's example stays short
    printed = capsys.readouterr().out
    assert "mm² stemness-rich" in printed and "prob_stemness" in printed
    assert (tmp_path / "api_demo/infer").is_dir()


def test_readme_example_opens_and_tiles_the_slide_once(tmp_path, monkeypatch, capsys):
    """Counted on the real reader: one open, one thumbnail (tissue), each tile read once."""
    from cscvision.slides.slide import Slide

    calls = {"open": 0, "thumbnail": 0, "read_tile": 0}

    def counting(name, method):
        def wrapper(self, *args, **kwargs):
            calls[name] += 1
            return method(self, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(Slide, "__init__", counting("open", Slide.__init__))
    monkeypatch.setattr(Slide, "thumbnail", counting("thumbnail", Slide.thumbnail))
    monkeypatch.setattr(Slide, "read_tile", counting("read_tile", Slide.read_tile))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    tiles = len(namespace["pred"].grid)
    assert tiles > 10 and calls == {"open": 1, "thumbnail": 1, "read_tile": tiles}


def test_predict_slide_keywords_still_work_with_a_warning(tmp_path):
    import numpy as np
    import pytest

    import cscvision

    cohort = cscvision.write_cohort(tmp_path / "c", n_slides=1, n_patients=1, size_px=2048, seed=1)
    path = next(cohort.parent.glob("*.tiff"))
    model = cscvision.load_model("demo")
    new = cscvision.predict_slide(path, model, cscvision.InferSettings(batch_size=16, workers=0),
                                  progress=False)  # fmt: skip
    with pytest.warns(DeprecationWarning, match=r"predict_slide\(\.\.\., batch_size="):
        old = cscvision.predict_slide(path, model, batch_size=16, device="cpu", progress=False)
    np.testing.assert_allclose(new.probs, old.probs, atol=1e-6)
    with pytest.raises(ValueError, match=r"--mask-mpp 0\.01"):
        cscvision.predict_slide(path, model, mask_mpp=0.01)  # the flags' ranges


def test_read_outputs_matches_what_was_written(tmp_path):
    import numpy as np

    import cscvision

    cohort = cscvision.write_cohort(tmp_path / "c", n_slides=1, n_patients=1, size_px=2048, seed=1)
    slide = next(cohort.parent.glob("*.tiff"))
    model = cscvision.load_model("demo")
    pred = cscvision.predict_slide(slide, model)
    cscvision.write_slide_outputs(pred, tmp_path / "out" / pred.slide_id, model.card)
    (tmp_path / "out" / "unfinished").mkdir()  # no summary.json: left out
    got = cscvision.read_outputs(tmp_path / "out")
    assert list(got) == [pred.slide_id]
    one = got[pred.slide_id]
    np.testing.assert_array_equal(one.tiles[["x", "y"]].to_numpy(), pred.grid.xy_l0)
    np.testing.assert_allclose(one.tiles["prob_stemness"], pred.probs[:, 0], atol=1e-6)
    np.testing.assert_array_equal(one.maps["immunosuppressive"], pred.maps[1])
    assert one.transform == pred.map_transform
    assert one.targets == pred.targets
    assert one.summary["slide_id"] == pred.slide_id


def test_import_stays_lazy_and_the_api_is_visible_to_type_checkers():
    """``import cscvision`` loads no torch; every lazy name is in ``__all__`` and imported
    under TYPE_CHECKING from the module that defines it (what IDEs and mypy read)."""
    import ast
    import subprocess
    import sys

    import cscvision

    heavy = "('torch', 'numpy', 'lightning')"
    code = f"import sys, cscvision; print(sorted(m for m in {heavy} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
    assert set(cscvision.__all__) == {"__version__", *cscvision._API}
    tree = ast.parse(Path(cscvision.__file__).read_text(encoding="utf-8"))
    block = next(
        n for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
    )
    typed = {a.name: n.module for n in block.body for a in n.names}
    assert typed == cscvision._API

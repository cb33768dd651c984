"""``cscvision stats``: the slide table and cohort tests, in process."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cscvision.cli import main
from cscvision.outputs.cohort_stats import MIN_PATIENTS, cohort_tests, spearman_with_ci

TARGETS = ("stemness", "immunosuppressive")


def _summary(slide_id: str, stem: float, immune: float, z: float) -> dict:
    figure = {"observed": 1.0, "null_mean": 0.5, "null_sd": 0.1, "z": z, "p": 0.01}
    return {
        "slide_id": slide_id, "slide_path": f"/data/{slide_id}.svs", "status": "complete",
        "n_tiles": 10, "tissue_mm2": 1.0, "analysed_tissue_mm2": 1.0, "seconds": 1.0,
        "targets": {"stemness": {"area_mm2": stem, "fraction_of_tissue": stem},
                    "immunosuppressive": {"area_mm2": immune, "fraction_of_tissue": immune}},
        "niche": {"area_mm2": 0.1, "fraction_of_tissue": 0.1, "within_um": 100.0,
                  "stemness_within_100um_of_immunosuppressive": 0.5,
                  "colocation_quotient": figure, "lee_l": figure, "hotspot_jaccard": figure,
                  "morisita_horn": figure},
    }  # fmt: skip


def _write(out, n: int):
    for i in range(n):
        folder = out / f"s{i}"
        folder.mkdir(parents=True)
        summary = _summary(f"s{i}", 0.1 + 0.05 * i, 0.2 + 0.03 * i + 0.01 * (i % 2), 1.0 + i)
        (folder / "summary.json").write_text(json.dumps(summary))


def test_spearman_by_hand_and_undefined_below_five_patients():
    x = np.array([1.0, 2, 3, 4, 5, 6])
    out = spearman_with_ci(x, x**2)
    assert out["rho"] == 1.0 and out["ci"] == pytest.approx([1.0, 1.0])
    assert spearman_with_ci(x, -x)["rho"] == -1.0
    assert spearman_with_ci(x[: MIN_PATIENTS - 1], x[: MIN_PATIENTS - 1])["p"] is None


def test_patients_are_averaged_and_tests_fdr_corrected():
    rows = [
        {"patient_id": p, "stemness_fraction": s, "immunosuppressive_fraction": i, "lee_l_z": z}
        for p, s, i, z in [("A", 0.1, 0.2, 1), ("A", 0.3, 0.4, 3), ("B", 0.5, 0.5, 2),
                           ("C", 0.6, 0.7, 2), ("D", 0.7, 0.6, 4), ("E", 0.9, 0.9, 5)]
    ]  # fmt: skip
    tests = cohort_tests(rows, TARGETS)["tests"]
    assert tests["fraction_association"]["n_patients"] == 5  # A's two slides count once
    assert tests["lee_l_z"]["median_z"] == 2.0 and tests["lee_l_z"]["p"] < 0.1
    assert tests["colocation_quotient_z"]["p"] is None  # no values: undefined
    assert all(t["q"] >= t["p"] for t in tests.values() if t.get("p") is not None)


def test_cli_writes_the_table_and_the_tests(tmp_path, capsys):
    _write(tmp_path, 6)
    assert main(["stats", str(tmp_path)]) == 0
    table = (tmp_path / "cohort_slides.csv").read_text().splitlines()
    assert table[0].startswith("slide_id,patient_id,") and len(table) == 7
    assert "colocation_quotient_p" in table[0]
    tests = json.loads((tmp_path / "cohort_stats.json").read_text())["tests"]
    assert tests["fraction_association"]["rho"] > 0.9
    assert "fraction_association: rho" in capsys.readouterr().out


def test_cli_with_few_patients_reports_undefined(tmp_path, capsys):
    _write(tmp_path, 3)
    cohort = tmp_path / "cohort.csv"
    rows = [f"/data/s{i}.svs,P{i % 2},s{i}" for i in range(3)]
    cohort.write_text("slide_path,patient_id,slide_id\n" + "\n".join(rows) + "\n")
    assert main(["stats", str(tmp_path), "--cohort", str(cohort)]) == 0
    assert "undefined" in capsys.readouterr().out


@pytest.mark.parametrize("make", [False, True])
def test_cli_without_slides_is_an_error(tmp_path, capsys, make):
    target = tmp_path / "out"
    if make:
        target.mkdir()
    assert main(["stats", str(target)]) == 2
    assert "cscvision stats:" in capsys.readouterr().err

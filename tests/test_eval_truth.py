"""Truth files beside a cohort (``cscvision.labels.cohort_truth``, issue 28 item 5): the
layout round-trips, bad files are refused by name, and a synthetic cohort written in the
layout is scored by ``scripts/eval_st.py``/``eval_mil.py``'s external-cohort path to the
same figures as by their built-in path (synth's own truth files)."""

from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

from cscvision.cli import main as cli_main
from cscvision.labels.cohort import read_cohort
from cscvision.labels.cohort_truth import (
    TruthError,
    read_slide_truth,
    read_spot_truth,
    read_tile_truth,
    tiles_path,
    truth_dir,
    write_slide_truth,
    write_spot_truth,
    write_tile_truth,
)
from cscvision.synth import write_cohort

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def script(name: str):
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    return importlib.import_module(name)


def test_layout_round_trips_and_looks_up_by_key(tmp_path):
    write_slide_truth(tmp_path, ["stemness", "immunosuppressive"], {"A": [0.25, 0.5]})
    write_spot_truth(tmp_path, "A", ["AC-1", "GT-1"], ["stemness"], np.array([[0.1], [0.9]]))
    xy = np.array([[0, 0], [224, 0], [0, 448]])
    write_tile_truth(tmp_path, "A", xy, ["stemness"], np.array([0.0, 0.5, 1.0])[:, None])
    slides = read_slide_truth(tmp_path)
    assert slides.targets == ("stemness", "immunosuppressive")
    assert slides.lookup(["A", "B"])[0].tolist() == [0.25, 0.5]
    assert np.isnan(slides.lookup(["B"])).all()
    spots = read_spot_truth(tmp_path, "A")
    assert spots.lookup(["GT-1", "AC-1"])[:, 0].tolist() == [0.9, 0.1]
    tiles = read_tile_truth(tmp_path, "A")
    got = tiles.at(np.array([[0, 448], [1, 1], [224, 0]]))[:, 0]
    assert got[0] == 1.0 and np.isnan(got[1]) and got[2] == 0.5
    assert read_tile_truth(tmp_path, "other") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("slide_id,stemness\nA,1.5\n", "line 2: stemness 1.5 is not a fraction in [0, 1]"),
        ("slide_id,stemness\nA,high\n", "line 2: stemness 'high' is not a number"),
        ("slide,stemness\nA,0.1\n", "must start with ['slide_id']"),
        ("slide_id\nA\n", "then name at least one target"),
        ("slide_id,stemness\nA,0.1\nA,0.2\n", "is listed twice"),
    ],
)
def test_bad_truth_files_are_refused_by_name(tmp_path, text, message):
    path = truth_dir(tmp_path) / "slides.csv"
    path.parent.mkdir()
    path.write_text(text)
    with pytest.raises(TruthError, match=r"slides\.csv") as info:
        read_slide_truth(tmp_path)
    assert message in str(info.value)


def test_missing_truth_and_column_say_what_to_write(tmp_path):
    with pytest.raises(TruthError, match=r"spots/A\.csv: no such truth file"):
        read_spot_truth(tmp_path, "A")
    write_slide_truth(tmp_path, ["stemness"], {"A": [0.2]})
    with pytest.raises(TruthError, match="no column 'immunosuppressive'"):
        read_slide_truth(tmp_path).column("immunosuppressive")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Three small synthetic slides with Visium folders, spot-labelled by ``labels st``."""
    root = tmp_path_factory.mktemp("eval_truth")
    csv = write_cohort(root / "cohort", n_slides=3, n_patients=3, size_px=1536, seed=3,
                       visium=True)  # fmt: skip
    panels = root / "panels.yaml"
    panels.write_text("tile_px: 56\nmpp: 2.0\n")
    argv = ["labels", "st", str(csv), "--panels", str(panels), "--out", str(root / "labels")]
    assert cli_main(argv) == 0
    return csv


def test_st_external_path_scores_as_the_built_in_path(cohort):
    eval_st, truth = script("eval_st"), script("_truth")
    labels, ids = cohort.parent.parent / "labels", [e.slide_id for e in read_cohort(cohort)]
    rng = np.random.default_rng(0)
    preds = {}
    for sid in ids:  # stand-in model scores: the true fractions plus noise, label order
        table = truth.synth_spot_truth(cohort)(sid)
        barcodes = spot_order(labels, sid)
        preds[sid] = table.lookup(barcodes) + rng.normal(0, 0.05, (len(barcodes), 2))
    built_in = eval_st.spot_truth_figures(labels, ids, truth.synth_spot_truth(cohort), preds)
    assert not truth_dir(cohort.parent).exists()
    truth.write_synth_truth(cohort)
    external = eval_st.spot_truth_figures(
        labels, ids, truth.layout_spot_truth(cohort.parent), preds
    )
    for target in ("stemness", "immunosuppressive"):
        a, b = built_in[target], external[target]
        assert a["spots"] == b["spots"] > 40
        assert b["label"] == pytest.approx(a["label"], abs=1e-4)
        assert b["model"] == pytest.approx(a["model"], abs=1e-4)
        # the counts follow the truth: a barcode mix-up would drop these towards 0
        assert a["label"] > 0.6 and a["model"] > 0.8


def spot_order(labels: Path, slide_id: str) -> list[str]:
    from cscvision.labels.table import read_label_table, table_path

    return read_label_table(table_path(labels, slide_id)).provenance["barcodes"]


def test_mil_external_path_scores_as_the_built_in_path(cohort, capsys):
    from cscvision.features.extract import encoder_grid_spec
    from cscvision.models.registry import get_encoder_spec
    from cscvision.slides.grid import make_grid
    from cscvision.slides.slide import open_slide
    from cscvision.training.mil import BagPrediction
    from cscvision.training.mil_cv import CVResult

    eval_mil, truth = script("eval_mil"), script("_truth")
    entries = read_cohort(cohort)
    spec = dataclasses.replace(encoder_grid_spec(get_encoder_spec("demo-cnn")), min_tissue=0.1)
    built_in, xy = [], {}
    for e in entries:
        with open_slide(e.slide_path) as slide:
            grid = make_grid(slide, spec)
        built_in.append(eval_mil.tile_truth(e, grid, e.slide_path))
        xy[e.slide_id] = grid.xy_l0
    truth.write_synth_truth(cohort, {e.slide_id: (xy[e.slide_id], t)
                                     for e, t in zip(entries, built_in, strict=True)})  # fmt: skip
    external = [read_tile_truth(cohort.parent, e.slide_id).at(xy[e.slide_id])[:, 0]
                for e in entries]  # fmt: skip
    for a, b in zip(built_in, external, strict=True):
        assert np.abs(a - b).max() < 1e-6 and 0 < (a >= 0.5).mean() < 1
    rng = np.random.default_rng(1)
    preds = [
        BagPrediction(e.slide_id, np.array([k + 0.5]), [], rng.dirichlet(np.ones(len(t))),
                      (t + rng.normal(0, 0.3, len(t)))[:, None])
        for k, (e, t) in enumerate(zip(entries, built_in, strict=True))
    ]  # fmt: skip
    result = CVResult(np.arange(3), preds, [], {})
    label, ids = np.array([0.1, 0.3, 0.2]), [e.slide_id for e in entries]
    printed = []
    for tiles, slides in (
        (built_in, truth.synth_slide_truth(cohort)),
        (external, truth.layout_slide_truth(cohort.parent)),
    ):
        eval_mil.report(result, tiles, 3)
        figures = eval_mil.slide_truth_figures(result, label, slides, ids)
        printed.append((capsys.readouterr().out, figures))
    assert "median AUROC per-tile contribution" in printed[0][0]
    assert printed[0][0] == printed[1][0]
    (_, a), (_, b) = printed
    assert a["slides"] == b["slides"] == 3
    assert b["model"] == pytest.approx(a["model"], abs=1e-4) and np.isfinite(a["model"])
    assert b["label"] == pytest.approx(a["label"], abs=1e-4)
    assert slides.lookup(ids)[:, 0] == pytest.approx(
        truth.synth_slide_truth(cohort).lookup(ids)[:, 0], abs=1e-6
    )
    assert tiles_path(cohort.parent, ids[0]).is_file()

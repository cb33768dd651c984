"""The bad-input corpus of the commands added after ``infer``'s hardening (issue 26).

Like ``tests/test_bad_inputs.py`` for ``infer``: each case builds a hostile but realistic
input, runs the CLI in-process (``cscvision.cli.main``) with ``--out`` at
``tmp/a/b/out``, and asserts the exit status, the message, and that nothing in ``tmp``
outside ``--out`` changed (:func:`_guarded`). Classes: names that would become paths,
consistency checks that stop silent wrong science, tracebacks where a message belongs,
faults and signals, and the viewer. Only the signal cases run subprocesses.

Every helper here uses APIs that existed before the issue, so the file also runs against
the commit before it (the count of cases that failed there is in the hardening manual page).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cscvision.cli import main
from cscvision.features.store import FeatureStore, write_feature_store
from cscvision.labels.table import LabelTable, write_label_table
from cscvision.models.backbones import get_model
from cscvision.models.export import ModelCard, export_model
from cscvision.testing import write_pyramid

ROOT = Path(__file__).resolve().parents[1]
UNSAFE_IDS = ["../../escape", "..", "a/b", ".hidden"]


# --- harness --------------------------------------------------------------------------


def _cli(argv: list[str], capsys=None) -> tuple[int, str]:
    try:
        status = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        status = int(e.code or 0) if not isinstance(e.code, str) else 2
    text = ""
    if capsys is not None:
        captured = capsys.readouterr()
        text = captured.out + captured.err
    return status, text


def _tree(root: Path, skip: Path) -> dict[str, bytes | None]:
    """Every file (bytes) and folder (None) under ``root`` but outside ``skip``."""
    found: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        if path == skip or skip in path.parents:
            continue
        rel = str(path.relative_to(root))
        found[rel] = path.read_bytes() if path.is_file() and not path.is_symlink() else None
    return found


class Box:
    """``tmp/a/b/out``, and a guard that nothing in ``tmp`` outside it changes."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.out = tmp / "a" / "b" / "out"
        self.out.parent.mkdir(parents=True)
        self.inputs = tmp / "in"
        self.inputs.mkdir()

    def run(self, argv: list, capsys=None) -> tuple[int, str]:
        before = _tree(self.tmp, self.out)
        result = _cli(argv, capsys)
        after = _tree(self.tmp, self.out)
        changed = sorted(
            set(before) ^ set(after) | {k for k in before if before[k] != after.get(k)}
        )
        assert not changed, f"written outside --out: {changed}"
        return result


@pytest.fixture
def box(tmp_path) -> Box:
    return Box(tmp_path)


def _rgb(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rgb = np.full((384, 384, 3), 243, np.uint8)
    rgb[64:320, 64:320] = rng.integers(120, 200, (256, 256, 3), dtype=np.uint8)
    return rgb


def _model_args(model: Path, out: Path) -> list:
    return ["--model", model, "--out", out, "--workers", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Two tiny slides; a tiny model of the usual targets and one of two other targets;
    ``earlier``: both slides scored by the first model, ``other``: slide c by the second."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("roads")
    slides = {n: write_pyramid(folder / f"{n}.tif", _rgb(i), mpp=0.5, levels=1)
              for i, n in enumerate("ac")}  # fmt: skip
    card = ModelCard(name="tiny", backbone="small_cnn", tile_px=32, mpp=2.0)
    model = export_model(get_model("small_cnn", 2), card, folder / "model")
    card2 = ModelCard(name="other", backbone="small_cnn", tile_px=32, mpp=2.0,
                      targets=("alpha", "beta"))  # fmt: skip
    model2 = export_model(get_model("small_cnn", 2), card2, folder / "model2")
    earlier, other = folder / "earlier", folder / "other"
    assert _cli(["infer", *slides.values(), *_model_args(model, earlier)])[0] == 0
    assert _cli(["infer", slides["c"], *_model_args(model2, other)])[0] == 0
    return {"folder": folder, "slides": slides, "model": model, "model2": model2,
            "earlier": earlier, "other": other}  # fmt: skip


def _copy_outputs(world, box: Box, name: str = "earlier") -> Path:
    shutil.copytree(world[name], box.out)
    return box.out


# --- names: ids from files are data, never paths ----------------------------------------


MARKERS_YAML = "markers:\n  CD44: stemness\n"


def _ihc_manifest(box: Box, world, slide_id: str, marker: str = "CD44") -> Path:
    path = box.inputs / "ihc.csv"
    he, ihc = world["slides"]["a"], world["slides"]["c"]
    path.write_text(
        f"slide_id,patient_id,slide_path,ihc_path,marker\n{slide_id},P1,{he},{ihc},{marker}\n"
    )
    (box.inputs / "markers.yaml").write_text(MARKERS_YAML)
    return path


def _ihc(box: Box, manifest: Path, capsys, *extra) -> tuple[int, str]:
    markers = box.inputs / "markers.yaml"
    return box.run(["labels", "ihc", manifest, "--markers", markers, "--out", box.out, *extra],
                   capsys)  # fmt: skip


@pytest.mark.parametrize("bad_id", UNSAFE_IDS)
def test_labels_ihc_refuses_a_manifest_slide_id_that_is_a_path(world, box, capsys, bad_id):
    status, text = _ihc(box, _ihc_manifest(box, world, bad_id), capsys)
    assert status == 2
    assert "line 2" in text and "slide_id" in text and "cannot name a file" in text


def test_labels_ihc_refuses_a_marker_that_is_a_path(world, box, capsys):
    status, text = _ihc(box, _ihc_manifest(box, world, "S1", marker="../../CD44"), capsys)
    assert status == 2 and "marker '../../CD44' cannot name a file" in text


@pytest.mark.parametrize("config", ["markers:\n  ../m: stemness\n", "markers:\n  CD44: ../t\n"])
def test_labels_ihc_refuses_marker_config_names_that_are_paths(world, box, capsys, config):
    manifest = _ihc_manifest(box, world, "S1")
    (box.inputs / "markers.yaml").write_text(config)
    status, text = _ihc(box, manifest, capsys)
    assert status == 2 and "markers.yaml" in text and "cannot name a file" in text


def test_labels_ihc_marker_config_that_is_not_yaml_names_the_file(world, box, capsys):
    manifest = _ihc_manifest(box, world, "S1")
    (box.inputs / "markers.yaml").write_text("markers: [CD44: {\n")
    status, text = _ihc(box, manifest, capsys)
    assert status == 2 and "markers.yaml: not valid YAML" in text and "Traceback" not in text


def _cohort(box: Box, world, rows: list[tuple[str, str]], extra: str = "", name="cohort.csv"):
    """A cohort manifest: (slide_id, slide letter) rows, one patient per row."""
    header = "slide_id,patient_id,slide_path" + ("," + extra.split("|")[0] if extra else "")
    lines = [header]
    for i, (sid, letter) in enumerate(rows):
        cells = [sid, f"P{i}", str(world["slides"][letter])]
        if extra:
            cells.append(extra.split("|")[1])
        lines.append(",".join(cells))
    path = box.inputs / name
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("bad_id", UNSAFE_IDS)
def test_labels_st_refuses_a_cohort_slide_id_that_is_a_path(world, box, capsys, bad_id):
    pytest.importorskip("scanpy")
    (box.inputs / "outs").mkdir()
    cohort = _cohort(box, world, [(bad_id, "a")], extra="st_path|outs")
    status, text = box.run(["labels", "st", cohort, "--out", box.out], capsys)
    assert status != 0
    assert "line 2" in text and "cannot name a file" in text


@pytest.mark.parametrize("bad_id", UNSAFE_IDS)
def test_labels_cells_refuses_a_cohort_slide_id_that_is_a_path(world, box, capsys, bad_id):
    (box.inputs / "cells.csv").write_text("x,y\n1,2\n")
    cohort = _cohort(box, world, [(bad_id, "a")], extra="cells_path|cells.csv")
    argv = ["labels", "cells", cohort, "--feature", "density", "--out", box.out]
    status, text = box.run(argv, capsys)
    assert status == 2 and "line 2" in text and "cannot name a file" in text


def _mil_args(box: Box, cohort: Path, labels: Path, features: Path, *extra) -> list:
    return ["mil", cohort, "--labels", labels, "--target", "score", "--features", features,
            "--out", box.out, "--folds", "2", "--epochs", "1", *extra]  # fmt: skip


def _labels_csv(box: Box, ids: list[str]) -> Path:
    path = box.inputs / "slide_labels.csv"
    rows = [f"{sid},P{i},{(i % 4) / 4:.2f}" for i, sid in enumerate(ids)]
    path.write_text("slide_id,patient_id,score\n" + "\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("bad_id", UNSAFE_IDS)
def test_mil_refuses_a_cohort_slide_id_that_is_a_path(world, box, capsys, bad_id):
    ids = [bad_id, "s1", "s2", "s3"]
    cohort = _cohort(box, world, [(sid, "a") for sid in ids])
    feats = box.inputs / "features"
    for sid in ids[1:]:
        _store(feats / f"{sid}.h5", sid)
    if bad_id == "../../escape":  # the store the id points at exists, so only the id is wrong
        _store(feats / f"{bad_id}.h5", bad_id)
    status, text = box.run(_mil_args(box, cohort, _labels_csv(box, ids), feats), capsys)
    assert status == 2 and "line 2" in text and "cannot name a file" in text


def _tamper_summary(out: Path, slide: str, **fields) -> None:
    path = out / slide / "summary.json"
    summary = json.loads(path.read_text())
    summary.update(fields)
    path.write_text(json.dumps(summary))


@pytest.mark.parametrize("command", ["report", "stats"])
@pytest.mark.parametrize("bad_id", ["../../../escape", "../c", "c"])
def test_summary_slide_id_other_than_its_folder_is_skipped(world, box, capsys, command, bad_id):
    pytest.importorskip("matplotlib")
    out = _copy_outputs(world, box)
    _tamper_summary(out, "a", slide_id=bad_id)
    status, text = box.run([command, out], capsys)
    assert status == 0, text
    assert f"{out / 'a' / 'summary.json'}" in text and "not its folder's name" in text


@pytest.mark.parametrize("target", ["../../escape_t", "a/b", ".", "x\ty", "con"])
def test_infer_refuses_a_model_card_target_that_is_a_path(world, box, capsys, target):
    model = box.inputs / "model"
    shutil.copytree(world["model"], model)
    card = json.loads((model / "model.json").read_text())
    card["targets"] = [target, "immunosuppressive"]
    (model / "model.json").write_text(json.dumps(card))
    status, text = box.run(["infer", world["slides"]["a"], *_model_args(model, box.out)], capsys)
    assert status == 2
    assert "model.json" in text and "targets" in text and "cannot name a file" in text
    assert not box.out.exists() or not any(box.out.rglob("*.png"))


def test_infer_refuses_card_targets_differing_only_in_case(world, box, capsys):
    model = box.inputs / "model"
    shutil.copytree(world["model"], model)
    card = json.loads((model / "model.json").read_text())
    card["targets"] = ["Stemness", "stemness"]
    (model / "model.json").write_text(json.dumps(card))
    status, text = box.run(["infer", world["slides"]["a"], *_model_args(model, box.out)], capsys)
    assert status == 2 and "differ only in case" in text


# --- label tables: consistency (train) ------------------------------------------------

TARGETS = ("stemness", "immunosuppressive")
XY = np.array([[64, 64], [192, 64], [64, 192], [192, 192]])


def _table(folder: Path, slide_id: str, *, xy=XY, values=None, sidecar=None, **kw) -> Path:
    values = np.array([[0.2, 0.8], [0.4, 0.6], [0.6, 0.4], [0.8, 0.2]], np.float32)[: len(xy)] \
        if values is None else values  # fmt: skip
    table = LabelTable(slide_id=slide_id, xy_l0=np.asarray(xy, np.int64), targets=TARGETS,
                       values=np.asarray(values, np.float32), tile_px=kw.get("tile_px", 32),
                       mpp=2.0, source="st")  # fmt: skip
    path = write_label_table(folder / f"{kw.get('name', slide_id)}.labels.csv", table)
    if sidecar is not None:
        side = path.with_name(path.name.replace(".labels.csv", ".labels.json"))
        meta = json.loads(side.read_text())
        side.write_text(json.dumps(sidecar(meta)))
    return path


def _train(box: Box, world, tables: dict[str, Path], capsys) -> tuple[int, str]:
    lines = ["slide_id,patient_id,slide_path,label_path,split"]
    for i, (letter, path) in enumerate(tables.items()):
        split = "train" if i == 0 else "val"
        lines.append(f"{letter},P{i},{world['slides'][letter]},{path},{split}")
    cohort = box.inputs / "cohort.csv"
    cohort.write_text("\n".join(lines) + "\n")
    overrides = [
        f"cohort.csv={cohort}", "task=regression", "name=roads", "grid.mpp=2.0",
        "grid.tile_px=32", "grid.mask_mpp=8.0", "threads=1", "model.backbone=small_cnn",
        "data.batch_size=4", "data.num_workers=0", "trainer.max_epochs=1",
        "trainer.accelerator=cpu", "regression.bootstrap=10", "card.synthetic=true",
    ]  # fmt: skip
    argv = ["train", *overrides, "--run-dir", box.out / "run", "--export", box.out / "model"]
    return box.run([*argv, "--quiet"], capsys)


def _good_tables(box: Box) -> dict[str, Path]:
    return {"a": _table(box.inputs, "a"), "c": _table(box.inputs, "c")}


def test_label_table_tile_listed_twice_with_conflicting_labels_is_refused(world, box, capsys):
    tables = _good_tables(box)
    xy = np.vstack([XY, XY[:1]])
    values = np.array([[0.2, 0.8], [0.4, 0.6], [0.6, 0.4], [0.8, 0.2], [0.9, 0.1]])
    tables["a"] = _table(box.inputs, "a", xy=xy, values=values)
    status, text = _train(box, world, tables, capsys)
    assert status == 2
    assert "a.labels.csv: lines 2 and 6" in text and "different labels" in text


def test_label_table_tiles_off_the_slide_are_refused(world, box, capsys):
    tables = _good_tables(box)
    tables["a"] = _table(box.inputs, "a", xy=[[64, 64], [192, 64], [64, 192], [4000, 192]])
    status, text = _train(box, world, tables, capsys)
    assert status == 2
    assert "a.labels.csv: line 5" in text and "off the slide" in text


def test_label_table_of_another_slide_is_refused(world, box, capsys):
    tables = _good_tables(box)
    tables["a"] = _table(box.inputs, "c", name="a")  # a's row points at c's table
    status, text = _train(box, world, tables, capsys)
    assert status == 2
    assert "a.labels.csv" in text and "names slide 'c'" in text and "cohort row is 'a'" in text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: {**m, "tile_px": "abc"}, "tile_px 'abc' is not a positive int"),
        (lambda m: {**m, "tile_px": 0}, "tile_px 0 is not a positive int"),
        (lambda m: {**m, "mpp": "nan"}, "mpp 'nan' is not a positive float"),
        (lambda m: [m], "must be a JSON object"),
        (lambda m: {**m, "slide_id": "../../a"}, "slide_id '../../a' cannot name a file"),
        (lambda m: {**m, "targets": ["../t", "immunosuppressive"]}, "cannot name a file"),
    ],
    ids=["tile_px-text", "tile_px-0", "mpp-nan", "list", "slide_id-path", "target-path"],
)
def test_label_table_sidecar_that_cannot_be_used_is_refused(world, box, capsys, change, message):
    tables = _good_tables(box)
    tables["a"] = _table(box.inputs, "a", sidecar=change)
    status, text = _train(box, world, tables, capsys)
    assert status == 2 and "a.labels.json" in text and message in text


@pytest.mark.parametrize("cell", ["inf", "-inf"])
def test_label_table_infinite_score_is_refused_before_training(world, box, capsys, cell):
    tables = _good_tables(box)
    text = tables["a"].read_text().splitlines()
    cells = text[2].split(",")
    cells[2] = cell
    text[2] = ",".join(cells)
    tables["a"].write_text("\n".join(text) + "\n")
    status, out = _train(box, world, tables, capsys)
    assert status == 2 and "a.labels.csv: line 3" in out and "finite number" in out
    assert not (box.out / "model").exists()


def test_train_cohort_slide_id_that_is_a_path_is_refused(world, box, capsys):
    tables = _good_tables(box)
    lines = ["slide_id,patient_id,slide_path,label_path,split",
             f"../../escape,P0,{world['slides']['a']},{tables['a']},train",
             f"c,P1,{world['slides']['c']},{tables['c']},val"]  # fmt: skip
    cohort = box.inputs / "cohort.csv"
    cohort.write_text("\n".join(lines) + "\n")
    argv = ["train", f"cohort.csv={cohort}", "task=regression", "grid.mpp=2.0",
            "grid.tile_px=32", "--run-dir", box.out / "run", "--quiet"]  # fmt: skip
    status, text = box.run(argv, capsys)
    assert status == 2 and "cannot name a file" in text


# --- feature stores of one mil cohort ---------------------------------------------------


def _store(path: Path, slide_id: str, *, n: int = 12, dim: int = 8, seed: int = 0, **kw) -> Path:
    rng = np.random.default_rng(seed + sum(map(ord, slide_id)))
    feats = kw.pop("features", rng.normal(0, 1, (n, dim)).astype(np.float32))
    xy = np.stack([np.arange(len(feats)) * 32, np.zeros(len(feats))], 1).astype(np.int32)
    store = FeatureStore(xy, feats, kw.pop("encoder", "test-vit-tiny"),
                         kw.pop("weights_sha256", "ab" * 32),
                         grid=kw.pop("grid", {"tile_px": 32, "mpp": 2.0}),
                         slide_id=kw.pop("store_id", slide_id))  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_feature_store(path, store)


MIL_IDS = [f"s{i}" for i in range(8)]


def _mil_cohort(box: Box, world, odd: dict | None = None) -> tuple[Path, Path, Path]:
    cohort = _cohort(box, world, [(sid, "a") for sid in MIL_IDS])
    feats = box.inputs / "features"
    for i, sid in enumerate(MIL_IDS):
        _store(feats / f"{sid}.h5", sid, seed=i, **((odd or {}) if sid == "s3" else {}))
    return cohort, _labels_csv(box, MIL_IDS), feats


BAD_STORES = {
    "encoder": ({"encoder": "resnet18"}, "encoder 'resnet18' differs"),
    "weights": ({"weights_sha256": "cd" * 32}, "weights_sha256"),
    "grid": ({"grid": {"tile_px": 64, "mpp": 2.0}}, "grid"),
    "dimension": ({"dim": 16}, "feature dimension 16 differs"),
    "nan": ({"features": np.full((12, 8), np.nan, np.float32)}, "NaN or infinite features"),
    "inf": ({"features": np.full((12, 8), np.inf, np.float32)}, "NaN or infinite features"),
    "empty": ({"features": np.zeros((0, 8), np.float32)}, "no tiles"),
    "other-slide": ({"store_id": "s5"}, "attribute slide_id is 's5', not 's3'"),
}


@pytest.mark.parametrize("case", list(BAD_STORES))
def test_mil_refuses_feature_stores_that_do_not_belong_together(world, box, capsys, case):
    odd, message = BAD_STORES[case]
    cohort, labels, feats = _mil_cohort(box, world, odd)
    status, text = box.run(_mil_args(box, cohort, labels, feats), capsys)
    assert status == 2, text
    assert "s3.h5" in text and message in text
    assert not (box.out / "cv_metrics.json").exists()


def test_mil_refuses_a_file_that_is_not_a_store(world, box, capsys):
    cohort, labels, feats = _mil_cohort(box, world)
    (feats / "s3.h5").write_bytes(b"not hdf5 at all")
    status, text = box.run(_mil_args(box, cohort, labels, feats), capsys)
    assert status == 2 and "s3.h5" in text and "not a readable cscvision feature store" in text


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "0"], "--epochs 0"),
        (["--folds", "1"], "--folds 1"),
        (["--folds", "0"], "--folds 0"),
        (["--max-bag", "0"], "--max-bag 0"),
        (["--accumulate", "0"], "--accumulate 0"),
    ],
)
def test_mil_refuses_counts_that_cannot_train_up_front(world, box, capsys, flags, message):
    cohort, labels, feats = _mil_cohort(box, world)
    status, text = box.run([*_mil_args(box, cohort, labels, feats), *flags], capsys)
    assert status == 2 and message in text
    assert not (box.out / "cv_metrics.json").exists()


def test_mil_runs_on_a_consistent_cohort(world, box, capsys):
    cohort, labels, feats = _mil_cohort(box, world)
    status, text = box.run(_mil_args(box, cohort, labels, feats), capsys)
    assert status == 0, text
    assert (box.out / "cv_metrics.json").is_file()
    assert sorted(p.name for p in (box.out / "tiles").iterdir()) == [f"{s}.csv" for s in MIL_IDS]


# --- outputs of two models in one stats/report ---------------------------------------


@pytest.mark.parametrize("command", ["stats", "report"])
def test_outputs_of_two_models_with_different_targets_are_refused(world, box, capsys, command):
    pytest.importorskip("matplotlib")
    out = _copy_outputs(world, box)
    shutil.rmtree(out / "c")
    shutil.copytree(world["other"] / "c", out / "c")
    status, text = box.run([command, out], capsys)
    assert status == 2
    assert "two models with different targets" in text
    assert "tiny" in text and "other" in text and "alpha" in text and "stemness" in text


# --- tracebacks where a message belongs ------------------------------------------------


@pytest.mark.parametrize("content", ['{"slide_id": "a", "targ', "[1, 2]", "\xff\xfe"])
@pytest.mark.parametrize("command", ["stats", "report"])
def test_unreadable_summary_is_skipped_with_a_warning(world, box, capsys, command, content):
    pytest.importorskip("matplotlib")
    out = _copy_outputs(world, box)
    (out / "a" / "summary.json").write_bytes(content.encode("latin-1"))
    status, text = box.run([command, out], capsys)
    assert status == 0, text
    assert f"WARNING: {out / 'a' / 'summary.json'}" in text and "skipped" in text


def test_view_starts_with_an_unreadable_summary_and_warns(world, box, capsys, monkeypatch):
    pytest.importorskip("fastapi")
    import cscvision.views.app as app

    out = _copy_outputs(world, box)
    (out / "a" / "summary.json").write_text('{"slide_id": "a", "tar')
    served = []
    monkeypatch.setattr(app, "serve", lambda catalogue, **kw: served.append(catalogue))
    status, text = box.run(["view", out], capsys)
    assert status == 0, text
    assert served and list(served[0].slides) == ["c"]
    assert f"{out / 'a' / 'summary.json'}" in text and "WARNING" in text


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1", "abc"])
def test_labels_st_refuses_an_unusable_st_scale(world, box, capsys, value):
    pytest.importorskip("scanpy")
    (box.inputs / "outs").mkdir()
    cohort = box.inputs / "cohort.csv"
    cohort.write_text(
        f"slide_id,patient_id,slide_path,st_path,st_scale\ns1,P1,{world['slides']['a']},outs,"
        f"{value}\n"
    )
    status, text = box.run(["labels", "st", cohort, "--out", box.out], capsys)
    assert status != 0
    assert "line 2" in text and "st_scale" in text
    assert not list(box.out.glob("*.labels.csv")) if box.out.exists() else True


@pytest.fixture(scope="module")
def visium(tmp_path_factory) -> Path:
    pytest.importorskip("scanpy")
    from cscvision.synth import write_cohort

    out = tmp_path_factory.mktemp("visium")
    return write_cohort(out, n_slides=1, n_patients=1, size_px=1024, seed=3, visium=True)


def _broken_visium(box: Box, visium: Path, breaker) -> Path:
    folder = box.inputs / "v"
    shutil.copytree(visium.parent, folder)
    outs = next(folder.glob("*_visium")) / "outs"
    breaker(outs / "spatial")
    return folder / visium.name


def _positions(spatial: Path) -> Path:
    return next(p for p in spatial.iterdir() if p.name.startswith("tissue_positions"))


def _repeat_barcode(spatial: Path) -> None:
    path = _positions(spatial)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, lines[-1]]) + "\n")


def _none_in_tissue(spatial: Path) -> None:
    import pandas as pd

    path = _positions(spatial)
    header = None if path.name == "tissue_positions_list.csv" else "infer"
    table = pd.read_csv(path, header=header)
    table.iloc[:, 1] = 0
    table.to_csv(path, index=False, header=header is not None)


BROKEN_ST = {
    "scalefactors-list": (lambda s: (s / "scalefactors_json.json").write_text("[1, 2]"),
                          "not a readable scale-factor JSON"),
    "barcode-twice": (_repeat_barcode, "listed more than once"),
    "no-spot-in-tissue": (_none_in_tissue, "no spot has in_tissue = 1"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BROKEN_ST))
def test_labels_st_broken_space_ranger_files_get_a_message(visium, box, capsys, case):
    breaker, message = BROKEN_ST[case]
    cohort = _broken_visium(box, visium, breaker)
    status, text = box.run(["labels", "st", cohort, "--out", box.out], capsys)
    assert status == 1
    assert message in text and "Traceback" not in text
    assert (box.out / "errors.csv").is_file()


# --- faults: features, register, batches ----------------------------------------------


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    from cscvision.models.encoders import save_random_weights

    return save_random_weights("test-vit-tiny", tmp_path_factory.mktemp("enc") / "tiny.safetensors")


def _features_args(world, encoder: Path, out: Path, *slides: str) -> list:
    chosen = [world["slides"][s] for s in slides or "ac"]
    return ["features", *chosen, "--encoder", "test-vit-tiny", "--weights", encoder,
            "--out", out, "--threads", "1", "--workers", "0", "--min-tissue", "0.2"]  # fmt: skip


def test_features_into_a_read_only_folder_is_one_message(world, encoder, box, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    box.out.mkdir()
    box.out.chmod(0o555)
    try:
        status, text = box.run(_features_args(world, encoder, box.out), capsys)
    finally:
        box.out.chmod(0o755)
    assert status == 2 and "--out" in text and "cannot write there" in text
    assert "Traceback" not in text


def test_features_into_a_file_as_out_is_one_message(world, encoder, box, capsys):
    box.out.write_text("a file, not a folder")
    status, text = box.run(_features_args(world, encoder, box.out), capsys)
    assert status == 2 and "--out" in text and "cannot write there" in text
    assert "Traceback" not in text and box.out.read_text() == "a file, not a folder"


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_features_refuses_mask_mpp_up_front(world, encoder, box, capsys, value):
    status, text = box.run([*_features_args(world, encoder, box.out), "--mask-mpp", value],
                           capsys)  # fmt: skip
    assert status == 2 and "--mask-mpp" in text
    assert not list(box.out.glob("*.h5")) if box.out.exists() else True


def test_features_store_that_cannot_be_written_is_a_failed_slide(world, encoder, box, capsys):
    (box.out / "a.h5").mkdir(parents=True)  # the store's name is taken by a folder
    status, text = box.run(_features_args(world, encoder, box.out), capsys)
    assert status == 1
    assert "a: FeatureStoreError" in text and "cannot write the feature store" in text
    assert (box.out / "c.h5").is_file()


def test_features_second_batch_merges_results_by_slide_id(world, encoder, box, capsys):
    from cscvision.core.io import read_csv

    assert box.run(_features_args(world, encoder, box.out, "a"), capsys)[0] == 0
    assert box.run(_features_args(world, encoder, box.out, "c"), capsys)[0] == 0
    rows = {r["slide_id"]: r for r in read_csv(box.out / "results.csv")}
    assert set(rows) == {"a", "c"} and {r["status"] for r in rows.values()} == {"done"}


def test_features_leaves_a_store_another_run_holds_alone(world, encoder, box, capsys):
    from cscvision.core.guard import item_lock
    from cscvision.core.io import read_csv
    from cscvision.features.extract import store_lock_path

    with item_lock(store_lock_path(box.out, "c")):  # as another run writing c's store
        status, text = box.run(_features_args(world, encoder, box.out), capsys)
    assert status == 0 and "left to the other run holding them" in text and ": c" in text
    assert (box.out / "a.h5").is_file() and not (box.out / "c.h5").exists()
    assert [r["slide_id"] for r in read_csv(box.out / "results.csv")] == ["a"]
    status, text = box.run(_features_args(world, encoder, box.out), capsys)  # lock gone
    assert status == 0 and "1 done, 1 skipped" in text
    assert {r["slide_id"] for r in read_csv(box.out / "results.csv")} == {"a", "c"}


@pytest.mark.slow
def test_two_features_runs_on_one_out_write_each_store_once(world, encoder, tmp_path):
    import re

    from cscvision.core.io import read_csv

    many = tmp_path / "slides"
    many.mkdir()
    for i in range(3):
        shutil.copy(world["slides"]["ac"[i % 2]], many / f"s{i}.tif")
    out, whole = tmp_path / "out", tmp_path / "whole"
    argv = [sys.executable, "-m", "cscvision", "features", many, "--encoder", "test-vit-tiny",
            "--weights", encoder, "--threads", "1", "--workers", "0",
            "--min-tissue", "0.2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pipe = subprocess.PIPE
    runs = [subprocess.Popen([*map(str, argv), "--out", str(out)], stdout=pipe, stderr=pipe,
                             env=env, text=True) for _ in range(2)]  # fmt: skip
    done = 0
    for run in runs:
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0 and "Traceback" not in stderr, stderr[-2000:]
        done += int(re.search(r"features: (\d+) done", stdout).group(1))
    assert done == 3  # each store written by one run: the other found it busy or complete
    assert _cli([*argv[3:], "--out", whole])[0] == 0
    assert _stores(out) == _stores(whole) and len(_stores(out)) == 3
    assert sorted(r["slide_id"] for r in read_csv(out / "results.csv")) == ["s0", "s1", "s2"]


@pytest.mark.parametrize(
    "flag",
    ["--fine-um", "--flow-smooth-um", "--max-error-um", "--qc-p90-um", "--max-local-error-um"],
)
def test_register_refuses_a_zero_scale(world, box, capsys, flag):
    slides = world["slides"]
    status, text = box.run(["register", slides["a"], slides["c"], "--out", box.out, flag, "0"],
                           capsys)  # fmt: skip
    assert status == 2 and flag in text
    assert not box.out.exists()


LABEL_FLAGS = [
    ("cells", "--mpp", "0"), ("cells", "--tile-px", "4"), ("cells", "--min-tissue", "1.5"),
    ("cells", "--mask-mpp", "0"), ("cells", "--slide-mpp", "-1"), ("cells", "--threshold", "nan"),
    ("ihc", "--mpp", "0"), ("ihc", "--tile-px", "4"), ("ihc", "--slide-mpp", "0"),
    ("ihc", "--min-tissue", "-0.5"), ("ihc", "--qc-unmeasured-share", "1.5"),
    ("mif", "--mif-mpp", "0"), ("mif", "--expand-um", "-1"),
    ("mif", "--mask-mpp", "1e9"), ("st", "--slide-mpp", "inf"),
]  # fmt: skip


def _labels_argv(world, box: Box, command: str) -> list:
    """A ``labels`` command on a manifest good enough to reach its slides."""
    if command == "ihc":
        manifest = _ihc_manifest(box, world, "S1")
        return ["labels", "ihc", manifest, "--markers", box.inputs / "markers.yaml"]
    column = {"cells": "cells_path", "mif": "mif_path", "st": "st_path"}[command]
    (box.inputs / "side.csv").write_text("x,y\n1,2\n")
    cohort = _cohort(box, world, [("S1", "a")], extra=f"{column}|side.csv")
    extra = {"cells": ["--feature", "density_lymphocyte"],
             "mif": ["--panel", box.inputs / "side.csv"], "st": []}[command]  # fmt: skip
    return ["labels", command, cohort, *extra]


@pytest.mark.parametrize(("command", "flag", "value"), LABEL_FLAGS)
def test_labels_flags_are_checked_up_front_with_the_shared_ranges(world, box, capsys, command,
                                                                  flag, value):  # fmt: skip
    if command == "st":
        pytest.importorskip("scanpy")
    argv = [*_labels_argv(world, box, command), "--out", box.out, flag, value]
    status, text = box.run(argv, capsys)
    assert status == 2 and f"cscvision labels {command}: {flag} " in text, text
    assert not box.out.exists()


@pytest.mark.parametrize("command", ["ihc", "cells", "st"])
def test_a_labels_run_into_an_out_another_labels_run_holds_is_refused(world, box, capsys,
                                                                      command):  # fmt: skip
    from cscvision.core.guard import run_lock

    if command == "st":
        pytest.importorskip("scanpy")
    argv = [*_labels_argv(world, box, command), "--out", box.out]
    with run_lock(box.out, "labels"):  # as a run that is choosing thresholds there
        status, text = box.run(argv, capsys)
    assert status == 2 and f"another cscvision labels {command} run is writing there" in text
    assert [p.name for p in box.out.iterdir()] == [".cscvision-run.lock"]


def test_register_refuses_a_final_agreement_above_one(world, box, capsys):
    slides = world["slides"]
    args = ["register", slides["a"], slides["c"], "--out", box.out, "--min-final-agreement", "2"]
    status, text = box.run(args, capsys)
    assert status == 2 and "--min-final-agreement" in text
    assert not box.out.exists()


def test_labels_ihc_refuses_a_zero_fine_um_up_front(world, box, capsys):
    status, text = _ihc(box, _ihc_manifest(box, world, "S1"), capsys, "--fine-um", "0")
    assert status == 2 and "--fine-um" in text


def test_slide_deleted_while_the_batch_reads_it_is_reported_as_gone(
    world, box, capsys, tmp_path_factory
):
    """``infer`` on a slide that is deleted as its job starts (after discovery): the reason
    says the file went away, whatever error the reader gave."""
    from cscvision.slides import batch as slides_batch

    victim = tmp_path_factory.mktemp("gone") / "gone.tif"
    shutil.copy(world["slides"]["a"], victim)
    real = slides_batch.input_problem

    def delete_then_check(path):  # the file disappears between discovery and reading
        if Path(path) == victim:
            victim.unlink(missing_ok=True)
        return real(path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(slides_batch, "input_problem", delete_then_check)
        status, _ = box.run(["infer", victim, *_model_args(world["model"], box.out)], capsys)
    assert status == 1
    errors = (box.out / "errors.csv").read_text()
    assert "the slide file went away" in errors


# --- the viewer ---------------------------------------------------------------------------


@pytest.fixture
def served(monkeypatch) -> list:
    pytest.importorskip("fastapi")
    import cscvision.views.app as app

    calls: list = []
    monkeypatch.setattr(app, "serve", lambda catalogue, **kw: calls.append((catalogue, kw)))
    return calls


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::"])
def test_view_refuses_a_remote_host_without_allow_remote(world, box, capsys, served, host):
    out = _copy_outputs(world, box)
    status, text = box.run(["view", out, "--host", host], capsys)
    assert status == 2 and "--allow-remote" in text and "no authentication" in text
    assert not served


def test_view_remote_host_with_allow_remote_warns(world, box, capsys, served):
    out = _copy_outputs(world, box)
    status, text = box.run(["view", out, "--host", "0.0.0.0", "--allow-remote"], capsys)
    assert status == 0 and served and served[0][1]["host"] == "0.0.0.0"
    assert "WARNING" in text and "no authentication" in text


@contextlib.contextmanager
def _server(out: Path):
    """A real uvicorn server on loopback over ``out``; yields ``get(path) -> status``."""
    import http.client
    import threading

    import uvicorn

    from cscvision.views.app import create_app
    from cscvision.views.server import Catalogue

    config = uvicorn.Config(create_app(Catalogue(out)), host="127.0.0.1", port=0,
                            log_level="warning")  # fmt: skip
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]

    def get(path: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", path)
        status = conn.getresponse().status
        conn.close()
        return status

    try:
        yield get
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def test_view_slide_file_gone_serves_the_maps_alone(world, box, capsys, served, caplog):
    out = _copy_outputs(world, box)
    moved = box.inputs / "a.tif"
    shutil.copy(world["slides"]["a"], moved)
    _tamper_summary(out, "a", slide_path=str(moved))
    moved.unlink()
    status, text = box.run(["view", out], capsys)
    assert status == 0 and f"slide file {moved} not found" in text
    with _server(out) as get:
        assert get("/dzi/a/slide.dzi") == 404
        assert get("/dzi/a/slide_files/8/0_0.jpeg") == 404
        assert get("/dzi/a/map/stemness.dzi") == 200
    assert "Traceback" not in caplog.text


def test_view_request_error_is_a_500_with_one_log_line(world, box, caplog):
    out = _copy_outputs(world, box)
    for path in out.glob("a/*maps*"):
        path.write_bytes(b"broken")
    with _server(out) as get:
        assert get("/api/slides/a") == 500
    lines = [r.getMessage() for r in caplog.records if r.name == "cscvision.view"]
    assert lines and "/api/slides/a: 500" in lines[0] and "\n" not in lines[0]
    assert "Traceback" not in caplog.text


def test_view_unknown_slide_and_target_are_404(world, box):
    out = _copy_outputs(world, box)
    with _server(out) as get:
        assert get("/api/slides/nope") == 404
        assert get("/dzi/a/map/nope.dzi") == 404
        assert get("/dzi/a/map/stemness.dzi?threshold=7") == 422


# --- signals: a notice, exit 143, and a re-run that matches an uninterrupted run ----------


class _Running:
    """A ``cscvision`` subprocess whose stderr is read as it comes (tqdm writes ``\\r``)."""

    def __init__(self, argv: list, cwd: Path):
        import threading

        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "cscvision", *map(str, argv)],
                                     cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=env)  # fmt: skip
        self.err = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while chunk := os.read(self.proc.stderr.fileno(), 4096):
            self.err += chunk

    def term_when(self, ready, timeout: float = 120) -> tuple[int, str]:
        """SIGTERM once ``ready(stderr_text)`` holds; the exit status and all of stderr."""
        end = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < end:
            if ready(self.err.decode(errors="replace")):
                self.proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.02)
        status = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return status, self.err.decode(errors="replace")


def _stopped_cleanly(status: int, err: str, command: str) -> None:
    assert status == 143, err[-2000:]
    assert f"cscvision {command}: stopped by SIGTERM" in err
    assert "re-run the same command to resume" in err and "Traceback" not in err


def _stores(folder: Path) -> dict:
    """The feature stores of ``folder`` as arrays and attributes (HDF5 bytes carry times)."""
    from cscvision.features.store import read_feature_store

    found = {}
    for path in sorted(folder.glob("*.h5")):
        s = read_feature_store(path)
        grid = json.dumps(s.grid, sort_keys=True)
        found[path.name] = (s.xy_l0.tobytes(), s.features.tobytes(), s.encoder,
                            s.weights_sha256, grid, s.slide_id)  # fmt: skip
    return found


N_SIGTERM_SLIDES = 16


@pytest.mark.slow
def test_sigterm_during_features_exits_143_and_the_rerun_matches(world, encoder, tmp_path):
    many = tmp_path / "slides"
    many.mkdir()
    for i in range(N_SIGTERM_SLIDES):  # enough that an idle machine cannot finish first
        shutil.copy(world["slides"]["ac"[i % 2]], many / f"s{i}.tif")

    def args(out: Path) -> list:
        return ["features", many, "--encoder", "test-vit-tiny", "--weights", encoder, "--out",
                out, "--threads", "1", "--workers", "0", "--min-tissue", "0.2"]  # fmt: skip

    out, whole = tmp_path / "a" / "b" / "out", tmp_path / "whole"
    status, err = _Running(args(out), tmp_path).term_when(lambda _: (out / "s0.h5").exists())
    _stopped_cleanly(status, err, "features")
    assert len(_stores(out)) < N_SIGTERM_SLIDES
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    assert _cli(args(out))[0] == 0
    assert _cli(args(whole))[0] == 0
    assert len(_stores(out)) == N_SIGTERM_SLIDES and _stores(out) == _stores(whole)


@pytest.mark.slow
def test_sigterm_during_mil_exits_143_and_the_rerun_matches(world, tmp_path):
    box = Box(tmp_path)
    cohort, labels, feats = _mil_cohort(box, world)

    def args(out: Path) -> list:
        return ["mil", cohort, "--labels", labels, "--target", "score", "--features", feats,
                "--out", out, "--folds", "2", "--epochs", "30"]  # fmt: skip

    status, err = _Running(args(box.out), tmp_path).term_when(lambda e: "fold 1/2" in e)
    _stopped_cleanly(status, err, "mil")
    assert not (box.out / "cv_metrics.json").exists()
    assert _cli(args(box.out))[0] == 0
    assert _cli(args(tmp_path / "whole"))[0] == 0
    _same_tree(box.out, tmp_path / "whole")


def _same_tree(a: Path, b: Path) -> None:
    files = {p.relative_to(a): p.read_bytes() for p in sorted(a.rglob("*")) if p.is_file()}
    other = {p.relative_to(b): p.read_bytes() for p in sorted(b.rglob("*")) if p.is_file()}
    assert files == other


@pytest.fixture(scope="module")
def visium3(tmp_path_factory) -> Path:
    pytest.importorskip("scanpy")
    from cscvision.synth import write_cohort

    out = tmp_path_factory.mktemp("visium3")
    return write_cohort(out, n_slides=3, n_patients=3, size_px=1024, seed=5, visium=True)


@pytest.mark.slow
def test_sigterm_during_labels_st_exits_143_and_the_rerun_matches(visium3, tmp_path):
    def args(out: Path) -> list:
        return ["labels", "st", visium3, "--out", out]

    out = tmp_path / "a" / "b" / "out"
    status, err = _Running(args(out), tmp_path).term_when(lambda e: "scoring spots" in e)
    _stopped_cleanly(status, err, "labels st")
    assert not out.exists() or not list(out.glob("*.labels.csv"))
    assert _cli(args(out))[0] == 0
    whole = tmp_path / "c" / "d" / "whole"  # as deep as out: cohort.csv holds relative paths
    assert _cli(args(whole))[0] == 0
    _same_tree(out, whole)


@pytest.fixture(scope="module")
def ihc2(tmp_path_factory) -> Path:
    from cscvision.synth import write_cohort

    out = tmp_path_factory.mktemp("ihc2")
    write_cohort(out, n_slides=2, n_patients=2, size_px=768, seed=4, ihc_markers=("CD44",))
    (out / "markers.yaml").write_text(MARKERS_YAML)
    return out


@pytest.mark.slow
def test_sigterm_during_labels_ihc_exits_143_and_the_rerun_matches(ihc2, tmp_path):
    def args(out: Path) -> list:  # affine only (--no-nonrigid): 3x faster
        return ["labels", "ihc", ihc2 / "ihc_manifest.csv", "--markers", ihc2 / "markers.yaml",
                "--out", out, "--no-nonrigid"]  # fmt: skip

    out = tmp_path / "a" / "b" / "out"  # stopped while the first of two slides is measured
    running = _Running(args(out), tmp_path)
    status, err = running.term_when(lambda e: "0/2" in e and "SYN-P001-S01" in e)
    _stopped_cleanly(status, err, "labels ihc")
    tables = list(out.glob("*.labels.csv")) if out.exists() else []
    if "every table written" not in err:  # a slow machine may let it reach the writing
        assert "no table written" in err and not tables
    assert _cli(args(out))[0] == 0
    whole = tmp_path / "c" / "d" / "whole"
    assert _cli(args(whole))[0] == 0
    assert len(list(out.glob("*.labels.csv"))) == 2
    _same_tree(out, whole)


@pytest.mark.slow
def test_sigterm_during_train_exits_143_and_says_how_it_resumes(world, tmp_path):
    box = Box(tmp_path)
    tables = _good_tables(box)
    lines = ["slide_id,patient_id,slide_path,label_path,split"]
    for i, (letter, path) in enumerate(tables.items()):
        lines.append(f"{letter},P{i},{world['slides'][letter]},{path},{('train', 'val')[i]}")
    cohort = box.inputs / "cohort.csv"
    cohort.write_text("\n".join(lines) + "\n")
    run = box.out / "run"
    argv = ["train", f"cohort.csv={cohort}", "task=regression", "grid.mpp=2.0",
            "grid.tile_px=32", "grid.mask_mpp=8.0", "threads=1", "model.backbone=small_cnn",
            "data.batch_size=4", "data.num_workers=0", "trainer.max_epochs=400",
            "trainer.accelerator=cpu", "regression.bootstrap=10", "card.synthetic=true",
            "--run-dir", run, "--export", box.out / "model", "--quiet"]  # fmt: skip
    last = run / "checkpoints" / "last.ckpt"
    status, err = _Running(argv, tmp_path).term_when(lambda _: last.exists(), timeout=300)
    _stopped_cleanly(status, err, "train")
    assert "no model exported" in err and not (box.out / "model").exists()

"""The bad-input corpus: hostile but realistic inputs to the batch commands.

Every case is built here, runs the CLI in-process (``cscvision.cli.main``) and asserts the
exit status, the message, that the rest of the batch finished and that no earlier output
changed. Categories (README, Reliability): names, discovery, flags, models, out folders,
concurrency and tables, annotations and cohorts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cscvision.cli import main
from cscvision.core.guard import slide_lock
from cscvision.core.io import read_csv
from cscvision.models.backbones import get_model
from cscvision.models.export import ModelCard, export_model
from cscvision.slides.grid import path_digest
from cscvision.testing import output_snapshot, write_pyramid

ROOT = Path(__file__).resolve().parents[1]
TABLES = ("results", "errors")


def _rgb(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rgb = np.full((384, 384, 3), 243, np.uint8)
    rgb[64:320, 64:320] = rng.integers(120, 200, (256, 256, 3), dtype=np.uint8)
    return rgb


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A tiny model and slides a and c, both complete in ``earlier`` (an earlier run)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("world")
    card = ModelCard(name="tiny", backbone="small_cnn", tile_px=32, mpp=2.0)
    model = export_model(get_model("small_cnn", 2), card, folder / "model")
    slides = {n: write_pyramid(folder / f"{n}.tif", _rgb(i), mpp=0.5, levels=1) for i, n in
              enumerate("ac")}  # fmt: skip
    earlier = folder / "earlier"
    assert _cli(["infer", *map(str, slides.values()), *_model_args(model, earlier)])[0] == 0
    return {"folder": folder, "model": model, "slides": slides, "earlier": earlier}


def _model_args(model: Path, out: Path) -> list[str]:
    return ["--model", str(model), "--out", str(out), "--workers", "0", "--threads", "1"]


def _cli(argv: list[str], capsys=None) -> tuple[int, str]:
    try:
        status = main(argv)
    except SystemExit as e:  # argparse
        status = int(e.code or 0)
    text = ""
    if capsys is not None:
        captured = capsys.readouterr()
        text = captured.out + captured.err
    return status, text


def _files(out: Path, tables: bool = False) -> dict[str, bytes]:
    snap = output_snapshot(out) if out.exists() else {}
    return {k: v for k, v in snap.items() if tables or not k.startswith(TABLES)}


@pytest.fixture
def out(world, tmp_path) -> Path:
    """An --out that already holds the complete outputs of slides a and c."""
    target = tmp_path / "out"
    shutil.copytree(world["earlier"], target)
    return target


def _infer(world, out: Path, *inputs, extra=(), capsys=None) -> tuple[int, str]:
    slides = [str(world["slides"]["a"]), str(world["slides"]["c"])]
    return _cli(["infer", *slides, *map(str, inputs), *_model_args(world["model"], out), *extra],
                capsys)  # fmt: skip


def _batch_ok(world, out: Path, before: dict[str, bytes]) -> None:
    """The rest of the batch (a, c) finished (complete, skipped) and no earlier file changed."""
    assert (out / "a" / "summary.json").is_file() and (out / "c" / "summary.json").is_file()
    after = _files(out)
    assert {k: v for k, v in after.items() if k in before} == before
    rows = {r["slide_id"]: r for r in read_csv(out / "results.csv")}
    assert rows["a"]["status"] == rows["c"]["status"] == "ok"


# --- names: nothing escapes or collides in --out ---------------------------------------


UNSAFE_NAMES = {
    "...tiff": "__",  # today: the folder above --out (after deleting its summary.json)
    "..tiff": "_",  # today: the --out root
    ".tif": "_tif",
    ".hidden.tif": "_hidden",
    "ctl\x01name.tif": "ctl_name",
    "tab\tname.tif": "tab_name",
    "con.tif": "_con",  # a Windows device name
    "trailing. .tif": "trailing__",
    "x" * 200 + ".tif": "x" * 91 + "-" + path_digest("x" * 200),
}


@pytest.fixture(scope="module")
def unsafe_run(world, tmp_path_factory) -> dict:
    """One batch of the earlier slides and a copy of c under each unsafe name."""
    folder = tmp_path_factory.mktemp("names")
    out = folder / "box" / "out"
    shutil.copytree(world["earlier"], out)
    (out.parent / "summary.json").write_text("{}")
    before = _files(out)
    bad = [shutil.copy(world["slides"]["c"], folder / name) for name in UNSAFE_NAMES]
    status, _ = _infer(world, out, *bad)
    return {"out": out, "status": status, "before": before}


@pytest.mark.parametrize("name", list(UNSAFE_NAMES), ids=lambda n: repr(n[:12]))
def test_unsafe_file_names_get_safe_ids_inside_out(world, unsafe_run, name):
    out, slide_id = unsafe_run["out"], UNSAFE_NAMES[name]
    assert unsafe_run["status"] == 0
    assert (out / slide_id / "summary.json").is_file()
    assert (out / slide_id / f"{slide_id}.geojson").is_file()
    assert json.loads((out / slide_id / "summary.json").read_text())["slide_id"] == slide_id
    assert (out.parent / "summary.json").read_text() == "{}"
    assert sorted(p.name for p in out.parent.iterdir()) == ["out", "summary.json"]
    assert not (out / "summary.json").exists() and not (out / "tiles.csv").exists()
    _batch_ok(world, out, unsafe_run["before"])


def test_same_stem_in_two_folders_gets_two_path_ids(world, out, capsys):
    paths = []
    for sub in ("site1", "site2"):
        (world["folder"] / sub).mkdir(exist_ok=True)
        paths.append(shutil.copy(world["slides"]["c"], world["folder"] / sub / "dup.tif"))
    before = _files(out)
    status, text = _infer(world, out, *paths, capsys=capsys)
    assert status == 0, text
    ids = {f"dup-{path_digest(Path(p).resolve())}" for p in paths}
    assert ids <= {p.name for p in out.iterdir()}
    _batch_ok(world, out, before)


def test_manifest_slide_id_wins(world, out, capsys):
    manifest = world["folder"] / "manifest.csv"
    manifest.write_text(f"slide_path,slide_id\n{world['slides']['c']},case-007\n")
    before = _files(out)
    status, text = _cli(
        ["infer", str(world["slides"]["a"]), str(manifest), *_model_args(world["model"], out)],
        capsys,
    )
    assert status == 0, text
    assert (out / "case-007" / "case-007.geojson").is_file()
    assert "case-007" in {r["slide_id"] for r in read_csv(out / "results.csv")}
    assert {k: v for k, v in _files(out).items() if k in before} == before


@pytest.mark.parametrize("bad_id", ["../escape", "..", "a/b", ".hidden"])
def test_unsafe_manifest_slide_id_is_refused_up_front(world, out, capsys, bad_id):
    manifest = world["folder"] / "bad_manifest.csv"
    manifest.write_text(f"slide_path,slide_id\n{world['slides']['c']},{bad_id}\n")
    before = _files(out, tables=True)
    status, text = _cli(["infer", str(manifest), *_model_args(world["model"], out)], capsys)
    assert status == 2
    assert "line 2" in text and "cannot name a folder" in text
    assert _files(out, tables=True) == before


# --- discovery: what is (not) a slide ------------------------------------------------------


def test_directory_named_like_a_slide_is_reported(world, out, capsys):
    fake = world["folder"] / "fake.svs"
    fake.mkdir(exist_ok=True)
    before = _files(out)
    status, _ = _infer(world, out, fake, capsys=capsys)
    assert status == 1
    errors = {r["slide_id"]: r["error"] for r in read_csv(out / "errors.csv")}
    assert "a directory, not a slide file" in errors["fake"]
    _batch_ok(world, out, before)


def test_directory_named_like_a_slide_inside_an_input_folder_is_reported(world, out, capsys):
    folder = world["folder"] / "withdir"
    (folder / "inner.svs").mkdir(parents=True, exist_ok=True)
    shutil.copy(world["slides"]["c"], folder / "c2.tif")
    before = _files(out)
    status, text = _infer(world, out, folder, capsys=capsys)
    assert status == 1
    assert "inner: SlideError" in text and "a directory" in text
    assert (out / "c2" / "summary.json").is_file()
    _batch_ok(world, out, before)


def test_symlink_loop_is_reported(world, out, capsys):
    loop = world["folder"] / "loop.svs"
    if not loop.is_symlink():
        os.symlink(world["folder"] / "loop_b", world["folder"] / "loop_a")
        os.symlink(world["folder"] / "loop_a", world["folder"] / "loop_b")
        os.symlink(world["folder"] / "loop_a", loop)
    before = _files(out)
    status, text = _infer(world, out, loop, capsys=capsys)
    assert status == 1 and "symbolic link loop" in text
    _batch_ok(world, out, before)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.svs", None, "file not found"),
        ("empty.tif", b"", "not a slide"),
        ("random.svs", b"II*\x00" + bytes(range(256)) * 8, "not a slide"),
        ("text.tif", b"hello, not a slide", "not a slide"),
    ],
)
def test_broken_slide_files_fail_alone(world, out, capsys, name, content, message):
    bad = world["folder"] / "broken" / name
    bad.parent.mkdir(exist_ok=True)
    if content is not None:
        bad.write_bytes(content)
    before = _files(out)
    status, text = _infer(world, out, bad, capsys=capsys)
    assert status == 1 and message in text
    _batch_ok(world, out, before)


def test_synth_folder_masks_and_thumbnails_are_not_slides(world, out, capsys):
    folder = world["folder"] / "synthlike"
    folder.mkdir(exist_ok=True)
    shutil.copy(world["slides"]["c"], folder / "syn_000.tiff")
    for extra in ("syn_000_labels.png", "syn_000_thumb.png"):
        (folder / extra).write_bytes(b"\x89PNG\r\n\x1a\n")
    (folder / "cohort.csv").write_text("slide_id,patient_id,slide_path\nsyn_000,p,syn_000.tiff\n")
    before = _files(out)
    status, text = _infer(world, out, folder, capsys=capsys)
    assert status == 0, text
    assert "3 done" not in text and {"syn_000", "a", "c"} <= {p.name for p in out.iterdir()}
    assert not (out / "syn_000_labels").exists() and not (out / "syn_000_thumb").exists()
    _batch_ok(world, out, before)


def test_a_folder_of_plain_images_is_still_a_folder_of_slides(world, tmp_path):
    from cscvision.slides.batch import collect_slides

    (tmp_path / "x.png").write_bytes(b"")
    (tmp_path / "y.jpg").write_bytes(b"")
    assert [p.name for p in collect_slides([tmp_path])] == ["x.png", "y.jpg"]


def test_leading_dash_file_name_gets_a_hint_and_works_after_double_dash(world, out, capsys):
    dashed = Path("-dash.tif")
    cwd = os.getcwd()
    os.chdir(world["folder"])
    try:
        shutil.copy(world["slides"]["c"], dashed)
        before = _files(out, tables=True)
        status, text = _cli(["infer", str(dashed), *_model_args(world["model"], out)], capsys)
        assert status == 2 and "after '--'" in text and "./-dash.tif" in text
        assert _files(out, tables=True) == before
        status, text = _cli(["infer", *_model_args(world["model"], out), "--", str(dashed)], capsys)
        assert status == 0, text
        assert (out / "-dash" / "summary.json").is_file()
    finally:
        os.chdir(cwd)


# --- flags: checked before any slide is read -------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--min-tissue", "1.5"], "--min-tissue 1.5"),
        (["--min-tissue", "nan"], "--min-tissue nan: input should be a finite number"),
        (["--min-tissue", "-0.1"], "--min-tissue -0.1"),
        (["--mask-mpp", "0"], "--mask-mpp 0"),
        (["--slide-mpp", "0"], "--slide-mpp 0"),
        (["--slide-mpp", "-0.5"], "--slide-mpp -0.5"),
        (["--slide-mpp", "1e9"], "--slide-mpp 1000000000.0"),
        (["--slide-mpp", "inf"], "--slide-mpp inf"),
        (["--overlap", "0.9"], "--overlap 0.9"),
        (["--batch-size", "0"], "--batch-size 0"),
        (["--workers", "-1"], "--workers -1"),
        (["--threads", "0"], "--threads 0"),
        (["--shard", "3/2"], "--shard '3/2'"),
        (["--ray-cpus", "0"], "--ray-cpus 0"),
    ],
)
def test_bad_infer_flags_are_one_message_before_any_slide(world, out, capsys, flags, message):
    before = _files(out, tables=True)
    status, text = _infer(world, out, extra=flags, capsys=capsys)
    assert status == 2 and message in text, text
    assert "Traceback" not in text
    assert _files(out, tables=True) == before


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tile-px", "0"], "--tile-px 0"),
        (["--mpp", "nan"], "--mpp nan"),
        (["--mpp", "0"], "--mpp 0"),
        (["--overlap", "1.0"], "--overlap 1.0"),
        (["--min-tissue", "2"], "--min-tissue 2.0"),
        (["--mask-mpp", "0"], "--mask-mpp 0"),
    ],
)
def test_bad_tile_flags_are_one_message_before_any_slide(world, tmp_path, capsys, flags, message):
    out = tmp_path / "tiles"
    status, text = _cli(["tile", str(world["slides"]["c"]), "--out", str(out), *flags], capsys)
    assert status == 2 and message in text, text
    assert not (out / "c").exists()


# --- models: the card against its schema -------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda card: 3, "a model card is a JSON object, got int"),
        (lambda card: {**card, "colors": [1, 2, 3]}, "colors [1, 2, 3]: input should be a valid"),
        (lambda card: {**card, "tile_px": 0}, "tile_px 0"),
        (lambda card: {**card, "mpp": -0.5}, "mpp -0.5"),
        (
            lambda card: {**card, "thresholds": {"stemness": 1.5}},
            "probabilities in [0, 1], got stemness 1.5",
        ),
        (lambda card: {**card, "targets": "stemness"}, "targets 'stemness'"),
        (lambda card: {**card, "std": [0, 1, 1]}, "std.0 0"),
        (lambda card: {**card, "schema_version": 99}, "schema_version 99 is newer"),
        (lambda card: {k: v for k, v in card.items() if k != "backbone"}, "missing fields"),
    ],
)
def test_bad_model_card_is_one_message_before_any_slide(world, out, tmp_path, capsys, edit,
                                                        message):  # fmt: skip
    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    card = json.loads((model / "model.json").read_text())
    (model / "model.json").write_text(json.dumps(edit(card)))
    before = _files(out, tables=True)
    status, text = _cli(["infer", str(world["slides"]["c"]), *_model_args(model, out)], capsys)
    assert status == 2 and message in text and "model.json" in text, text
    assert "Traceback" not in text
    assert _files(out, tables=True) == before


def test_card_that_is_not_json_and_a_missing_model(world, out, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    (model / "model.json").write_text("{not json")
    status, text = _cli(["infer", str(world["slides"]["c"]), *_model_args(model, out)], capsys)
    assert status == 2 and "not valid JSON" in text
    status, text = _cli(["infer", str(world["slides"]["c"]), *_model_args(tmp_path, out)], capsys)
    assert status == 2 and "no model card" in text


def test_cards_without_schema_version_load_as_version_1():
    from cscvision.models.card import read_card

    raw = json.loads((ROOT / "models" / "demo-synthetic" / "model.json").read_text())
    card = read_card(ROOT / "models" / "demo-synthetic")
    assert card.schema_version == 1 and card.targets == tuple(raw["targets"])
    assert card.threshold("stemness") == raw["thresholds"]["stemness"]
    assert card.to_json()["schema_version"] == 1


# --- out folders ---------------------------------------------------------------------------


def _mount(folder: Path, options: str) -> None:
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")


@pytest.mark.parametrize(("options", "why"), [("ro,size=1m", "Read-only"), ("size=16k", "space")])
def test_read_only_or_full_out_is_one_message_up_front(world, tmp_path, capsys, options, why):
    out = tmp_path / "mnt"
    _mount(out, options)
    try:
        status, text = _infer(world, out, capsys=capsys)
        assert status == 2 and f"--out {out}: cannot write there" in text and why in text, text
        assert not list(out.iterdir())
    finally:
        subprocess.run(["umount", str(out)], check=False)


def test_out_that_is_a_file_is_one_message(world, tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("x")
    status, text = _infer(world, out, capsys=capsys)
    assert status == 2 and f"--out {out}: cannot write there" in text
    assert out.read_text() == "x"


# --- concurrency and run tables ------------------------------------------------------------


def _new_slide(world, tmp_path) -> Path:
    return Path(shutil.copy(world["slides"]["c"], tmp_path / "d.tif"))


def test_a_slide_another_run_holds_is_skipped_as_busy(world, out, tmp_path, capsys):
    d = _new_slide(world, tmp_path)
    before = _files(out)
    with slide_lock(out / "d"):
        status, text = _infer(world, out, d, capsys=capsys)
    assert status == 0 and "left to the other run holding them" in text and ": d" in text
    assert not (out / "d" / "summary.json").exists()
    assert "d" not in {r["slide_id"] for r in read_csv(out / "results.csv")}
    assert {k: v for k, v in _files(out).items() if k in before} == before
    status, text = _infer(world, out, d, capsys=capsys)  # the lock is gone: now it runs
    assert status == 0 and "1 done, 2 skipped" in text
    _batch_ok(world, out, before)


def test_temporaries_of_live_processes_are_kept_and_dead_ones_cleared(world, out, tmp_path,
                                                                      capsys):  # fmt: skip
    from cscvision.core.io import _HOST

    folder = out / "d"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = folder / f".tiles.{_HOST}-{proc.pid}-0000aaaa.tmp.csv"
    gone = folder / f".tiles.{_HOST}-{dead.pid}-0000bbbb.tmp.csv"
    foreign = folder / ".tiles.otherhost-1-0000cccc.tmp.csv"
    for p in (live, gone, foreign):
        p.write_text("partial")
    try:
        status, text = _infer(world, out, _new_slide(world, tmp_path), capsys=capsys)
    finally:
        proc.kill()
        proc.wait()
    assert status == 0, text
    assert live.exists() and foreign.exists() and not gone.exists()
    assert (folder / "summary.json").is_file()


def test_results_and_errors_accumulate_by_slide_id(world, out, capsys):
    before = _files(out)
    broken = world["folder"] / "flaky.tif"
    broken.write_bytes(b"not yet a slide")
    status, _ = _cli(["infer", str(broken), *_model_args(world["model"], out)], capsys)
    assert status == 1
    rows = {r["slide_id"]: r["status"] for r in read_csv(out / "results.csv")}
    assert rows == {"a": "ok", "c": "ok", "flaky": "failed"}  # earlier rows are kept
    shutil.copy(world["slides"]["c"], broken)  # fixed: the re-run succeeds
    status, _ = _cli(["infer", str(broken), *_model_args(world["model"], out)], capsys)
    assert status == 0
    assert {r["slide_id"]: r["status"] for r in read_csv(out / "results.csv")} == {
        "a": "ok", "c": "ok", "flaky": "ok"
    }  # fmt: skip
    assert read_csv(out / "errors.csv") == []
    assert {k: v for k, v in _files(out).items() if k in before} == before


def test_tile_errors_accumulate_too(world, tmp_path, capsys):
    out = tmp_path / "tiles"
    bad = world["folder"] / "bad_tile.tif"
    bad.write_bytes(b"nope")
    assert _cli(["tile", str(bad), "--out", str(out)], capsys)[0] == 1
    assert _cli(["tile", str(world["slides"]["c"]), "--out", str(out)], capsys)[0] == 0
    assert [r["slide_id"] for r in read_csv(out / "errors.csv")] == ["bad_tile"]


# --- annotations and cohorts ---------------------------------------------------------------


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_geojson_with_non_finite_coordinates_is_a_message(tmp_path, value):
    from cscvision.labels.annotations import AnnotationError, read_annotations

    path = tmp_path / "a.geojson"
    ring = f"[[0, 0], [10, 0], [10, {value}], [0, 10], [0, 0]]"
    path.write_text(
        '{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": '
        f'{{"type": "Polygon", "coordinates": [{ring}]}}, "properties": '
        '{"classification": {"name": "Stemness-rich"}}}]}'
    )
    with pytest.raises(AnnotationError, match="NaN or Infinity"):
        read_annotations(path)


def test_one_patient_cohort_says_why_it_cannot_be_split(tmp_path):
    from cscvision.labels.cohort import CohortEntry, CohortError, check_splittable

    entries = [CohortEntry(slide_path=Path(f"s{i}.tif"), patient_id="p1", slide_id=f"s{i}")
               for i in range(3)]  # fmt: skip
    with pytest.raises(CohortError, match=r"one patient .*at least 2 patients.*split column"):
        check_splittable(entries)


def test_no_slide_folder_resolves_outside_out(tmp_path):
    from cscvision.slides.batch import slide_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / "evil").symlink_to(tmp_path)  # a link left in --out that points out of it
    for slide_id in ("..", "../x", "evil", ".", ""):
        with pytest.raises(ValueError, match=r"outside the output folder|--out root"):
            slide_dir(out, slide_id)
    assert slide_dir(out, "ok") == out / "ok"


def test_one_patient_cohort_stops_train_before_any_slide_is_read(tmp_path, capsys):
    cohort = tmp_path / "cohort.csv"
    cohort.write_text("slide_path,patient_id\na.svs,p1\nb.svs,p1\n")
    for name in ("a.svs", "b.svs"):
        (tmp_path / name).write_bytes(b"never read")
    args = [f"cohort.csv={cohort}", f"run_dir={tmp_path / 'run'}", f"export_dir={tmp_path / 'm'}"]
    status, text = _cli(["train", "--quiet", "--set", *args], capsys)
    assert status == 2 and "the cohort has one patient ('p1')" in text, text
    assert not (tmp_path / "m").exists()

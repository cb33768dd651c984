"""`cscvision tile` end to end: real slide, bad inputs in a batch, overrides, resume."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from conftest import tissue_like

from cscvision.cli import main
from cscvision.core.io import read_csv
from cscvision.testing import write_pyramid


def test_tile_real_slide_keeps_tissue_not_ink(cmu_svs, tmp_path):
    assert main(["tile", str(cmu_svs), "--out", str(tmp_path)]) == 0
    folder = tmp_path / "cmu_small_region"
    meta = json.loads((folder / "tiles.json").read_text())
    rows = read_csv(folder / "tiles.csv")
    assert meta["mpp"] == 0.5 and meta["slide_mpp"] == pytest.approx(0.499)
    assert meta["mpp_source"] == "openslide" and meta["level"] == 0 and meta["read_px"] == 224
    assert meta["n_tiles"] == len(rows)
    # 10 x 14 = 140 grid cells; checked on tissue.png: tissue covers ~40 % of them.
    assert 35 <= len(rows) <= 60
    assert all(float(r["tissue"]) >= 0.5 for r in rows)
    assert (folder / "tissue.png").stat().st_size > 10_000
    # Ink per grid cell, measured on a 2 µm/px view: the cells the teal flecks cover most
    # are dropped; kept tiles carry at most a light sprinkle.
    from cscvision.slides.grid import grid_coords
    from cscvision.slides.slide import open_slide
    from cscvision.slides.tissue import ink_mask

    with open_slide(cmu_svs) as slide:
        ink = ink_mask(slide.thumbnail(2.0))
    scale = 0.499 / 2.0

    def ink_of(x, y):
        return ink[
            int(y * scale) : int((y + 224) * scale), int(x * scale) : int((x + 224) * scale)
        ].mean()

    kept = {(int(r["x"]), int(r["y"])) for r in rows}
    inky = [tuple(xy) for xy in grid_coords((2220, 2967), 224, 224) if ink_of(*xy) > 0.1]
    assert inky and not kept & set(inky)
    assert max(ink_of(x, y) for x, y in kept) < 0.1


def test_batch_with_bad_slides_finishes_the_others(tmp_path, capsys):
    good = write_pyramid(tmp_path / "good.tif", tissue_like(1024, 1024), mpp=0.5, levels=2)
    (tmp_path / "corrupt.svs").write_bytes(b"II*\x00" + os.urandom(2000))
    (tmp_path / "notes.tif").write_text("not a slide")
    empty = write_pyramid(
        tmp_path / "empty.tif", np.full((512, 512, 3), 244, np.uint8), mpp=0.5, levels=1
    )
    nompp = write_pyramid(tmp_path / "nompp.tif", tissue_like(512, 512), mpp=None, levels=1)
    out = tmp_path / "out"
    args = [str(good), str(tmp_path / "corrupt.svs"), str(tmp_path / "notes.tif")]
    status = main(
        ["tile", *args, str(empty), str(nompp), str(tmp_path / "gone.svs"), "--out", str(out)]
    )
    assert status == 1
    errors = {r["slide_id"]: r["error"] for r in read_csv(out / "errors.csv")}
    assert set(errors) == {"corrupt", "notes", "empty", "nompp", "gone"}
    assert "no µm/px" in errors["nompp"] and "--slide-mpp" in errors["nompp"]
    assert "no tissue" in errors["empty"]
    assert "file not found" in errors["gone"]
    assert (out / "good" / "tiles.json").exists()
    # only the slide's lock file (kept: see README, Reliability) is in a failed slide's folder
    assert [p.name for p in (out / "corrupt").iterdir()] == [".cscvision.lock"]
    assert "1 done" in capsys.readouterr().out


def test_override_csv_and_slide_mpp(tmp_path):
    nompp = write_pyramid(tmp_path / "nompp.tif", tissue_like(1024, 1024), mpp=None, levels=1)
    csv_path = tmp_path / "mpp.csv"
    csv_path.write_text("slide,mpp\nnompp.tif,0.25\n")
    out = tmp_path / "out"
    assert main(["tile", str(nompp), "--out", str(out), "--mpp-override", str(csv_path)]) == 0
    meta = json.loads((out / "nompp" / "tiles.json").read_text())
    assert meta["slide_mpp"] == 0.25 and meta["mpp_source"] == "override"
    assert meta["read_px"] == 448  # 224 px at 0.5 from a 0.25 µm/px level
    out2 = tmp_path / "out2"
    assert main(["tile", str(nompp), "--out", str(out2), "--slide-mpp", "0.5"]) == 0
    assert json.loads((out2 / "nompp" / "tiles.json").read_text())["read_px"] == 224


def test_rerun_skips_complete_and_overwrite_redoes(tmp_path, capsys):
    slide = write_pyramid(tmp_path / "s.tif", tissue_like(1024, 1024), mpp=0.5, levels=2)
    out = tmp_path / "out"
    assert main(["tile", str(slide), "--out", str(out)]) == 0
    first = (out / "s" / "tiles.csv").read_bytes()
    capsys.readouterr()
    assert main(["tile", str(slide), "--out", str(out)]) == 0
    assert "1 skipped" in capsys.readouterr().out
    # An interrupted slide (sidecar missing) is redone.
    (out / "s" / "tiles.json").unlink()
    assert main(["tile", str(slide), "--out", str(out)]) == 0
    assert "1 done" in capsys.readouterr().out
    assert (out / "s" / "tiles.csv").read_bytes() == first
    assert main(["tile", str(slide), "--out", str(out), "--overwrite"]) == 0
    assert "1 done" in capsys.readouterr().out
    assert not [p for p in (out / "s").iterdir() if ".tmp" in p.name]  # no temp files left


def test_export_tiles_and_shards(tmp_path):
    for name in ("a", "b", "c"):
        write_pyramid(tmp_path / f"{name}.tif", tissue_like(512, 512), mpp=0.5, levels=1)
    out = tmp_path / "out"
    assert main(["tile", str(tmp_path), "--out", str(out), "--shard", "1/2", "--export-tiles"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["b"]
    pngs = list((out / "b" / "tiles").glob("*.png"))
    assert len(pngs) == len(read_csv(out / "b" / "tiles.csv")) > 0
    assert main(["tile", str(tmp_path), "--out", str(out), "--shard", "2/2"]) == 2
    shutil.rmtree(out)


def test_rerun_with_a_changed_mpp_override_redoes_the_slide(tmp_path, capsys):
    slide = write_pyramid(tmp_path / "s.tif", tissue_like(1024, 1024), mpp=None, levels=1)
    out = tmp_path / "out"
    assert main(["tile", str(slide), "--out", str(out), "--slide-mpp", "0.5"]) == 0
    capsys.readouterr()
    # The first override was wrong: the grid made with it must not count as complete.
    assert main(["tile", str(slide), "--out", str(out), "--slide-mpp", "0.25"]) == 0
    assert "1 done" in capsys.readouterr().out
    assert json.loads((out / "s" / "tiles.json").read_text())["slide_mpp"] == 0.25
    assert main(["tile", str(slide), "--out", str(out), "--slide-mpp", "0.25"]) == 0
    assert "1 skipped" in capsys.readouterr().out


def test_interrupted_tile_export_is_redone(tmp_path, monkeypatch, capsys):
    import cscvision.slides.tiling

    slide = write_pyramid(tmp_path / "s.tif", tissue_like(1024, 1024), mpp=0.5, levels=1)
    out = tmp_path / "out"
    assert main(["tile", str(slide), "--out", str(out)]) == 0  # a complete grid, no tiles
    real_write_png, calls = cscvision.slides.tiling.write_png, []

    def write_png_then_die(path, rgb):
        calls.append(path)
        if len(calls) == 3:  # tissue.png, two tiles, then the machine goes down
            raise KeyboardInterrupt
        return real_write_png(path, rgb)

    monkeypatch.setattr(cscvision.slides.tiling, "write_png", write_png_then_die)
    assert main(["tile", str(slide), "--out", str(out), "--export-tiles"]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["tile", str(slide), "--out", str(out), "--export-tiles"]) == 0
    assert "1 done" in capsys.readouterr().out
    rows = read_csv(out / "s" / "tiles.csv")
    assert len(list((out / "s" / "tiles").glob("*.png"))) == len(rows)


def test_tile_export_with_a_new_spec_leaves_no_stale_tiles(tmp_path):
    slide = write_pyramid(tmp_path / "s.tif", tissue_like(1024, 1024), mpp=0.5, levels=1)
    out = tmp_path / "out"
    assert main(["tile", str(slide), "--out", str(out), "--export-tiles"]) == 0
    assert main(["tile", str(slide), "--out", str(out), "--export-tiles", "--tile-px", "200"]) == 0
    names = {p.name for p in (out / "s" / "tiles").glob("*.png")}
    rows = read_csv(out / "s" / "tiles.csv")
    assert names == {f"s_x{r['x']}_y{r['y']}.png" for r in rows}


def test_same_slide_twice_is_one_job_and_case_only_ids_clash(tmp_path):
    from cscvision.slides.batch import make_jobs
    from cscvision.slides.grid import path_digest

    slide = write_pyramid(tmp_path / "s.tif", tissue_like(256, 256), mpp=0.5, levels=1)
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_path\ns.tif\n")
    relative = os.path.relpath(slide)
    status = main(["tile", relative, str(manifest), str(tmp_path), "--out", str(tmp_path / "o")])
    assert status == 0
    (tmp_path / "x").mkdir()
    other = write_pyramid(tmp_path / "x" / "S.tif", tissue_like(256, 256), mpp=0.5, levels=1)
    # one output folder on macOS and Windows file systems: both get ids of their own path
    ids = [j.slide_id for j in make_jobs([slide, other])]
    assert ids == [f"s-{path_digest(slide.resolve())}", f"S-{path_digest(other.resolve())}"]


def test_tiles_of_an_older_grid_never_pass_for_the_current_one(tmp_path, capsys):
    slide = write_pyramid(tmp_path / "s.tif", tissue_like(1024, 1024), mpp=0.5, levels=1)
    out = tmp_path / "out"
    assert main(["tile", str(slide), "--out", str(out), "--export-tiles"]) == 0
    assert main(["tile", str(slide), "--out", str(out), "--tile-px", "200"]) == 0  # no export
    capsys.readouterr()
    assert main(["tile", str(slide), "--out", str(out), "--tile-px", "200", "--export-tiles"]) == 0
    assert "1 done" in capsys.readouterr().out
    names = {p.name for p in (out / "s" / "tiles").glob("*.png")}
    rows = read_csv(out / "s" / "tiles.csv")
    assert names == {f"s_x{r['x']}_y{r['y']}.png" for r in rows}


def test_atomic_path_gives_umask_mode_even_when_the_writer_replaces_the_file(tmp_path):
    import stat

    import torch
    from safetensors.torch import save_file

    from cscvision.core.io import atomic_path

    target = tmp_path / "w.safetensors"
    with atomic_path(target) as tmp:
        save_file({"a": torch.zeros(2)}, str(tmp))
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask

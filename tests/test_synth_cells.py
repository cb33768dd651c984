"""Synthetic cell tables: exactly the nuclei the renderer stamps, infiltration that the
regions do not decide, and per-tile density truth."""

from __future__ import annotations

import csv

import numpy as np
import pytest

import cscvision.synth.render as render
from cscvision.cells.table import read_cell_table
from cscvision.synth import make_layout, sample_lab_profile, sample_slide_profile, write_cohort
from cscvision.synth.cells import Infiltration, slide_cells, truth_rows


def _renderer(seed: int, size: int, infiltration: Infiltration | None = None):
    rng = np.random.default_rng([seed, 1])
    layout = make_layout(rng, width_px=size, height_px=size, mpp=0.5)
    lab = sample_lab_profile(np.random.default_rng([seed, 2]))
    stain = sample_slide_profile(np.random.default_rng([seed, 3]), lab)
    extra = (infiltration.population(),) if infiltration else ()
    return render.SlideRenderer(layout, stain, seed=seed, extra_populations=extra)


def test_table_lists_exactly_the_nuclei_the_renderer_stamps(monkeypatch):
    r = _renderer(3, 1024, Infiltration(tumour=0.3, stroma=0.2))
    stamped = []
    real = render._stamp

    def spy(bank, variant, left, top, od_h, od_e, nuclei):
        size = bank.size_px
        stamped.append(np.column_stack([left + size // 2, top + size // 2]))
        real(bank, variant, left, top, od_h, od_e, nuclei)

    monkeypatch.setattr(render, "_stamp", spy)
    r.render_od(0, 0, 1024, 1024)  # the whole slide as one window
    drawn = np.concatenate(stamped)
    table = slide_cells(r, "s")
    # a sprite is stamped at rint(centre) - size // 2: the same integer centres
    ours = np.column_stack([np.rint(table.x), np.rint(table.y)]).astype(np.int64)
    assert len(ours) == len(drawn) > 500
    assert sorted(map(tuple, ours)) == sorted(map(tuple, drawn.astype(np.int64)))


def test_infiltration_changes_lymphocytes_only_where_it_says():
    base = slide_cells(_renderer(4, 2048), "s")
    more = slide_cells(_renderer(4, 2048, Infiltration(tumour=0.3, stroma=0.0)), "s")
    lymph = lambda t: (t.cell_type == "lymphocyte").sum()  # noqa: E731
    assert lymph(more) > lymph(base) + 100
    others = lambda t: np.sort(t.x[t.cell_type != "lymphocyte"])  # noqa: E731
    assert np.array_equal(others(base), others(more))  # no other cell moved
    r = _renderer(4, 2048)
    extra = (more.cell_type == "lymphocyte") & ~np.isin(more.x, base.x)
    cls = r.class_at(more.x[extra], more.y[extra])
    # the extra lymphocytes sit in tumour or stemness-rich tumour (their cell centre's class)
    assert np.isin(cls, [render.TUMOUR, render.STEM]).mean() > 0.9


def test_truth_densities_count_the_table(tmp_path):
    r = _renderer(5, 1536, Infiltration(tumour=0.2, stroma=0.1))
    table = slide_cells(r, "s")
    header, rows = truth_rows(r.layout, table)
    h = {k: i for i, k in enumerate(header)}
    assert sum(row[h["count_all"]] for row in rows) == len(table)  # every cell in a tile
    full = [row for row in rows if float(row[h["tissue_fraction"]]) == 1.0]
    row = full[0]
    # 224 px at 0.5 µm/px = 112 µm: 0.012544 mm² of tissue
    assert float(row[h["density_lymphocyte"]]) == pytest.approx(
        row[h["count_lymphocyte"]] / 0.012544, rel=1e-3
    )
    assert row[h["count_tumour"]] >= row[h["count_csc_like"]]


def test_cohort_lists_cell_tables_and_keeps_infiltration_apart_from_regions(tmp_path):
    cohort = write_cohort(tmp_path, n_slides=6, n_patients=3, size_px=1024, seed=11,
                          infiltration=True)  # fmt: skip
    rows = list(csv.DictReader(cohort.open()))
    assert [r["cells_path"] for r in rows] == [f"{r['slide_id']}.cells.parquet" for r in rows]
    import json

    settings = []
    for r in rows:
        table = read_cell_table(tmp_path / r["cells_path"])
        assert table.mpp == 0.5 and table.slide_id == r["slide_id"] and len(table) > 500
        truth = json.loads((tmp_path / f"{r['slide_id']}_truth.json").read_text())
        settings.append(truth["lymphocyte_infiltration"]["tumour"])
    assert len(set(settings)) == 6  # drawn per slide

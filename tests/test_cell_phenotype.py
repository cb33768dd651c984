"""Compartments, TIL score and immune phenotype on hand-made cell layouts (known answers)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cscvision.cells.compartments import (
    CompartmentSpec,
    Raster,
    compartment_densities,
    compartments_from_cells,
    compartments_from_masks,
    margin_band,
    raster_for,
)
from cscvision.cells.phenotype import (
    PhenotypeError,
    SourceRule,
    TilRule,
    call_phenotype,
    immune_report,
    source_rule,
    til_rule,
    til_score,
)

MPP = 0.5  # level-0 µm/px of the made-up slides
W_UM, H_UM = 4000.0, 2000.0  # tumour on x < 2000 µm, stroma beyond


def lattice(x0_um, x1_um, y0_um, y1_um, step_um):
    """Level-0 px centres of a square lattice of ``step_um`` in a µm box."""
    xs = np.arange(x0_um + step_um / 2, x1_um, step_um)
    ys = np.arange(y0_um + step_um / 2, y1_um, step_um)
    gx, gy = np.meshgrid(xs, ys)
    return gx.ravel() / MPP, gy.ravel() / MPP


def slide(immune_tumour_step, immune_stroma_step):
    """Tumour cells (15 µm lattice, 4,444 / mm²) on x < 2 mm, stroma cells (25 µm) beyond;
    lymphocytes on lattices of the given steps in the tumour and in the first 500 µm of stroma
    (None: none)."""
    parts = [
        (*lattice(0, 2000, 0, H_UM, 15.0), "tumour"),
        (*lattice(2000, W_UM, 0, H_UM, 25.0), "stroma"),
    ]
    if immune_tumour_step:
        parts.append((*lattice(0, 2000, 0, H_UM, immune_tumour_step), "lymphocyte"))
    if immune_stroma_step:
        parts.append((*lattice(2000, 2500, 0, H_UM, immune_stroma_step), "lymphocyte"))
    x = np.concatenate([p[0] + 0.3 for p in parts])  # off the exact lattice of the raster
    y = np.concatenate([p[1] + 0.3 for p in parts])
    kind = np.concatenate([np.full(len(p[0]), p[2], dtype=object) for p in parts])
    return x, y, kind


def raster():
    return raster_for((int(W_UM / MPP), int(H_UM / MPP)), MPP, px_um=10.0)


RULE = SourceRule("test", ("lymphocyte",), tumour_min_mm2=1000, stroma_min_mm2=1500)


def report_of(x, y, kind, spec=None):
    comp = compartments_from_cells(raster(), x, y, kind == "tumour", spec)
    xy = np.column_stack([x, y])[kind == "lymphocyte"]
    return comp, immune_report(comp, xy, xy, RULE, TilRule())


def test_margin_band_is_its_stated_total_width():
    r = Raster((50, 300), px_um=10.0, mpp=MPP)
    tumour = np.zeros(r.shape, bool)
    tumour[:, :100] = True  # border at x = 1000 µm
    tissue = np.ones(r.shape, bool)
    band = margin_band(tumour, tissue, r, width_um=500.0)
    cols = np.flatnonzero(band.any(axis=0))
    assert band.all(axis=0)[cols].all()
    # 250 µm each side of the border: pixel centres 755 … 1245 µm
    assert cols.min() == 75 and cols.max() == 124 and len(cols) == 50
    assert band.sum() * r.px_mm2 == pytest.approx(0.5 * 0.5)  # 500 µm × 500 µm of height


def test_stroma_is_non_tumour_tissue_within_reach():
    r = Raster((20, 300), px_um=10.0, mpp=MPP)
    tumour = np.zeros(r.shape, bool)
    tumour[:, :100] = True
    comp = compartments_from_masks(r, np.ones(r.shape, bool), tumour, CompartmentSpec(), "mask")
    cols = np.flatnonzero(comp.stroma.any(axis=0))
    assert cols.min() == 100 and cols.max() == 149  # centres within 500 µm of a tumour centre


def test_uniform_lattice_density_in_cells_per_mm2():
    # 20 µm lattice = 2,500 lymphocytes / mm² in the tumour: a µm² / mm² slip is 1e6 off
    x, y, kind = slide(20.0, None)
    comp, rep = report_of(x, y, kind)
    dens = compartment_densities(comp, x[kind == "lymphocyte"], y[kind == "lymphocyte"])
    assert dens["tumour"] == pytest.approx(2500, rel=0.03)
    assert rep.immune_density_mm2["tumour"] == pytest.approx(2500, rel=0.03)
    # the tumour compartment is the 2 × 2 mm half of the slide
    assert comp.areas_mm2()["tumour"] == pytest.approx(4.0, rel=0.03)


def test_tumour_from_cells_follows_the_tumour_cells():
    x, y, kind = slide(None, None)
    comp, _ = report_of(x, y, kind)
    cols = np.flatnonzero(comp.tumour.mean(axis=0) > 0.5)
    assert abs(cols.max() * 10 + 10 - 2000) <= 30  # border within 3 raster px of 2 mm
    assert comp.areas_mm2()["stroma"] == pytest.approx(0.5 * 2.0, rel=0.05)
    assert comp.areas_mm2()["margin"] == pytest.approx(0.5 * 2.0, rel=0.05)


@pytest.mark.parametrize(
    ("tumour_step", "stroma_step", "expected"),
    [(20.0, 20.0, "inflamed"), (None, 20.0, "excluded"), (100.0, 100.0, "desert")],
)
def test_phenotype_calls_made_up_slides(tumour_step, stroma_step, expected):
    x, y, kind = slide(tumour_step, stroma_step)
    _, rep = report_of(x, y, kind)
    assert rep.phenotype == expected


def test_excluded_slide_stroma_density_and_til_score():
    x, y, kind = slide(None, 20.0)
    _, rep = report_of(x, y, kind)
    # 2,500 / mm² in the 500 µm strip next to the tumour, which is the whole stroma
    assert rep.immune_density_mm2["stroma"] == pytest.approx(2500, rel=0.05)
    assert rep.til["til_density_mm2"] == pytest.approx(2500, rel=0.05)
    disc = math.pi * 4.0**2 * 1e-6  # an 8 µm disc in mm²
    assert rep.til["til_area_pct"] == pytest.approx(100 * 2500 * disc, rel=0.05)
    assert rep.immune_density_mm2["tumour"] == 0


def test_a_wider_margin_moves_stroma_lymphocytes_into_it():
    x, y, kind = slide(None, 20.0)
    narrow, _ = report_of(x, y, kind, CompartmentSpec(margin_um=200.0))
    wide, _ = report_of(x, y, kind, CompartmentSpec(margin_um=1000.0))
    assert narrow.areas_mm2()["margin"] == pytest.approx(0.2 * 2.0, rel=0.1)
    assert wide.areas_mm2()["margin"] == pytest.approx(1.0 * 2.0, rel=0.1)


def test_rule_and_til_score_known_answers():
    assert call_phenotype(None, 5000, RULE) == "none"
    assert call_phenotype(1000, 0, RULE) == "inflamed"
    assert call_phenotype(999, 1500, RULE) == "excluded"
    assert call_phenotype(999, 1499, RULE) == "desert"
    t = til_score(1000, 1.0, TilRule(til_diameter_um=8.0))
    assert t["til_density_mm2"] == 1000
    assert t["til_area_pct"] == pytest.approx(100 * 1000 * math.pi * 16e-6)
    assert til_score(10**9, 1.0, TilRule())["til_area_pct"] == 100.0
    assert til_score(5, 0.0, TilRule())["til_density_mm2"] is None


def test_thresholds_are_per_source_and_never_borrowed():
    he = source_rule("he_lymphocyte")
    assert he.cells == ("lymphocyte", "plasma_cell") and he.tumour_min_mm2 > 0
    assert source_rule("he_inflammatory").cells == ("inflammatory",)
    with pytest.raises(PhenotypeError, match=r"cd8.*tumour_min_mm2 is None"):
        source_rule("cd8")  # CD8 cut-offs are left for the user: no H&E value stands in
    with pytest.raises(PhenotypeError, match="not in the phenotype config"):
        source_rule("ihc_cd3")
    assert til_rule().cells == ("lymphocyte", "plasma_cell")
    assert til_rule(source="he_inflammatory").cells == ("inflammatory",)
    assert til_rule(source="he_lymphocyte").cells == ("lymphocyte", "plasma_cell")


def test_polygon_mask_keeps_holes_and_islands():
    from shapely.geometry import MultiPolygon, Polygon

    from cscvision.cells.compartments import polygon_mask

    r = Raster((100, 100), px_um=10.0, mpp=MPP)  # 1 mm square; 20 level-0 px per pixel
    outer = [(0, 0), (1600, 0), (1600, 1600), (0, 1600)]  # 80 × 80 pixels
    hole = [(400, 400), (1200, 400), (1200, 1200), (400, 1200)]  # 40 × 40
    island = Polygon([(600, 600), (1000, 600), (1000, 1000), (600, 1000)])  # 20 × 20
    mask = polygon_mask(r, MultiPolygon([Polygon(outer, [hole]), island]))
    assert abs(int(mask.sum()) - (80 * 80 - 40 * 40 + 20 * 20)) <= 2 * 80  # a border row
    assert mask[5, 5] and not mask[25, 25] and mask[40, 40] and not mask[90, 90]

"""The cell table of a synthetic slide, and per-tile truth of its cell densities.

The renderer places every nucleus itself (:mod:`cscvision.synth.morphology`: one
candidate per grid cell of each population, kept with a probability set by the tissue
class under it, dropped inside lumens). :func:`slide_cells` enumerates exactly those
nuclei for the whole slide, so the table lists what the image shows, with the population
each came from as its cell type (stem → ``csc_like``, fibroblast → ``stroma``, debris and
ghost nuclei → ``dead``).

**Lymphocyte infiltration** (:class:`Infiltration`): an extra lymphocyte population, on
its own grid and hash stream, kept with one probability in tumour (bulk and stemness-rich)
and another in plain stroma, both drawn per slide independently of the region classes.
It is rendered into the image (a slide without it renders byte-identically to before),
so a region model cannot guess a slide's lymphocyte density from its regions.

**Truth** (``<id>_cells_truth.csv``): for every tile of a grid of ``TRUTH_TILE_UM`` µm
squares from the slide's corner (224 px at 0.5 µm/px, cscvision's default grid), the true
tissue area (the tissue polygon cut by the tile, exact) and the count and density (cells
per mm² of true tissue) of each type; ``tumour`` includes ``csc_like`` and
``inflammatory`` is lymphocytes plus macrophages, as in the cell-type hierarchy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import shapely

from cscvision.cells.table import CellTable, make_table, write_cell_table
from cscvision.core.io import write_csv
from cscvision.synth.layout import SlideLayout
from cscvision.synth.morphology import POPULATIONS, Population, _keep
from cscvision.synth.noise import hash_cells, uniforms
from cscvision.synth.structures import GLAND, VESSEL, inside_lumens

CELL_TYPE_OF = {
    "stem": "csc_like",
    "tumour": "tumour",
    "lymphocyte": "lymphocyte",
    "macrophage": "macrophage",
    "fibroblast": "stroma",
    "debris": "dead",
    "ghost": "dead",
}
INFILTRATE_STREAM = 18
INFILTRATION_RANGE = (0.0, 0.35)  # keep probability of an infiltrating lymphocyte candidate
# The phenotype design: each slide is drawn inflamed, excluded or desert, then its keep
# probabilities from a "high" range where the design lets lymphocytes in and a "low" one
# where it keeps them out (tumour, stroma). Candidates sit one per 9.5 µm square (11,080 /
# mm² at keep 1): high = 3,900-6,600 infiltrating lymphocytes / mm², low = 0-220. High
# clears the immunosuppressive regions' own aggregates, which add up to ~2,100 / mm² to a
# slide's tumour-associated stroma whatever its design.
PHENOTYPE_DESIGN = {
    "inflamed": ("high", "high"),
    "excluded": ("low", "high"),
    "desert": ("low", "low"),
}
DESIGN_RANGES = {"high": (0.35, 0.60), "low": (0.0, 0.02)}
INFILTRATION_MODES = ("uniform", "phenotype")
TRUTH_TILE_UM = 112.0
TRUTH_TYPES = ("lymphocyte", "macrophage", "inflammatory", "tumour", "csc_like", "stroma",
               "dead", "all")  # fmt: skip
ROW_CHUNK = 256  # candidate-grid rows enumerated at once


@dataclass(frozen=True)
class Infiltration:
    """Keep probability of an infiltrating lymphocyte candidate (one per 9.5 µm square) in
    tumour and in stroma."""

    tumour: float
    stroma: float
    design: str | None = None  # the phenotype the slide was drawn as (phenotype mode)

    def population(self) -> Population:
        lymphocyte = next(p for p in POPULATIONS if p.name == "lymphocyte")
        keep = _keep(tumour=self.tumour, stem=self.tumour, stroma=self.stroma)
        return replace(lymphocyte, stream=INFILTRATE_STREAM, keep=keep)

    def as_dict(self) -> dict[str, float | str]:
        out: dict[str, float | str] = {
            "tumour": round(self.tumour, 6), "stroma": round(self.stroma, 6)
        }  # fmt: skip
        if self.design is not None:
            out["design"] = self.design
        return out


def draw_infiltration(rng: np.random.Generator, mode: str = "uniform") -> Infiltration:
    """``uniform``: tumour and stroma infiltration drawn independently (uniform on
    INFILTRATION_RANGE). ``phenotype``: a design drawn first (inflamed, excluded, desert,
    equally likely), then each compartment's keep probability from its DESIGN_RANGES.
    Both are drawn per slide from its own seed, independently of its region classes."""
    if mode == "uniform":
        lo, hi = INFILTRATION_RANGE
        return Infiltration(tumour=float(rng.uniform(lo, hi)), stroma=float(rng.uniform(lo, hi)))
    if mode != "phenotype":
        raise ValueError(f"infiltration {mode!r}: one of {', '.join(INFILTRATION_MODES)}")
    design = list(PHENOTYPE_DESIGN)[int(rng.integers(len(PHENOTYPE_DESIGN)))]
    levels = PHENOTYPE_DESIGN[design]
    tumour, stroma = (float(rng.uniform(*DESIGN_RANGES[lv])) for lv in levels)
    return Infiltration(tumour=tumour, stroma=stroma, design=design)


def population_cells(renderer, pop: Population) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 centres (x, y) of the nuclei of ``pop`` the renderer draws on the slide,
    chosen exactly as :meth:`SlideRenderer._cells` chooses them."""
    layout = renderer.layout
    cell = pop.cell_um / renderer.mpp
    keep_table = np.asarray(pop.keep, np.float64)
    cols = np.arange(int(np.ceil(layout.width_px / cell)) + 1)
    xs, ys = [], []
    for start in range(0, int(np.ceil(layout.height_px / cell)) + 1, ROW_CHUNK):
        rows = np.arange(start, min(start + ROW_CHUNK, int(np.ceil(layout.height_px / cell)) + 1))
        cx, cy = (g.ravel() for g in np.meshgrid(cols, rows))
        prob = keep_table[renderer.class_at((cx + 0.5) * cell, (cy + 0.5) * cell)]
        cx, cy, prob = cx[prob > 0], cy[prob > 0], prob[prob > 0]
        if not len(cx):
            continue
        u = uniforms(hash_cells(renderer.seed, pop.stream, cx, cy), 4)
        px = (cx + 0.5 + pop.jitter * (u[:, 0] - 0.5)) * cell
        py = (cy + 0.5 + pop.jitter * (u[:, 1] - 0.5)) * cell
        ok = u[:, 2] < prob
        seed, mpp = renderer.structure_seed, renderer.mpp
        ok &= ~inside_lumens(VESSEL, seed, px, py, renderer.class_at, mpp)
        ok &= ~inside_lumens(GLAND, seed, px, py, renderer.class_at, mpp, renderer.gland_rate)
        xs.append(px[ok])
        ys.append(py[ok])
    if not xs:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(xs), np.concatenate(ys)


def slide_cells(renderer, slide_id: str) -> CellTable:
    """Every nucleus the renderer draws, typed by its population: the slide's cell table."""
    xs, ys, kinds = [], [], []
    for pop in renderer.populations:
        x, y = population_cells(renderer, pop)
        xs.append(x)
        ys.append(y)
        kinds.append(np.full(len(x), CELL_TYPE_OF[pop.name], dtype=object))
    x, y, kind = np.concatenate(xs), np.concatenate(ys), np.concatenate(kinds)
    order = np.lexsort((x, y))  # raster order of centres: ids independent of population order
    return make_table(
        x[order], y[order], kind[order],
        source="cscvision synth", source_version=None, mpp=renderer.mpp,
        prob=np.ones(len(x), np.float32), slide_id=slide_id,
        class_map={name: t for name, t in CELL_TYPE_OF.items()},
    )  # fmt: skip


def truth_rows(layout: SlideLayout, table: CellTable) -> tuple[list[str], list[list]]:
    """Header and rows of the per-tile density truth (module doc), tiles with tissue only."""
    tile = TRUTH_TILE_UM / layout.mpp
    cols = int(np.ceil(layout.width_px / tile))
    rows = int(np.ceil(layout.height_px / tile))
    xs, ys = np.round(np.arange(cols) * tile), np.round(np.arange(rows) * tile)
    gx, gy = (g.ravel() for g in np.meshgrid(xs, ys))
    boxes = shapely.box(gx, gy, gx + tile, gy + tile)
    area_px = shapely.area(shapely.intersection(boxes, layout.tissue))
    col = np.minimum((table.x // tile).astype(np.int64), cols - 1)
    row = np.minimum((table.y // tile).astype(np.int64), rows - 1)
    index = row * cols + col
    names = table.cell_type
    groups = {
        "inflammatory": ("lymphocyte", "macrophage"),
        "tumour": ("tumour", "csc_like"),
        "all": tuple(set(CELL_TYPE_OF.values())),
    }
    counts = {}
    for t in TRUTH_TYPES:
        members = np.isin(names, groups.get(t, (t,)))
        counts[t] = np.bincount(index[members], minlength=rows * cols)
    tissue_mm2 = area_px * layout.mpp**2 / 1e6
    header = ["x", "y", "tissue_um2", "tissue_fraction"]
    header += [f"count_{t}" for t in TRUTH_TYPES] + [f"density_{t}" for t in TRUTH_TYPES]
    out = []
    for i in np.flatnonzero(area_px > 0):
        row_out = [int(gx[i]), int(gy[i]), f"{area_px[i] * layout.mpp**2:.1f}",
                   f"{area_px[i] / tile**2:.4f}"]  # fmt: skip
        row_out += [int(counts[t][i]) for t in TRUTH_TYPES]
        row_out += [f"{counts[t][i] / tissue_mm2[i]:.3f}" for t in TRUTH_TYPES]
        out.append(row_out)
    return header, out


def write_slide_cells(renderer, slide_id: str, table_path, truth_path) -> CellTable:
    """Write the slide's cell table (+ sidecar) and its per-tile density truth."""
    table = slide_cells(renderer, slide_id)
    write_cell_table(table_path, table)
    header, rows = truth_rows(renderer.layout, table)
    write_csv(truth_path, header, rows)
    return table

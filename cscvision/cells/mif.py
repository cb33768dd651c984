"""One mIF image → the cell table of its H&E slide: cells (segmented, or a vendor's export),
gated and phenotyped, carried into H&E level-0 px through the registration.

The vendor export read here is QuPath's measurement table (*Measure → Export
measurements*, detections; tab- or comma-separated): ``Centroid X µm``, ``Centroid Y µm``
(µm of the image) and one ``<Compartment>: <channel> mean`` column per marker
(``Nucleus``, ``Membrane``, ``Cytoplasm`` or ``Cell``, as QuPath's cell detection names
them); a missing compartment falls back to ``Cell: <channel> mean``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cscvision.cells.mif_gating import DEFAULT_METHOD, phenotype_table
from cscvision.cells.mif_panel import Panel, PanelError, channel_indices
from cscvision.cells.mif_read import MifImage
from cscvision.cells.mif_segment import MeasuredCells, SegmentParams, segment_and_measure
from cscvision.cells.table import CellTable

QUPATH_X, QUPATH_Y = "Centroid X µm", "Centroid Y µm"
QUPATH_COMPARTMENT = {"nucleus": "Nucleus", "membrane": "Membrane", "cytoplasm": "Cytoplasm",
                      "cell": "Cell"}  # fmt: skip


@dataclass(frozen=True)
class MifResult:
    table: CellTable  # H&E level-0 px (mIF level-0 px when no H&E slide was given)
    thresholds: dict[str, float]
    registration: object | None  # cscvision.labels.registration.Registration
    n_cells: int
    guarded: tuple[str, ...] = ()  # markers whose split the guard replaced (mif_gating)


def read_qupath_measurements(path: str | Path, image: MifImage, panel: Panel) -> MeasuredCells:
    """A QuPath detection measurement export (module doc) as measured cells in the mIF
    image's level-0 px."""
    path = Path(path)
    with open(path, encoding="utf-8-sig", newline="") as f:
        head = f.readline()
        f.seek(0)
        rows = list(csv.DictReader(f, delimiter="\t" if "\t" in head else ","))
    if not rows:
        raise PanelError(f"{path}: no cells in the QuPath export")
    columns = set(rows[0])
    missing = [c for c in (QUPATH_X, QUPATH_Y) if c not in columns]
    wanted = {}
    for i, m in enumerate(panel.markers):
        name = f"{QUPATH_COMPARTMENT[m.compartment]}: {m.channel} mean"
        fallback = f"Cell: {m.channel} mean"
        if name not in columns and fallback not in columns:
            raise PanelError(
                f"{path}: no column {name!r} (or {fallback!r}) for {panel.path}: markers[{i}] "
                f"({m.marker}); export the detections' measurements from QuPath's cell detection"
            )
        wanted[m.marker] = name if name in columns else fallback
    if missing:
        raise PanelError(f"{path}: columns {missing} missing; is it a QuPath measurement export?")

    def col(name: str) -> np.ndarray:
        return np.array([float(r[name]) if r[name] not in ("", "NaN") else np.nan for r in rows])

    return MeasuredCells(
        x=col(QUPATH_X) / image.mpp,
        y=col(QUPATH_Y) / image.mpp,
        area_um2=np.full(len(rows), np.nan),
        intensity={m: col(c) for m, c in wanted.items()},
        mpp=image.mpp,
    )


def mif_cell_table(
    image: MifImage,
    panel: Panel,
    *,
    he_slide=None,
    slide_id: str = "",
    method: str = DEFAULT_METHOD,
    guard: bool = True,
    segment: SegmentParams | None = None,
    measured: MeasuredCells | None = None,
    registration_params=None,
    compensate: bool = False,
) -> MifResult:
    """Cells of ``image`` (segmented unless ``measured`` is given), gated and typed by the
    panel; with ``he_slide`` (an open slide) registered onto it and carried into its
    level-0 px (cells that land off the slide are dropped). ``method``, ``guard``: the
    gating (cscvision.cells.mif_gating); ``compensate``: remove the spillover between
    neighbouring channels before gating."""
    cells = measured or segment_and_measure(image, panel, segment)
    index = channel_indices(panel, image.channels, str(image.path))
    order = sorted(index, key=index.get) if compensate else None
    table, thresholds, guarded = phenotype_table(
        cells.x, cells.y, cells.intensity, panel, method=method, guard=guard, mpp=image.mpp,
        slide_id=slide_id, source=f"cscvision mif ({image.kind})", spill_order=order,
    )  # fmt: skip
    if he_slide is None:
        return MifResult(table, thresholds, None, len(table), guarded)
    from cscvision.cells.mif_register import VirtualBrightfield, mif_to_he_l0
    from cscvision.labels.registration import register_slides

    reg, _ = register_slides(he_slide, VirtualBrightfield(image, panel), registration_params)
    if not reg.ok:
        from cscvision.labels.registration import RegistrationError

        raise RegistrationError(f"{image.path}: registration onto the H&E failed: {reg.reason}")
    xy = mif_to_he_l0(reg, np.column_stack([table.x, table.y]))
    w, h = he_slide.info.dimensions
    on = (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] < w) & (xy[:, 1] < h)
    keep = {k: np.asarray(v)[on] for k, v in table.markers.items()}
    moved = replace(
        table, x=xy[on, 0], y=xy[on, 1], codes=table.codes[on], prob=table.prob[on],
        markers=keep, mpp=he_slide.info.mpp, cell_id=table.ids[on],
    )  # fmt: skip
    return MifResult(moved, thresholds, reg, len(table), guarded)

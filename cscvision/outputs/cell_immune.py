"""A slide's compartments, TIL score and immune phenotype for ``cscvision cells``.

Where the tumour compartment comes from, first found wins:

1. ``annotations``: ``<dir>/<slide_id>.geojson`` (or ``.xml``), regions classed tumour /
   tumor (tumour) and stroma (annotated stroma; else all non-tumour tissue); every other
   named class is a region that gets its own phenotype.
2. ``infer``: a ``cscvision infer`` folder whose ``<slide_id>/maps.npz`` holds the
   ``tumour_target`` map (a model's tumour probability ≥ ``map_threshold``). A stemness map
   there (``stemness_target``) gets the phenotype of the stemness-rich area on its own.
3. the cells: tumour-cell density (:mod:`cscvision.cells.compartments`).

The rule and thresholds: :mod:`cscvision.cells.phenotype` (per cell source).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cscvision.cells.compartments import (
    Compartments,
    CompartmentSpec,
    compartments_from_cells,
    compartments_from_masks,
    map_mask,
    polygon_mask,
    raster_for,
    restrict,
)
from cscvision.cells.phenotype import (
    PhenotypeError,
    default_config,
    immune_report,
    read_config,
    source_rule,
    til_rule,
)
from cscvision.cells.table import CellTable
from cscvision.cells.types import CellTypes
from cscvision.core.errors import CscvisionError

TUMOUR_NAMES = ("tumour", "tumor", "invasive tumour", "invasive tumor", "tumour region",
                "tumor region", "neoplastic")  # fmt: skip
STROMA_NAMES = ("stroma", "tumour-associated stroma", "tumor-associated stroma",
                "tumour stroma", "tumor stroma")  # fmt: skip


class CellSettingsError(CscvisionError, ValueError):
    """A cell or immune-phenotype setting out of range; the message names the value."""


@dataclass(frozen=True)
class ImmuneSettings:
    """Compartment parameters (µm, cells / mm²), the cell source, where the tumour comes from."""

    source: str = "he_lymphocyte"
    config: str | None = None  # a phenotype YAML; None: the packaged one
    px_um: float = 10.0
    margin_um: float = 500.0
    stroma_reach_um: float = 500.0
    tumour_cells_min_mm2: float = 500.0
    annotations: str | None = None
    infer: str | None = None
    tumour_target: str = "tumour"
    stemness_target: str = "stemness"
    map_threshold: float = 0.5

    def __post_init__(self) -> None:
        try:
            self.spec()  # raises on a bad value
        except ValueError as e:
            raise CellSettingsError(str(e)) from None
        source_rule(self.source, self.load_config())  # unknown source, unset cut-offs

    def spec(self) -> CompartmentSpec:
        return CompartmentSpec(
            px_um=self.px_um,
            margin_um=self.margin_um,
            stroma_reach_um=self.stroma_reach_um,
            tumour_min_mm2=self.tumour_cells_min_mm2,
        )

    def load_config(self) -> dict:
        return read_config(self.config) if self.config else default_config()


def _nodes_mask(table: CellTable, hierarchy: CellTypes, nodes) -> np.ndarray:
    member = hierarchy.membership(table.types, list(nodes))
    return member.any(axis=1)[table.codes] if len(table.types) else np.zeros(len(table), bool)


def _annotation_file(folder: str, slide_id: str) -> Path | None:
    for suffix in (".geojson", ".json", ".xml"):
        path = Path(folder) / f"{slide_id}{suffix}"
        if path.is_file():
            return path
    return None


def _from_annotations(path: Path, raster, tissue, spec) -> tuple[Compartments, dict]:
    from shapely import union_all

    from cscvision.labels.annotations import read_annotations

    regions = read_annotations(path)
    by_name: dict[str, list] = {}
    for r in regions:
        by_name.setdefault(r.name.strip(), []).append(r.geometry)
    tumour = [g for n, gs in by_name.items() if n.lower() in TUMOUR_NAMES for g in gs]
    stroma = [g for n, gs in by_name.items() if n.lower() in STROMA_NAMES for g in gs]
    if not tumour:
        raise ValueError(
            f"{path}: no region classed tumour/tumor; class the tumour regions so (or leave "
            "out --annotations to take the tumour from the cells)"
        )
    t_mask = polygon_mask(raster, union_all(tumour))
    s_mask = polygon_mask(raster, union_all(stroma)) if stroma else None
    comp = compartments_from_masks(raster, tissue, t_mask, spec, f"annotations:{path.name}",
                                   stroma=s_mask)  # fmt: skip
    others = {
        n: polygon_mask(raster, union_all(gs))
        for n, gs in by_name.items()
        if n and n.lower() not in TUMOUR_NAMES + STROMA_NAMES
    }
    return comp, others


def immune_inputs(settings: ImmuneSettings | None, slide_id: str) -> dict[str, Path]:
    """The files a slide's phenotype reads besides its cells (annotations, a model's maps,
    a phenotype config), so a changed one makes earlier outputs stale."""
    found: dict[str, Path] = {}
    if settings is None:
        return found
    ann = _annotation_file(settings.annotations, slide_id) if settings.annotations else None
    maps = Path(settings.infer) / slide_id / "maps.npz" if settings.infer else None
    config = Path(settings.config) if settings.config else None
    for key, path in (("annotations", ann), ("infer_maps", maps), ("config", config)):
        if path is not None and path.is_file():
            found[key] = path
    return found


def _infer_maps(folder: str, slide_id: str):
    from cscvision.outputs.read import OutputsError, read_slide_outputs

    path = Path(folder) / slide_id
    try:
        return read_slide_outputs(path) if path.is_dir() else None
    except OutputsError:
        return None


def slide_compartments(
    table: CellTable,
    dimensions: tuple[int, int],
    slide_mpp: float,
    slide_id: str,
    settings: ImmuneSettings,
    hierarchy: CellTypes,
) -> tuple[Compartments, dict[str, np.ndarray]]:
    """The slide's compartments and the regions phenotyped on their own (name → mask)."""
    spec = settings.spec()
    raster = raster_for(dimensions, slide_mpp, spec.px_um)
    is_tumour = _nodes_mask(table, hierarchy, ["tumour"])
    is_immune = _nodes_mask(table, hierarchy, ["inflammatory"])
    comp = compartments_from_cells(raster, table.x, table.y, is_tumour, spec, None, is_immune)
    regions: dict[str, np.ndarray] = {}
    ann = _annotation_file(settings.annotations, slide_id) if settings.annotations else None
    if ann is not None:
        comp, others = _from_annotations(ann, raster, comp.tissue, spec)
        regions.update({f"region:{n}": m for n, m in others.items()})
    maps = _infer_maps(settings.infer, slide_id) if settings.infer else None
    if maps is not None:
        if ann is None and settings.tumour_target in maps.maps:
            mask = map_mask(raster, maps.maps[settings.tumour_target], maps.transform,
                            settings.map_threshold)  # fmt: skip
            comp = compartments_from_masks(raster, comp.tissue, mask, spec,
                                           f"infer:{settings.tumour_target}")  # fmt: skip
        if settings.stemness_target in maps.maps:
            regions["stemness_rich"] = map_mask(
                raster, maps.maps[settings.stemness_target], maps.transform,
                settings.map_threshold,
            )  # fmt: skip
    return comp, regions


def slide_immune(
    table: CellTable,
    dimensions: tuple[int, int],
    slide_mpp: float,
    slide_id: str,
    settings: ImmuneSettings,
    hierarchy: CellTypes,
) -> dict[str, Any]:
    """The ``immune`` entry of a slide's summary: rule, per-scope reports, or why none."""
    config = settings.load_config()
    rule, til = source_rule(settings.source, config), til_rule(config, settings.source)
    entry: dict[str, Any] = {
        "rule": "inflamed if d_tumour >= tumour_min_mm2; else excluded if d_stroma >= "
        "stroma_min_mm2; else desert (no tumour compartment: none)",
        "source": dataclasses.asdict(rule),
        "til": dataclasses.asdict(til),
        "compartments": dataclasses.asdict(settings.spec()),
    }
    immune = _nodes_mask(table, hierarchy, rule.cells)
    if not immune.any():
        entry["skipped"] = _no_source_cells(table, hierarchy, rule)
        return entry
    comp, regions = slide_compartments(table, dimensions, slide_mpp, slide_id, settings,
                                       hierarchy)  # fmt: skip
    xy = np.column_stack([table.x, table.y])
    xy_immune, xy_til = xy[immune], xy[_nodes_mask(table, hierarchy, til.cells)]
    entry["slide"] = immune_report(comp, xy_immune, xy_til, rule, til).as_dict()
    entry["regions"] = {
        name: immune_report(
            restrict(comp, mask, comp.method), xy_immune, xy_til, rule, til
        ).as_dict()
        for name, mask in regions.items()
    }
    return entry


def _no_source_cells(table: CellTable, hierarchy: CellTypes, rule) -> str:
    held = sorted({t for t, n in table.counts().items() if n})
    hint = (
        " (a PanNuke-class detector gives only 'inflammatory': pass --immune-source "
        "he_inflammatory)"
        if "inflammatory" in held
        else ""
    )
    return (
        f"no cell of the source {rule.name!r} ({', '.join(rule.cells)}) in the table, which "
        f"holds {', '.join(held) or 'no cells'}; no phenotype called{hint}"
    )


__all__ = [
    "CellSettingsError",
    "ImmuneSettings",
    "PhenotypeError",
    "immune_inputs",
    "slide_compartments",
    "slide_immune",
]

"""Immune phenotype (inflamed / excluded / desert) and TIL score from compartment densities.

The rule, its thresholds and their sources live in the packaged ``immune_phenotype.yaml``
(``cscvision config show immune_phenotype``): thresholds are keyed by cell source
(``he_lymphocyte``, ``he_inflammatory``, ``cd8``), because a density of H&E lymphocytes is
not a density of CD8+ cells. With ``d_T``, ``d_S`` the source's immune-cell densities in the
tumour and the tumour-associated stroma (cells / mm²)::

    inflamed   d_T >= tumour_min_mm2
    excluded   d_T <  tumour_min_mm2  and  d_S >= stroma_min_mm2
    desert     otherwise
    none       no tumour compartment (no call)

TIL score (TIGER style): TILs (lymphocytes and plasma cells) in the tumour-associated stroma
as cells / mm² of it, and as the % of its area they cover, each counted as a disc of
``til_diameter_um`` (capped at 100).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cscvision.cells.compartments import Compartments, compartment_counts
from cscvision.core.config_files import ConfigFileError, read_yaml
from cscvision.core.errors import CscvisionError
from cscvision.core.resources import packaged_dir

CONFIG_NAME = "immune_phenotype.yaml"
PHENOTYPES = ("inflamed", "excluded", "desert")
NO_CALL = "none"


class PhenotypeError(CscvisionError, ValueError):
    """A phenotype config or cell source that cannot be used as it is."""


@dataclass(frozen=True)
class SourceRule:
    """One cell source's immune types and cut-offs (cells / mm²)."""

    name: str
    cells: tuple[str, ...]
    tumour_min_mm2: float
    stroma_min_mm2: float
    reference: str = ""


@dataclass(frozen=True)
class TilRule:
    cells: tuple[str, ...] = ("lymphocyte", "plasma_cell")
    til_diameter_um: float = 8.0


@functools.cache
def default_config() -> dict:
    return read_config(packaged_dir("configs") / CONFIG_NAME)


def read_config(path: str | Path) -> dict:
    path = Path(path)
    try:
        doc = read_yaml(path)
    except ConfigFileError as e:
        raise PhenotypeError(f"immune-phenotype config {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("sources"), dict):
        raise PhenotypeError(
            f"{path}: needs a 'sources' mapping (see `cscvision config show immune_phenotype`)"
        )
    return doc


def source_rule(name: str, config: Mapping[str, Any] | None = None) -> SourceRule:
    """The cut-offs of cell source ``name``; an error if the config lacks it or leaves its
    thresholds unset (never falls back to another source's)."""
    sources = (config or default_config())["sources"]
    if name not in sources:
        raise PhenotypeError(
            f"immune source {name!r} is not in the phenotype config; known: {', '.join(sources)}"
        )
    entry = sources[name] or {}
    values = {}
    for key in ("tumour_min_mm2", "stroma_min_mm2"):
        value = entry.get(key)
        if value is None or not (isinstance(value, int | float) and value > 0):
            raise PhenotypeError(
                f"immune source {name!r}: {key} is {value!r}; set it (cells / mm² of that "
                f"source, {entry.get('reference', 'see the config')}) in a copy of "
                "immune_phenotype.yaml and pass it with --phenotype-config"
            )
        values[key] = float(value)
    cells = tuple(entry.get("cells") or ())
    if not cells:
        raise PhenotypeError(f"immune source {name!r}: 'cells' lists no cell type")
    return SourceRule(name, cells, reference=str(entry.get("reference", "")), **values)


def til_rule(config: Mapping[str, Any] | None = None, source: str | None = None) -> TilRule:
    """The TIL rule; a source's own ``til_cells`` (PanNuke's "inflammatory" has no
    lymphocyte class) replace the rule's cells."""
    config = config or default_config()
    til = config.get("til") or {}
    own = ((config.get("sources") or {}).get(source) or {}).get("til_cells") if source else None
    rule = TilRule(
        cells=tuple(own or til.get("cells") or TilRule.cells),
        til_diameter_um=float(til.get("til_diameter_um", TilRule.til_diameter_um)),
    )
    if not rule.til_diameter_um > 0:
        raise PhenotypeError(f"til.til_diameter_um must be positive, got {rule.til_diameter_um}")
    return rule


def call_phenotype(d_tumour: float | None, d_stroma: float | None, rule: SourceRule) -> str:
    """The rule of the module doc; ``d_tumour`` None (no tumour compartment): no call."""
    if d_tumour is None:
        return NO_CALL
    if d_tumour >= rule.tumour_min_mm2:
        return "inflamed"
    if d_stroma is not None and d_stroma >= rule.stroma_min_mm2:
        return "excluded"
    return "desert"


def til_score(n_til_stroma: int, stroma_mm2: float, rule: TilRule) -> dict[str, float | None]:
    """TILs / mm² of tumour-associated stroma and the % of it they cover (module doc)."""
    if not stroma_mm2 > 0:
        return {"til_density_mm2": None, "til_area_pct": None}
    disc_mm2 = math.pi * (rule.til_diameter_um / 2.0) ** 2 * 1e-6
    pct = min(100.0, 100.0 * n_til_stroma * disc_mm2 / stroma_mm2)
    return {"til_density_mm2": n_til_stroma / stroma_mm2, "til_area_pct": pct}


@dataclass(frozen=True)
class ImmuneReport:
    """One slide's (or region's) compartments, densities, TIL score and call."""

    source: str
    phenotype: str
    areas_mm2: dict[str, float]
    immune_counts: dict[str, int]
    immune_density_mm2: dict[str, float | None]
    til: dict[str, float | None]
    n_til_stroma: int
    method: str

    def as_dict(self) -> dict[str, Any]:
        def r(v):
            return None if v is None or not math.isfinite(v) else round(float(v), 4)

        return {
            "immune_source": self.source,
            "phenotype": self.phenotype,
            "compartments_from": self.method,
            "areas_mm2": {k: r(v) for k, v in self.areas_mm2.items()},
            "immune_counts": dict(self.immune_counts),
            "immune_density_mm2": {k: r(v) for k, v in self.immune_density_mm2.items()},
            "til_density_mm2": r(self.til["til_density_mm2"]),
            "til_area_pct": r(self.til["til_area_pct"]),
            "n_til_stroma": self.n_til_stroma,
        }


def immune_report(
    comp: Compartments,
    xy_immune: np.ndarray,
    xy_til: np.ndarray,
    rule: SourceRule,
    til: TilRule,
) -> ImmuneReport:
    """Densities of the immune cells (level-0 [n, 2]) per compartment, the TIL score of the
    TIL cells in the stroma, and the phenotype call."""
    areas = comp.areas_mm2()
    counts = compartment_counts(comp, xy_immune[:, 0], xy_immune[:, 1])
    dens = {k: (counts[k] / areas[k] if areas[k] > 0 else None) for k in counts}
    n_til = compartment_counts(comp, xy_til[:, 0], xy_til[:, 1])["stroma"]
    tumour_d = dens["tumour"] if areas["tumour"] > 0 else None
    return ImmuneReport(
        source=rule.name,
        phenotype=call_phenotype(tumour_d, dens["stroma"], rule),
        areas_mm2=areas,
        immune_counts=counts,
        immune_density_mm2=dens,
        til=til_score(n_til, areas["stroma"], til),
        n_til_stroma=n_til,
        method=comp.method,
    )


def cells_of(types: Sequence[str], codes: np.ndarray, member: np.ndarray) -> np.ndarray:
    """bool[N]: cells whose stored type (``codes`` into ``types``) counts in any node of
    ``member`` (bool[len(types), nodes] from :meth:`CellTypes.membership`)."""
    if not len(types):
        return np.zeros(len(codes), bool)
    return member.any(axis=1)[codes]

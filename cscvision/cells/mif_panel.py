"""The panel file of a multiplex IF image: channels → markers, compartments, phenotype rules.

A YAML file (docs/reference/mif-panel.md)::

    nuclear_marker: DAPI            # the marker nuclei are found on
    markers:                        # one entry per channel used
      - {channel: DAPI, marker: DAPI, compartment: nucleus}
      - {channel: Opal 520, marker: FOXP3, compartment: nucleus}
      - {channel: Opal 540, marker: CD8, compartment: membrane, threshold: 1500}
    phenotypes:                     # in order: the first rule a cell meets types it
      - {type: treg, all: [CD4, FOXP3]}
      - {type: csc_like, all: [panCK], any: [CD44, CD133], none: [CD45]}
    default_type: other             # cells no rule types
    lineage: [CD8, CD4, CD68, panCK] # optional: at most one of these per cell

``channel`` is the image's channel name (OME ``Channel/@Name``, the qptiff ``<Name>``, or
the file stem of a one-TIFF-per-channel folder), matched ignoring case and surrounding
spaces; ``compartment`` is ``nucleus``, ``membrane``, ``cytoplasm`` or ``cell``;
``threshold`` (optional) is the positivity threshold in the image's intensity units
(the mean of the compartment), else it is found per slide. ``type`` is a node of the
cell-type hierarchy (``cscvision/resources/configs/cell_types.yaml``). ``lineage``
(optional) lists markers of mutually exclusive lineages: a cell called positive for several
keeps only the one furthest above its threshold (in log intensity), the rest become
negative; a tumour cell touching CD8+ lymphocytes is then not a CD8 T cell.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cscvision.cells.types import CellTypeError, cell_types
from cscvision.core.config_files import ConfigFileError, read_yaml
from cscvision.core.errors import CscvisionError

COMPARTMENTS = ("nucleus", "membrane", "cytoplasm", "cell")


class PanelError(CscvisionError, ValueError):
    """A panel file that does not fit the format, or an image that does not fit its panel."""


@dataclass(frozen=True)
class PanelMarker:
    channel: str
    marker: str
    compartment: str
    threshold: float | None = None


@dataclass(frozen=True)
class PhenotypeRule:
    """A cell is ``type`` when positive for every ``all``, at least one ``any`` (when
    given) and none of ``none``."""

    type: str
    all: tuple[str, ...] = ()
    any: tuple[str, ...] = ()
    none: tuple[str, ...] = ()

    @property
    def markers(self) -> tuple[str, ...]:
        return self.all + self.any + self.none


@dataclass(frozen=True)
class Panel:
    markers: tuple[PanelMarker, ...]
    nuclear_marker: str
    rules: tuple[PhenotypeRule, ...]
    default_type: str = "other"
    path: str = ""
    lineage: tuple[str, ...] = ()

    @property
    def measured(self) -> tuple[PanelMarker, ...]:
        """The markers gated for positivity: all but the nuclear stain."""
        return tuple(m for m in self.markers if m.marker != self.nuclear_marker)

    def marker(self, name: str) -> PanelMarker:
        return next(m for m in self.markers if m.marker == name)


def _names(value, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PanelError(f"{where}: expected a list of marker names, got {value!r}")
    return tuple(value)


def _marker(entry, where: str) -> PanelMarker:
    if not isinstance(entry, dict) or not {"channel", "marker"} <= set(entry):
        raise PanelError(f"{where}: each marker needs 'channel' and 'marker' (got {entry!r})")
    compartment = str(entry.get("compartment", "cell")).strip().lower()
    if compartment not in COMPARTMENTS:
        raise PanelError(f"{where}: compartment {compartment!r}; one of {', '.join(COMPARTMENTS)}")
    threshold = entry.get("threshold")
    if threshold is not None and not isinstance(threshold, int | float):
        raise PanelError(f"{where}: threshold {threshold!r} is not a number")
    return PanelMarker(str(entry["channel"]).strip(), str(entry["marker"]).strip(), compartment,
                       None if threshold is None else float(threshold))  # fmt: skip


def _rule(entry, where: str, known: set[str]) -> PhenotypeRule:
    if not isinstance(entry, dict) or "type" not in entry:
        raise PanelError(f"{where}: each phenotype needs a 'type' (got {entry!r})")
    rule = PhenotypeRule(str(entry["type"]), *(_names(entry.get(k), f"{where}.{k}")
                                               for k in ("all", "any", "none")))  # fmt: skip
    if not rule.all and not rule.any:
        raise PanelError(f"{where}: phenotype {rule.type!r} needs 'all' or 'any' markers")
    unknown = [m for m in rule.markers if m not in known]
    if unknown:
        raise PanelError(
            f"{where}: phenotype {rule.type!r} names {unknown}, which no marker entry of the "
            f"panel measures (markers: {', '.join(sorted(known))}); add them or drop them"
        )
    return rule


def parse_panel(doc: dict, source: str = "panel") -> Panel:
    """A :class:`Panel` from the parsed YAML ``doc`` (``source`` names it in errors)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("markers"), list):
        raise PanelError(f"{source}: needs a 'markers' list (see docs/reference/mif-panel.md)")
    markers = tuple(_marker(e, f"{source}: markers[{i}]") for i, e in enumerate(doc["markers"]))
    for key, label in (("marker", "marker"), ("channel", "channel")):
        seen: dict[str, int] = {}
        for i, m in enumerate(markers):
            k = getattr(m, key).casefold()
            if k in seen:
                raise PanelError(
                    f"{source}: markers[{i}] repeats the {label} {getattr(m, key)!r} of "
                    f"markers[{seen[k]}]; list each once"
                )
            seen[k] = i
    nuclear = str(doc.get("nuclear_marker", "DAPI"))
    if nuclear not in {m.marker for m in markers}:
        raise PanelError(f"{source}: nuclear_marker {nuclear!r} is not one of the markers")
    known = {m.marker for m in markers} - {nuclear}
    rules = tuple(_rule(e, f"{source}: phenotypes[{i}]", known)
                  for i, e in enumerate(doc.get("phenotypes") or []))  # fmt: skip
    lineage = _names(doc.get("lineage"), f"{source}: lineage")
    stray = [m for m in lineage if m not in known]
    if stray:
        raise PanelError(f"{source}: lineage names {stray}, which are no gated marker of the panel")
    default = str(doc.get("default_type", "other"))
    hierarchy = cell_types()
    try:
        for t in (*(r.type for r in rules), default):
            hierarchy.check(t)
    except CellTypeError as e:
        raise PanelError(f"{source}: {e}") from None
    return Panel(markers, nuclear, rules, default, source, lineage)


def read_panel(path: str | Path) -> Panel:
    """Read and check a panel YAML file (module doc)."""
    path = Path(path)
    try:
        doc = read_yaml(path)
    except ConfigFileError as e:
        raise PanelError(f"panel file {e}") from None
    return parse_panel(doc, str(path))


def channel_indices(panel: Panel, channels: tuple[str, ...], image: str) -> dict[str, int]:
    """marker → channel index in ``channels`` (the image's names); a panel channel the
    image lacks, or holds twice, is an error naming the image and the panel entry."""
    folded = [c.strip().casefold() for c in channels]
    out = {}
    for i, m in enumerate(panel.markers):
        hits = [k for k, c in enumerate(folded) if c == m.channel.casefold()]
        entry = f"{panel.path}: markers[{i}] ({m.marker})"
        if not hits:
            raise PanelError(
                f"{image}: no channel {m.channel!r}, which {entry} names; the image's channels "
                f"are {', '.join(map(repr, channels))}: fix the panel's channel name"
            )
        if len(hits) > 1:
            raise PanelError(
                f"{image}: channel {m.channel!r} ({entry}) occurs {len(hits)} times (indices "
                f"{hits}); rename the image's channels or export one of them"
            )
        out[m.marker] = hits[0]
    return out

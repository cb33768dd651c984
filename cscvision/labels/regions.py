"""An annotated region: what every annotation reader returns and soft targets are made from."""

from __future__ import annotations

from dataclasses import dataclass

from shapely.geometry import MultiPolygon, Polygon


@dataclass(frozen=True)
class Region:
    """One annotated region: a class name and a (Multi)Polygon in level-0 pixels."""

    name: str  # class name as written in the file ("" when unclassified)
    geometry: Polygon | MultiPolygon
    color: tuple[int, int, int] | None
    object_type: str  # "annotation", "detection", "cell", ... (ASAP: "annotation")

"""Soft multi-label tile targets from annotated regions.

A tile's target value is the fraction of its tissue covered by that target's regions. Each
target's regions are merged, rasterised once at a coarse resolution (the tissue mask's, or
about 16 raster pixels per tile side) and summed per tile through an integral image, so
tens of thousands of tiles cost milliseconds. Accuracy is about one raster pixel along
region borders, which is what a soft label needs.

:class:`ClassMap` says which annotation class names feed which target, which are known
but not targets, and which mark tiles to drop (pen, artefacts). Matching ignores case.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon

from cscvision.core.geometry import tile_box_counts
from cscvision.labels.regions import Region

RASTER_PX_PER_TILE = 16  # raster resolution when no tissue mask sets it
MAX_RASTER_PX = 200_000_000  # guard: a finer raster than this is a mistake in the scale


def _key(name: str) -> str:
    return name.strip().casefold()


@dataclass(frozen=True)
class ClassMap:
    """How annotation class names become targets.

    ``mapping`` maps an annotation class name to a target; a class named like a target maps
    to it without an entry. ``ignore`` lists known classes that are no target (tiles under
    them are negatives); ``exclude`` lists classes whose tiles are removed from training.
    """

    targets: tuple[str, ...]
    mapping: dict[str, str] = field(default_factory=dict)
    ignore: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.targets or len(set(map(_key, self.targets))) != len(self.targets):
            raise ValueError(f"ClassMap needs distinct target names, got {self.targets}")
        unknown = sorted({t for t in self.mapping.values() if _key(t) not in self._target_keys})
        if unknown:
            raise ValueError(
                f"ClassMap maps to unknown target(s) {unknown}; targets: {self.targets}"
            )
        clash = {_key(n) for n in self.mapping} & {_key(n) for n in self.exclude}
        if clash:
            raise ValueError(f"ClassMap: class(es) {sorted(clash)} are both mapped and excluded")

    @property
    def _target_keys(self) -> dict[str, str]:
        return {_key(t): t for t in self.targets}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClassMap:
        """Build from config: ``{targets: [..] | {target: [class names]}, mapping: {class:
        target}, ignore: [..], exclude: [..]}`` (``mapping``, ``ignore``, ``exclude`` optional).
        """
        unknown = set(d) - {"targets", "mapping", "ignore", "exclude"}
        if unknown or "targets" not in d:
            raise ValueError(
                f"class map: expected keys targets, mapping, ignore, exclude; got {sorted(d)}"
            )
        targets = d["targets"]
        mapping = {str(k): str(v) for k, v in (d.get("mapping") or {}).items()}
        if isinstance(targets, Mapping):
            for target, names in targets.items():
                for name in [names] if isinstance(names, str) else names or []:
                    mapping[str(name)] = str(target)
            targets = list(targets)
        return cls(
            targets=tuple(str(t) for t in targets),
            mapping=mapping,
            ignore=tuple(str(n) for n in d.get("ignore") or ()),
            exclude=tuple(str(n) for n in d.get("exclude") or ()),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "targets": list(self.targets),
            "mapping": dict(self.mapping),
            "ignore": list(self.ignore),
            "exclude": list(self.exclude),
        }

    def target_of(self, name: str) -> str | None:
        """The target a class name feeds, or None."""
        key = _key(name)
        for cls_name, target in self.mapping.items():
            if _key(cls_name) == key:
                return self._target_keys[_key(target)]
        return self._target_keys.get(key)

    def is_excluded(self, name: str) -> bool:
        return _key(name) in {_key(n) for n in self.exclude}

    def is_known(self, name: str) -> bool:
        key = _key(name)
        return (
            self.target_of(name) is not None
            or self.is_excluded(name)
            or key in {_key(n) for n in self.ignore}
        )


DEFAULT_CLASS_MAP = ClassMap(
    targets=("stemness", "immunosuppressive"),
    mapping={
        "Stemness-rich": "stemness",
        "Stemness": "stemness",
        "CSC": "stemness",
        "Immunosuppressive": "immunosuppressive",
        "Immunosuppressive TME": "immunosuppressive",
    },
    ignore=("Tumor", "Tumour", "Necrosis", "Stroma", "Immune cells", "Other", "Region*"),
    # QC artefacts (the names QuPath users and `cscvision synth` give them): tiles dropped.
    exclude=(
        "Artefact", "Artifact", "Pen", "Pen mark", "Fold", "Bubble", "Out of focus", "Blur",
        "Ignore*",
    ),
)  # fmt: skip


@dataclass(frozen=True)
class TileTargets:
    """Per-tile soft targets (float32[N, T], order of ``ClassMap.targets``) and exclusions."""

    targets: np.ndarray
    excluded: np.ndarray  # bool[N]: tile touches an excluded region; drop it from training
    unmapped: list[str]  # class names found in the regions but unknown to the class map


def unmapped_classes(regions: Iterable[Region], class_map: ClassMap) -> list[str]:
    """Sorted class names present in ``regions`` that ``class_map`` does not know.

    Unclassified regions (name "") are left out; :func:`read_annotations` reports them.
    """
    return sorted({r.name for r in regions if r.name and not class_map.is_known(r.name)})


def tile_targets(
    regions: Sequence[Region],
    class_map: ClassMap,
    xy_l0: np.ndarray,
    tile_l0: float,
    *,
    tissue_mask: np.ndarray | None = None,
    mask_scale: float | None = None,
    raster_scale: float | None = None,
) -> TileTargets:
    """Soft targets of tiles: the fraction of each tile covered by each target's regions.

    With ``tissue_mask`` (bool[h, w], mask_px = l0_px * ``mask_scale``), a target's value is
    area(target ∩ tissue) / area(tissue) within the tile, 0 where the tile has no tissue;
    regions are rasterised on the mask's grid. Without it the value is the covered fraction
    of the whole tile, rasterised at ``raster_scale`` (default: 16 raster pixels per tile
    side). A tile is ``excluded`` if any excluded region covers part of it.

    Parameters
    ----------
    regions
        Annotated regions (``read_annotations``).
    class_map
        Which class names feed which target, and which are ignored or excluded.
    xy_l0
        Level-0 top-left corners of the tiles, int[N, 2].
    tile_l0
        Tile side in level-0 pixels.
    tissue_mask, mask_scale
        The tissue mask and its scale (mask pixels per level-0 pixel); both or neither.
    raster_scale
        Raster pixels per level-0 pixel when there is no tissue mask.

    Returns
    -------
    TileTargets
        ``targets`` float32[N, T] in ``class_map.targets`` order, ``excluded`` bool[N], and
        the class names found but not mapped.

    Raises
    ------
    ValueError
        ``xy_l0`` is not int[N, 2], or the mask and its scale do not come together.

    Examples
    --------
    >>> regions = cscvision.read_annotations("slide.geojson")
    >>> t = cscvision.tile_targets(regions, cscvision.ClassMap(), grid.xy_l0, grid.tile_l0)
    >>> t.targets.shape  # (tiles, targets)
    """
    xy_l0 = np.asarray(xy_l0).reshape(-1, 2)
    if tissue_mask is not None:
        if mask_scale is None:
            raise ValueError(
                "tile_targets: pass mask_scale (mask px per level-0 px) with tissue_mask"
            )
        scale, shape = float(mask_scale), tissue_mask.shape
    else:
        scale = float(raster_scale or RASTER_PX_PER_TILE / tile_l0)
        extent = xy_l0.max(axis=0) + tile_l0 if len(xy_l0) else np.zeros(2)
        shape = (int(np.ceil(extent[1] * scale)) + 1, int(np.ceil(extent[0] * scale)) + 1)
    if shape[0] * shape[1] > MAX_RASTER_PX:
        raise ValueError(f"tile_targets: a {shape} raster is too large; use a coarser scale")
    unmapped = unmapped_classes(regions, class_map)
    if unmapped:
        warnings.warn(
            f"annotation classes {unmapped} are not in the class map; they count for no "
            "target (add them to mapping, ignore or exclude)",
            stacklevel=2,
        )
    tissue = tissue_mask.astype(bool) if tissue_mask is not None else None
    denominator = box_counts(tissue, scale, xy_l0, tile_l0) if tissue is not None else None
    side = max(1, round(tile_l0 * scale))
    values = np.zeros((len(xy_l0), len(class_map.targets)), dtype=np.float32)
    for j, target in enumerate(class_map.targets):
        geoms = [r.geometry for r in regions if class_map.target_of(r.name) == target]
        if not geoms:
            continue
        covered = rasterise(geoms, shape, scale)
        if tissue is not None:
            covered &= tissue
        counts = box_counts(covered, scale, xy_l0, tile_l0)
        if denominator is None:
            values[:, j] = counts / float(side * side)
        else:
            values[:, j] = np.divide(
                counts, denominator, out=np.zeros(len(counts)), where=denominator > 0
            )
    excluded_geoms = [r.geometry for r in regions if class_map.is_excluded(r.name)]
    excluded = np.zeros(len(xy_l0), dtype=bool)
    if excluded_geoms:
        excluded = box_counts(rasterise(excluded_geoms, shape, scale), scale, xy_l0, tile_l0) > 0
    return TileTargets(np.clip(values, 0, 1), excluded, unmapped)


def rasterise(
    geoms: Sequence[Polygon | MultiPolygon], shape: tuple[int, int], scale: float
) -> np.ndarray:
    """Boolean raster (``shape``) of the union of ``geoms``; raster px = level-0 px * ``scale``.

    A pixel is set when its centre lies inside (pixel ``i`` spans ``[i, i + 1)``), so
    axis-aligned edges on pixel borders are exact. Scanline fill with the even-odd rule over
    all rings of the union: holes are cleared, and a hole that another region fills stays
    filled because the union is taken first.
    """
    out = np.zeros(shape, dtype=bool)
    union = shapely.union_all(list(geoms))
    parts = [p for p in shapely.get_parts(union) if isinstance(p, Polygon) and not p.is_empty]
    if not parts:
        return out
    x0, y0, x1, y1 = (np.array(shapely.total_bounds(parts)) * scale).tolist()
    r0, r1 = _clip_span(y0, y1, shape[0])
    c0, c1 = _clip_span(x0, x1, shape[1])
    if r1 <= r0 or c1 <= c0:
        return out
    rows, cols = _crossings(shapely.get_rings(parts), scale, r0, r1)
    toggles = np.zeros((r1 - r0, c1 - c0 + 1), dtype=np.uint8)  # last column: right of box
    np.add.at(toggles, (rows - r0, np.clip(cols - c0, 0, c1 - c0)), 1)
    inside = np.cumsum(toggles, axis=1, dtype=np.uint8) & 1  # parity survives uint8 wrap
    out[r0:r1, c0:c1] = inside[:, :-1].astype(bool)
    return out


def _clip_span(lo: float, hi: float, size: int) -> tuple[int, int]:
    return max(0, int(np.floor(lo))), min(size, int(np.ceil(hi)) + 1)


def _crossings(rings: np.ndarray, scale: float, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, first column right of the crossing) for every ring edge crossing a row centre."""
    edges = []
    for ring in rings:
        xy = shapely.get_coordinates(ring) * scale
        edges.append(np.hstack([xy[:-1], xy[1:]]))
    ex0, ey0, ex1, ey1 = np.concatenate(edges).T
    lo = np.clip(np.ceil(np.minimum(ey0, ey1) - 0.5), r0, r1).astype(np.int64)
    hi = np.clip(np.ceil(np.maximum(ey0, ey1) - 0.5), r0, r1).astype(np.int64)
    n = hi - lo  # rows r with y_min <= r + 0.5 < y_max; horizontal edges give none
    edge = np.repeat(np.arange(len(n)), n)
    rows = lo[edge] + np.arange(len(edge)) - np.repeat(np.cumsum(n) - n, n)
    t = (rows + 0.5 - ey0[edge]) / (ey1[edge] - ey0[edge])
    x = ex0[edge] + t * (ex1[edge] - ex0[edge])
    return rows, np.floor(x - 0.5).astype(np.int64) + 1  # first pixel whose centre is right


def box_counts(mask: np.ndarray, scale: float, xy_l0: np.ndarray, tile_l0: float) -> np.ndarray:
    """Number of set ``mask`` pixels inside each tile, by an integral image (O(N)).

    Tiles are mapped to the mask as in :func:`cscvision.slides.tissue.tissue_fraction`. Only the
    box around the set pixels is integrated, so sparse annotations on big slides stay cheap.
    """
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return np.zeros(len(xy_l0), dtype=np.int64)
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return tile_box_counts(mask[r0:r1, c0:c1], scale, xy_l0, tile_l0, origin=(c0, r0))[0]

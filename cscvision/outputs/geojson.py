"""``<slide_id>.geojson`` for QuPath: scored tiles and region outlines.

* Every scored tile is a ``"objectType": "tile"`` feature (a level-0 square) whose
  ``properties.measurements`` is a dict ``{target: probability}``, so QuPath's
  *Measure → Show measurement maps* draws the heatmap.
* For each target, its regions (:mod:`cscvision.outputs.regions`: the scored map pixels at
  or above the target's threshold, the summary's definition) are ``"objectType":
  "annotation"`` features classified as the target (QuPath class name = target name,
  colour from the model card), one per 4-connected region, holes kept, outlines
  simplified. Measurements: ``cscvision tissue area mm2`` (the tissue-weighted area of the
  region's pixels: the regions of a target sum to the summary's ``area_mm2``; QuPath's own
  ``Area µm^2`` is left to QuPath, which would drop a duplicate) and the mean probability
  of every target inside. Where both targets are above threshold, the co-located niche is
  its own class, ``"Niche (stemness + immunosuppressive)"`` (plain ASCII, as QuPath
  class names must be).
* Every feature has a stable ``id``: a UUID derived from the slide id and the object
  (tile position; region class and first pixel), so importing a re-run's file again
  replaces objects instead of duplicating them.

Coordinates: QuPath shows a slide cropped to OpenSlide's ``bounds-x/bounds-y`` (slides
with an empty margin, e.g. MIRAX, some Leica/Hamamatsu files), so ``bounds`` (x, y) is
subtracted from every level-0 coordinate written here. For most slides it is (0, 0).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import shapely
import shapely.affinity
from scipy import ndimage
from shapely.geometry import box, mapping

from cscvision.core import palette
from cscvision.core.geometry import MapTransform
from cscvision.core.io import atomic_path
from cscvision.outputs.regions import niche_name, region_masks, tissue_weights

SIMPLIFY_PX = 0.6  # outline simplification tolerance, in map pixels
AREA_MEASUREMENT = "cscvision tissue area mm2"
_ID_NAMESPACE = uuid.UUID("5d8c3f0e-7a52-4c1e-9a51-6c7363766973")  # fixed: ids stay stable


def object_id(slide_id: str, *parts: object) -> str:
    """A UUID that depends only on the slide id and the object's description."""
    return str(uuid.uuid5(_ID_NAMESPACE, "/".join(map(str, (slide_id, *parts)))))


def target_colors(targets: Sequence[str], colors: dict) -> dict[str, tuple[int, int, int]]:
    """Colour per target from the card, else the default palette; the niche mixes the first two."""
    out: dict[str, tuple[int, int, int]] = palette.target_colors(targets, colors)
    if len(targets) >= 2:
        a, b = out[targets[0]], out[targets[1]]
        out[niche_name(targets[:2])] = tuple((x + y) // 2 for x, y in zip(a, b, strict=True))
    return out


def _run_boxes(mask: np.ndarray, row0: int, col0: int) -> list:
    """One box per horizontal run of True pixels (map pixel units)."""
    boxes = []
    padded = np.pad(mask, ((0, 0), (1, 1))).astype(np.int8)
    for r, row in enumerate(np.diff(padded, axis=1)):
        starts = np.flatnonzero(row == 1)
        ends = np.flatnonzero(row == -1)
        boxes.extend(
            box(col0 + s, row0 + r, col0 + e, row0 + r + 1)
            for s, e in zip(starts, ends, strict=True)
        )
    return boxes


def mask_polygons(mask: np.ndarray) -> tuple[list, np.ndarray]:
    """Polygons (map pixel coordinates, holes kept) of the 4-connected regions of ``mask``,
    in raster order of their first pixel, and the label image they came from."""
    labels, _ = ndimage.label(mask)
    polygons = []
    for index, window in enumerate(ndimage.find_objects(labels), start=1):
        part = labels[window] == index
        geom = shapely.union_all(_run_boxes(part, window[0].start, window[1].start))
        polygons.append(shapely.normalize(geom))
    return polygons, labels


def _to_qupath(geom, transform: MapTransform, offset: tuple[int, int]):
    """Map pixel coordinates → level-0 pixels minus the bounds offset, simplified."""
    px = transform.px_l0
    matrix = [px, 0, 0, px, transform.x0_l0 - offset[0], transform.y0_l0 - offset[1]]
    geom = shapely.affinity.affine_transform(geom, matrix)
    geom = geom.simplify(SIMPLIFY_PX * px, preserve_topology=True)
    return shapely.set_precision(geom, 0.1)


def region_features(
    maps: np.ndarray,
    tissue_map: np.ndarray,
    transform: MapTransform,
    *,
    targets: Sequence[str],
    thresholds: Sequence[float],
    colors: dict,
    cell_mm2: float,
    offset: tuple[int, int],
    slide_id: str = "",
) -> list[dict]:
    """Classified annotation features for every target's (and the niche's) regions."""
    palette = target_colors(targets, colors)
    tissue = tissue_weights(maps, tissue_map)
    features = []
    for name, mask in region_masks(maps, tissue_map, targets, thresholds).items():
        polygons, labels = mask_polygons(mask)
        if not polygons:
            continue
        index = np.arange(1, len(polygons) + 1)
        means = [ndimage.mean(np.nan_to_num(m), labels, index) for m in maps]
        areas = ndimage.sum(tissue, labels, index) * cell_mm2
        firsts = ndimage.minimum_position(-mask.astype(np.int8), labels, index)
        for k, poly in enumerate(polygons):
            geom = _to_qupath(poly, transform, offset)
            measurements = {AREA_MEASUREMENT: round(float(areas[k]), 6)}
            for target, mean in zip(targets, means, strict=True):
                measurements[f"Mean {target} probability"] = round(float(mean[k]), 4)
            feature = _feature(geom, "annotation", name, palette[name], measurements)
            features.append({"id": object_id(slide_id, "region", name, *firsts[k]), **feature})
    return features


def _feature(geom, object_type: str, class_name: str | None, rgb, measurements: dict) -> dict:
    props: dict = {"objectType": object_type}
    if class_name is not None:
        props["name"] = class_name
        props["classification"] = {"name": class_name, "color": [int(c) for c in rgb]}
        props["isLocked"] = False
    props["measurements"] = measurements
    return {"type": "Feature", "geometry": mapping(geom), "properties": props}


def tile_features(
    xy_l0: np.ndarray,
    probs: np.ndarray,
    tile_l0: float,
    targets: Sequence[str],
    offset: tuple[int, int],
    slide_id: str = "",
) -> Iterator[dict]:
    """One square ``tile`` feature per scored tile, probabilities as measurements
    (a generator: a slide's tiles are never all held as features)."""
    side = round(tile_l0)
    for (x, y), p in zip(xy_l0 - np.asarray(offset), probs, strict=True):
        x0, y0 = int(x), int(y)
        ring = [[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side], [x0, y0]]
        measurements = {t: round(float(v), 4) for t, v in zip(targets, p, strict=True)}
        yield {
            "type": "Feature",
            "id": object_id(slide_id, "tile", x0, y0),
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "tile", "measurements": measurements},
        }


def write_geojson(path: str | Path, features: Iterable[dict]) -> Path:
    """A FeatureCollection, one feature per line, streamed to a temporary file and renamed."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        f.write('{"type":"FeatureCollection","features":[')
        for i, feature in enumerate(features):
            f.write(",\n" if i else "\n")
            f.write(json.dumps(feature, ensure_ascii=False, separators=(",", ":")))
        f.write("\n]}\n")
    return Path(path)

"""Ground truth files: QuPath GeoJSON, the bit-coded label mask, the outlined thumbnail."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import shapely
from PIL import Image, ImageDraw
from shapely.geometry.base import BaseGeometry

from cscvision.core.io import atomic_path
from cscvision.synth.layout import CLASS_COLORS, REGION_CLASSES, SlideLayout
from cscvision.synth.raster import fill_exact

# Label mask bits (value = sum of the bits that apply), see cscvision.synth.
LABEL_BITS = {
    "Tissue": 1,
    "Tumor": 2,
    "Necrosis": 4,
    "Stemness-rich": 8,
    "Immunosuppressive": 16,
    "Pen mark": 32,
    "Fold": 64,
    "Out of focus": 128,
}


def annotations(layout: SlideLayout) -> dict[str, BaseGeometry]:
    """Every annotated class -> its geometry clipped to the slide (regions, then artefacts)."""
    frame = shapely.box(0, 0, layout.width_px, layout.height_px)
    named = {name: layout.regions[name] for name in REGION_CLASSES}
    named.update(layout.artefacts.named())
    return {k: shapely.intersection(v, frame) for k, v in named.items() if not v.is_empty}


def geojson(layout: SlideLayout, rng: np.random.Generator, decimals: int = 2) -> dict:
    """QuPath's GeoJSON: one annotation Feature per connected polygon, classified."""
    features = []
    for name, geom in annotations(layout).items():
        color = list(CLASS_COLORS[name])
        geom = shapely.set_precision(geom, 10.0**-decimals)  # rounded, and still valid
        for part in shapely.get_parts(geom):
            if part.geom_type != "Polygon" or part.is_empty:
                continue
            part = shapely.geometry.polygon.orient(part, 1.0)
            rings = [part.exterior, *part.interiors]
            coords = [np.round(np.asarray(r.coords), decimals).tolist() for r in rings]
            features.append(
                {
                    "type": "Feature",
                    "id": str(uuid.UUID(bytes=rng.bytes(16), version=4)),
                    "geometry": {"type": "Polygon", "coordinates": coords},
                    "properties": {
                        "objectType": "annotation",
                        "classification": {"name": name, "color": color},
                    },
                }
            )
    return {"type": "FeatureCollection", "features": features}


def label_mask(layout: SlideLayout, label_mpp: float) -> np.ndarray:
    """uint8 label mask at ``label_mpp`` µm/px; each pixel the sum of LABEL_BITS that apply."""
    px_size = label_mpp / layout.mpp
    shape = (int(np.ceil(layout.height_px / px_size)), int(np.ceil(layout.width_px / px_size)))
    out = np.zeros(shape, np.uint8)
    named = {"Tissue": layout.tissue, **annotations(layout)}
    for name, geom in named.items():
        bit = LABEL_BITS.get(name)
        if bit is not None:
            out |= fill_exact(geom, shape, px_size).astype(np.uint8) * np.uint8(bit)
    return out


def outlined_thumbnail(layout: SlideLayout, rgb: np.ndarray, downsample: float) -> np.ndarray:
    """The slide thumbnail with every annotation outlined in its class colour."""
    img = Image.fromarray(rgb)
    pen = ImageDraw.Draw(img)
    for name, geom in annotations(layout).items():
        color = CLASS_COLORS[name]
        for part in shapely.get_parts(geom):
            if part.geom_type != "Polygon":
                continue
            for ring in (part.exterior, *part.interiors):
                xy = (np.asarray(ring.coords) / downsample).ravel().tolist()
                if len(xy) >= 4:
                    pen.line(xy, fill=color, width=2)
    return np.asarray(img)


def write_geojson(path: Path, collection: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(collection, separators=(",", ":")) + "\n", encoding="utf-8")


def write_png(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", optimize=False)

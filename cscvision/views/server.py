"""``cscvision view``: a local web server for one batch's slides and heatmaps.

Slides are served as Deep Zoom tiles through :mod:`openslide.deepzoom`; each target's map
is rendered as a transparent heatmap (colour = probability, region outline at the
threshold asked for) and served as Deep Zoom tiles of its own, placed over the slide in
level-0 coordinates by the page (OpenSeadragon, vendored in ``static/openseadragon``).

Nothing in a URL reaches the filesystem: slides and targets are looked up by id in the
table built at start from ``OUT_DIR/*/summary.json``, tile addresses are integers, and
static files come from the package's own folder.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cscvision.core.errors import CscvisionError
from cscvision.core.geometry import MapTransform
from cscvision.core.palette import target_colors
from cscvision.outputs.read import read_summary_files
from cscvision.outputs.trust import OOD, OOD_SPAN, display_range, ood_banner_text

STATIC = Path(__file__).parent / "static"
TILE_PX = 254
OVERLAP = 1
MAP_RENDER_PX = 2048  # heatmap images are drawn about this wide, so outlines stay crisp
HEATMAP_ALPHA = 200  # opacity of a probability-1 pixel; lower probabilities fade out


class ViewerError(CscvisionError, ValueError):
    """The folder given holds no finished slide."""


@dataclass(frozen=True)
class SlideEntry:
    slide_id: str
    folder: Path
    slide_path: Path
    summary: dict[str, Any]

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.summary.get("targets", {}))

    def thresholded(self, target: str) -> bool:
        return self.summary["targets"][target].get("threshold") is not None

    def threshold(self, target: str) -> float:
        """Where the outline starts: the summary's threshold; a map without one (regression
        scores, MIL percentiles) starts with none (1.0, as a trust layer with no limit)."""
        got = self.summary["targets"][target].get("threshold")
        return 1.0 if got is None else float(got)


class SlideMaps:
    """One slide's maps (from ``maps.npz``) and the heatmap images drawn from them."""

    def __init__(self, entry: SlideEntry):
        with np.load(entry.folder / "maps.npz", allow_pickle=False) as npz:
            self.targets = tuple(str(t) for t in npz["targets"])
            self.maps = {t: npz[t].astype(np.float32) for t in self.targets}
            self.tissue = npz["tissue"].astype(np.float32)
            self.transform = MapTransform(*(float(v) for v in npz["transform"]))
            # trust maps (outputs.trust): raw values for the readout, drawn over their range
            self.trust = tuple(n for n in npz.files if is_trust_layer(n))
            self.raw = {n: npz[n].astype(np.float32) for n in self.trust}
        for n in self.trust:
            lo, hi, _ = display_range(n)
            self.maps[n] = np.clip((self.raw[n] - np.float32(lo)) / np.float32(hi - lo), 0, 1)
        for t in self.targets:  # a map in other units (cells/mm²) is drawn over its range
            lo, hi = entry.summary.get("targets", {}).get(t, {}).get("value_range", (0.0, 1.0))
            if (lo, hi) != (0.0, 1.0) and hi > lo:
                self.raw[t] = self.maps[t]  # the readout shows the map's own units
                self.maps[t] = (self.maps[t] - np.float32(lo)) / np.float32(hi - lo)
        self.colors = target_colors(self.targets, entry.summary.get("colors") or {})
        self.colors.update({n: TRUST_RGB[n.split("_")[0]] for n in self.trust})
        self.trust_thresholds = {n: trust_threshold(entry.summary, n) for n in self.trust}
        self._images: OrderedDict[tuple[str, float], Image.Image] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def layers(self) -> tuple[str, ...]:
        """The targets, then the trust maps (OOD, std_<t>, mi_<t>) the slide has."""
        return (*self.targets, *self.trust)

    @property
    def shape(self) -> tuple[int, int]:
        return self.tissue.shape

    @property
    def scale(self) -> int:
        """Image pixels per map pixel."""
        return max(1, MAP_RENDER_PX // max(self.shape))

    def image(self, target: str, threshold: float) -> Image.Image:
        key = (target, round(threshold, 3))
        with self._lock:
            if key in self._images:
                self._images.move_to_end(key)
                return self._images[key]
        img = heatmap_image(
            self.maps[target], self.tissue, threshold, self.colors[target], self.scale
        )
        with self._lock:
            self._images[key] = img
            while len(self._images) > 16:
                self._images.popitem(last=False)
        return img


TRUST_RGB = {OOD: (255, 0, 255), "std": (90, 90, 90), "mi": (120, 60, 160)}


def is_trust_layer(name: str) -> bool:
    return name == OOD or name.startswith(("std_", "mi_"))


def trust_threshold(summary: dict[str, Any], name: str) -> float:
    """Where a trust layer's outline starts, on its 0-1 display scale: the OOD ratio 1
    (the validation 99th percentile); a standard deviation's confidence threshold when the
    summary has one (infer --uncertainty with a card that keeps them); else no outline."""
    if name == OOD:
        return 1.0 / OOD_SPAN
    limits = (summary.get("uncertainty") or {}).get("thresholds") or {}
    if name.startswith("std_") and name[4:] in limits:
        lo, hi, _ = display_range(name)
        return float(np.clip((limits[name[4:]] - lo) / (hi - lo), 0, 1))
    return 1.0


def heatmap_image(
    prob: np.ndarray, tissue: np.ndarray, threshold: float, rgb: tuple[int, int, int], scale: int
) -> Image.Image:
    """RGBA heatmap at ``scale`` image px per map px: the target's colour with opacity
    rising with probability, transparent where no tile was scored, and the outline of the
    region at or above ``threshold`` (the summary's region definition) in black; a
    threshold of 1 or more draws none (a map or trust layer with no limit)."""
    scored = np.isfinite(prob) & (tissue > 0)
    p = np.where(scored, prob, 0.0)
    big = np.kron(p, np.ones((scale, scale), np.float32))
    inside = np.kron(scored & (p >= threshold) & (threshold < 1), np.ones((scale, scale), bool))
    alpha = (np.clip(big, 0, 1) * HEATMAP_ALPHA).astype(np.uint8)
    out = np.zeros((*big.shape, 4), np.uint8)
    out[..., :3] = rgb
    out[..., 3] = alpha
    width = max(1, scale // 24)
    edge = _outline(inside, width)
    out[edge] = (0, 0, 0, 255)
    return Image.fromarray(out, "RGBA")


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)


class Catalogue:
    """Every finished slide under ``out_dir``, by id, and their Deep Zoom generators."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir).resolve()
        self.slides: dict[str, SlideEntry] = {}
        found, self.skipped = read_summary_files(self.out_dir)
        for f in found:
            slide_path = Path(str(f.summary.get("slide_path", "")))
            self.slides[f.slide_id] = SlideEntry(f.slide_id, f.path.parent, slide_path, f.summary)
        if not self.slides:
            unread = f" ({'; '.join(self.skipped)})" if self.skipped else ""
            raise ViewerError(
                f"{self.out_dir}: no <slide_id>/summary.json that can be read{unread}; "
                "pass the --out "
                "folder of cscvision infer"
            )
        self._maps: dict[str, SlideMaps] = {}
        self._dz: dict[str, Any] = {}
        self._map_dz: OrderedDict[tuple[str, str, float], tuple[Any, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def maps(self, sid: str) -> SlideMaps:
        with self._lock:
            if sid not in self._maps:
                self._maps[sid] = SlideMaps(self.slides[sid])
            return self._maps[sid]

    def missing_slides(self) -> list[str]:
        """Ids of slides whose slide file is not where ``summary.json`` says (moved or
        deleted after inference): the viewer shows their maps alone."""
        return [sid for sid, e in self.slides.items() if not e.slide_path.is_file()]

    def slide_dz(self, sid: str) -> Any:
        """The slide's Deep Zoom generator; :class:`ViewerError` when its file cannot be
        opened (moved, deleted, unreadable)."""
        import openslide
        from openslide.deepzoom import DeepZoomGenerator

        with self._lock:
            if sid not in self._dz:
                path = self.slides[sid].slide_path
                try:
                    slide = openslide.open_slide(str(path))
                except (OSError, openslide.OpenSlideError) as e:
                    raise ViewerError(
                        f"slide file {path} of {sid!r} not found or unreadable ({e}); the "
                        "maps are shown alone"
                    ) from None
                self._dz[sid] = DeepZoomGenerator(slide, TILE_PX, OVERLAP, limit_bounds=False)
            return self._dz[sid]

    def map_dz(self, sid: str, target: str, threshold: float) -> tuple[Any, Any]:
        """The heatmap's Deep Zoom generator and the image slide it reads (kept for the
        recent thresholds: every tile of a layer asks for the same one)."""
        from openslide import ImageSlide
        from openslide.deepzoom import DeepZoomGenerator

        key = (sid, target, round(threshold, 3))
        with self._lock:
            if key in self._map_dz:
                self._map_dz.move_to_end(key)
                return self._map_dz[key]
        source = ImageSlide(self.maps(sid).image(target, threshold))
        layer = DeepZoomGenerator(source, TILE_PX, OVERLAP), source
        with self._lock:
            self._map_dz[key] = layer
            while len(self._map_dz) > 32:
                self._map_dz.popitem(last=False)
        return layer

    def describe(self, sid: str) -> dict[str, Any]:
        entry, maps = self.slides[sid], self.maps(sid)
        rows, cols = maps.shape
        t = maps.transform
        return {
            "slide_id": sid,
            "slide_found": entry.slide_path.is_file(),
            "dimensions": entry.summary.get("dimensions"),
            "mpp": entry.summary.get("resolution", {}).get("slide_mpp"),
            "warning": ood_banner_text(entry.summary),  # an OOD slide's banner, or None
            "targets": [
                {
                    "name": name,
                    "threshold": entry.threshold(name),
                    "thresholded": entry.thresholded(name),
                    "unit": entry.summary["targets"][name].get("unit", ""),
                    # the span the map is drawn over; its slider runs over it as 0-1
                    "value_range": entry.summary["targets"][name].get("value_range"),
                    "color": "#" + "".join(f"{c:02x}" for c in maps.colors[name]),
                    "values": _json_grid(maps.raw.get(name, maps.maps[name])),
                }
                for name in maps.targets
            ]
            + [
                {
                    "name": name,
                    "trust": True,  # hidden until switched on; the readout shows raw values
                    "unit": display_range(name)[2],
                    "threshold": maps.trust_thresholds[name],
                    "color": "#" + "".join(f"{c:02x}" for c in maps.colors[name]),
                    "values": _json_grid(maps.raw[name]),
                }
                for name in maps.trust
            ],
            "map": {
                "rows": rows,
                "cols": cols,
                "x0_l0": t.x0_l0,
                "y0_l0": t.y0_l0,
                "px_l0": t.px_l0,
                "scale": maps.scale,
            },
        }


def _json_grid(values: np.ndarray) -> list[list[float | None]]:
    return [[None if not math.isfinite(v) else round(float(v), 4) for v in row] for row in values]


def map_tile(dz: Any, source: Any, level: int, col: int, row: int) -> Image.Image:
    """A Deep Zoom tile of a heatmap with its transparency kept (``get_tile`` would
    composite it onto a solid background)."""
    location, slide_level, size = dz.get_tile_coordinates(level, (col, row))
    tile = source.read_region(location, slide_level, size)
    target = dz.get_tile_dimensions(level, (col, row))
    if tile.size != target:
        tile = tile.resize(target, Image.Resampling.BILINEAR)
    return tile


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=85)
    return buf.getvalue()

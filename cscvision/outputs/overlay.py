"""``overlay_<target>.png``: the slide thumbnail with one target's heatmap, drawn with PIL.

The heatmap (viridis, 0-1) is alpha-blended over tissue only, where tiles were scored;
the target's region (the map pixels at or above its threshold: the definition the summary
and the GeoJSON use) is outlined in the target's colour. A title, a
colour bar with 0-1 ticks (threshold marked) and a legend frame the image.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from cscvision.core.geometry import sample_map

# matplotlib's viridis at 0, 0.1, ..., 1 (perceptually uniform, colour-blind safe).
VIRIDIS = np.array(
    [
        (68, 1, 84), (72, 36, 117), (65, 68, 135), (53, 95, 141), (42, 120, 142),
        (33, 145, 140), (34, 168, 132), (68, 191, 112), (122, 209, 81), (189, 223, 38),
        (253, 231, 37),
    ],
    np.float32,
)  # fmt: skip
HEAT_ALPHA = 0.7
MIN_LONG_PX, MAX_LONG_PX = 640, 1600  # displayed slide size, longest side
PAD = 16
BAR_W = 18


def colormap(values: np.ndarray) -> np.ndarray:
    """Viridis colours uint8[..., 3] for values in [0, 1] (NaN → 0)."""
    v = np.clip(np.nan_to_num(values, nan=0.0), 0, 1) * (len(VIRIDIS) - 1)
    lo = np.floor(v).astype(np.int64).clip(0, len(VIRIDIS) - 2)
    frac = (v - lo)[..., None]
    rgb = VIRIDIS[lo] * (1 - frac) + VIRIDIS[lo + 1] * frac
    return np.round(rgb).astype(np.uint8)


# Pillow's built-in font lacks these glyphs; used only when DejaVu Sans is not installed.
_ASCII = {"—": "-", "µ": "u", "≥": ">=", "∩": "&", "·": "|"}


@functools.cache
def _font_pair(size: int) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, bool]:
    """DejaVu Sans where the system has it (full Unicode), else Pillow's built-in font."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size), True
    except OSError:
        return ImageFont.load_default(size=size), False


def _font_and_text(text: str, size: int):
    """The font of ``size`` and ``text`` as it can draw it (ASCII stand-ins without Unicode)."""
    font, unicode_ok = _font_pair(size)
    return font, text if unicode_ok else "".join(_ASCII.get(ch, ch) for ch in text)


def _text(draw: ImageDraw.ImageDraw, xy, text: str, size: int, fill, **kw) -> None:
    font, text = _font_and_text(text, size)
    draw.text(xy, text, fill=fill, font=font, **kw)


def _text_width(text: str, size: int) -> int:
    font, text = _font_and_text(text, size)
    return math.ceil(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=font))


def _display_size(dimensions: tuple[int, int], thumb_shape: tuple[int, ...]) -> tuple[int, int]:
    w, h = dimensions
    long_px = min(MAX_LONG_PX, max(MIN_LONG_PX, max(thumb_shape[:2])))
    step_l0 = max(w, h) / long_px
    return max(1, math.ceil(w / step_l0)), max(1, math.ceil(h / step_l0))


def heat_image(
    thumb: np.ndarray,
    mask: np.ndarray,
    prob_map: np.ndarray,
    transform,
    dimensions: tuple[int, int],
    *,
    region: np.ndarray,
    contour_rgb: tuple[int, int, int],
) -> np.ndarray:
    """The thumbnail at display size with the heatmap over tissue and the outline of the
    target's ``region`` (bool map pixels: :func:`cscvision.outputs.regions.region_masks`)."""
    dw, dh = _display_size(dimensions, thumb.shape)
    step_x, step_y = dimensions[0] / dw, dimensions[1] / dh
    base = np.asarray(Image.fromarray(thumb).resize((dw, dh), Image.Resampling.BILINEAR))
    tissue = np.asarray(
        Image.fromarray(mask.astype(np.uint8) * 255).resize((dw, dh), Image.Resampling.NEAREST)
    )
    x_l0 = (np.arange(dw) + 0.5) * step_x
    y_l0 = (np.arange(dh) + 0.5) * step_y
    value = sample_map(prob_map[None], transform, x_l0, y_l0)[0]
    shown = np.isfinite(value) & (tissue > 0)
    out = base.astype(np.float32)
    heat = colormap(value).astype(np.float32)
    out[shown] = out[shown] * (1 - HEAT_ALPHA) + heat[shown] * HEAT_ALPHA
    above = _region_at(region, transform, x_l0, y_l0)
    edge = above & ~ndimage.binary_erosion(above, border_value=0)
    core = ndimage.binary_dilation(edge, iterations=max(1, round(max(dw, dh) / 600)))
    halo = ndimage.binary_dilation(core) & ~core  # a white rim keeps the line visible
    out[halo] = (255, 255, 255)
    out[core] = contour_rgb
    return np.round(out).astype(np.uint8)


def _region_at(region: np.ndarray, transform, x_l0: np.ndarray, y_l0: np.ndarray) -> np.ndarray:
    """``region`` looked up (nearest map pixel) at the display lattice's level-0 points."""
    col, row = transform.to_map(x_l0, y_l0)
    col, row = np.floor(col).astype(np.int64), np.floor(row).astype(np.int64)
    rows, cols = region.shape
    ok_c, ok_r = (col >= 0) & (col < cols), (row >= 0) & (row < rows)
    looked = region[np.clip(row, 0, rows - 1)[:, None], np.clip(col, 0, cols - 1)[None, :]]
    return looked & ok_r[:, None] & ok_c[None, :]


def tick_label(value: float) -> str:
    """A colour-bar value as a reader writes it: 0.25, 7,500, 10,000 (not 7.5e+03)."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def _colour_bar(
    draw: ImageDraw.ImageDraw,
    x: int,
    y: int,
    height: int,
    threshold: float | None,
    rgb,
    value_range: tuple[float, float] = (0.0, 1.0),
    unit: str = "probability",
):
    for k in range(height):
        colour = tuple(int(c) for c in colormap(np.array(1 - k / max(1, height - 1))))
        draw.line([(x, y + k), (x + BAR_W, y + k)], fill=colour)
    draw.rectangle([x, y, x + BAR_W, y + height], outline=(60, 60, 60))
    lo, hi = value_range
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        ty = y + round((1 - tick) * (height - 1))
        draw.line([(x + BAR_W, ty), (x + BAR_W + 4, ty)], fill=(40, 40, 40))
        _text(draw, (x + BAR_W + 7, ty), tick_label(lo + tick * (hi - lo)), 13, (30, 30, 30),
              anchor="lm")  # fmt: skip
    if threshold is not None:
        ty = y + round((1 - threshold) * (height - 1))
        draw.line([(x - 4, ty), (x + BAR_W + 4, ty)], fill=rgb, width=3)
    _text(draw, (x, y - 8), unit, 13, (30, 30, 30), anchor="ld")


def _legend(draw: ImageDraw.ImageDraw, x: int, y: int, items: list[tuple[str, str, tuple]]):
    for kind, text, rgb in items:
        if kind == "line":
            draw.line([(x, y + 8), (x + 26, y + 8)], fill=rgb, width=3)
        elif kind == "ramp":
            for k in range(27):
                colour = tuple(int(c) for c in colormap(np.array(k / 26)))
                draw.line([(x + k, y + 2), (x + k, y + 14)], fill=colour)
            draw.rectangle([x, y + 2, x + 26, y + 14], outline=(60, 60, 60))
        else:
            draw.rectangle([x, y + 2, x + 26, y + 14], fill=rgb, outline=(60, 60, 60))
        _text(draw, (x + 34, y + 8), text, 14, (30, 30, 30), anchor="lm")
        y += 22


def render_overlay(
    heat: np.ndarray,
    *,
    title: str,
    subtitle: str,
    target: str,
    threshold: float | None,
    contour_rgb: tuple[int, int, int],
    min_tissue: float,
    value_range: tuple[float, float] = (0.0, 1.0),
    unit: str = "probability",
    threshold_label: str | None = None,
) -> np.ndarray:
    """Frame ``heat`` (from :func:`heat_image`) with title, colour bar and legend; the bar's
    ticks span ``value_range`` in ``unit`` (a regression target's scores); ``threshold``
    is the outline's place on the bar (0-1), ``threshold_label`` its legend line."""
    dh, dw = heat.shape[:2]
    top, bottom = 64, 84
    right = max(110, 24 + _text_width(unit, 13) + 8)  # the colour bar's unit label fits
    canvas = Image.new("RGB", (PAD + dw + right, top + dh + bottom), (255, 255, 255))
    canvas.paste(Image.fromarray(heat), (PAD, top))
    draw = ImageDraw.Draw(canvas)
    _text(draw, (PAD, 12), title, 22, (0, 0, 0))
    _text(draw, (PAD, 40), subtitle, 13, (80, 80, 80))
    draw.rectangle([PAD - 1, top - 1, PAD + dw, top + dh], outline=(150, 150, 150))
    bar_h = min(dh - 30, 320) if dh > 80 else max(40, dh)
    _colour_bar(draw, PAD + dw + 24, top + 24, bar_h, threshold, contour_rgb, value_range, unit)
    items = [
        ("ramp", f"{target} {unit}, on tissue tiles (≥ {min_tissue:.0%} tissue)", None),
        ("box", "no heatmap: glass, or tissue not scored", (235, 235, 235)),
    ]
    if threshold is not None:
        label = threshold_label or f"{target} ≥ {threshold:.2f} (threshold outline)"
        items.insert(0, ("line", label, contour_rgb))
    _legend(draw, PAD, top + dh + 12, items)
    return np.asarray(canvas)

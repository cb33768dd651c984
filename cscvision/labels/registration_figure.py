"""The registration QC picture of one H&E / IHC pair, on the H&E frame (numpy + Pillow).

Three parts, top to bottom:

- a **header** whose band colour is the verdict (green ``pass``, amber ``warn``, red
  ``refused``): the pair's title, the verdict and its reason, the estimated error (median,
  p90 of the held-out matches, µm) and the exclusion bound ``--max-local-error-um``;
- left, the **checkerboard** of the H&E thumbnail and the registered IHC (squares
  alternate), the IHC tissue edge in green: a good registration continues every structure
  across the squares' borders;
- right, the **estimated local error** (:func:`~cscvision.labels.registration_qc.
  local_error_grid`, the node nearest each pixel) over the greyed H&E tissue: a colour
  ramp from 0 to ``--max-local-error-um`` (its colour bar below, in µm), red above it
  (those tiles get ``valid = 0``); tissue without a held-out match near it
  (*unmeasured*) is hatched grey, orange where its extrapolated error (the QC's second
  rule) is above ``--qc-p90-um``, and red where ``labels ihc`` excludes it
  (:func:`~cscvision.labels.registration_qc.registration_exclusions`: the same rule,
  at each pixel instead of a tile centre).

``fixed`` and ``moving`` are registration levels (``Level``: ``rgb``, ``mask``, ``mpp``) and
``reg`` a ``Registration`` of :mod:`cscvision.labels.registration`, which imports this
module (so they go untyped here, as in :mod:`~cscvision.labels.registration_qc`).
"""

from __future__ import annotations

from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from cscvision.labels.registration_match import warp_all_to_fixed
from cscvision.labels.registration_qc import (
    extrapolated_of,
    local_error_at,
    registration_exclusions,
)

PANEL_PX = 460  # longest side of each panel
GAP_PX = 16
WIDTH_PX = 2 * PANEL_PX + 3 * GAP_PX
LINE_PX = 22  # header line height
VERDICT_RGB = {"pass": (200, 235, 200), "warn": (255, 204, 128), "refused": (245, 160, 160)}
OVER_RGB = (215, 25, 28)  # local error above --max-local-error-um: excluded
UNMEASURED_RGB = (110, 110, 110)
FAR_RGB = (235, 130, 0)  # unmeasured, extrapolated above --qc-p90-um: what the warning counts
EDGE_RGB = (0, 200, 0)
# viridis at 0, 1/4, 1/2, 3/4, 1: 0 µm (dark) to --max-local-error-um (yellow)
RAMP = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)])
HATCH_PX = 7  # period of the diagonal hatching
ALPHA = 0.7  # opacity of the error colours over the greyed tissue


def error_colours(error_um: np.ndarray, bound_um: float) -> np.ndarray:
    """uint8 RGB [..., 3] of local errors (µm): the ramp from 0 to ``bound_um``,
    :data:`OVER_RGB` above it; NaN (unmeasured) reads as 0 (callers hatch it)."""
    e = np.nan_to_num(np.asarray(error_um, np.float64), nan=0.0)
    t = np.clip(e / bound_um, 0, 1) * (len(RAMP) - 1)
    lo = np.minimum(t.astype(int), len(RAMP) - 2)
    frac = (t - lo)[..., None]
    out = RAMP[lo] * (1 - frac) + RAMP[lo + 1] * frac
    out[e > bound_um] = OVER_RGB
    return np.round(out).astype(np.uint8)


def panel_shape(fixed_shape: tuple[int, int], side_px: int = PANEL_PX) -> tuple[int, int]:
    """(rows, cols) of a panel showing a thumbnail of ``fixed_shape``, longest side
    ``side_px``."""
    h, w = fixed_shape
    scale = side_px / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def pixel_centres_um(shape: tuple[int, int], extent_um: tuple[float, float]) -> np.ndarray:
    """Fixed level-0 µm [rows * cols, 2] (x, y) of the centres of a panel's pixels, the
    panel covering ``extent_um`` = (width, height) of the thumbnail."""
    rows, cols = shape
    yy, xx = np.mgrid[0:rows, 0:cols]
    sx, sy = extent_um[0] / cols, extent_um[1] / rows
    return np.stack([(xx.ravel() + 0.5) * sx, (yy.ravel() + 0.5) * sy], 1)


def _resize(rgb: np.ndarray, shape: tuple[int, int], nearest: bool = False) -> np.ndarray:
    img = Image.fromarray(np.ascontiguousarray(rgb))
    mode = Image.Resampling.NEAREST if nearest else Image.Resampling.LANCZOS
    return np.asarray(img.resize((shape[1], shape[0]), mode))


def _hatch(shape: tuple[int, int]) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (xx + yy) % HATCH_PX < 2


def error_panel(fixed, reg, shape: tuple[int, int]) -> np.ndarray:
    """uint8 RGB [rows, cols, 3]: the H&E thumbnail (``fixed``: a registration level) in
    grey, its tissue coloured by the local error of ``reg`` (:func:`error_colours`),
    unmeasured tissue hatched (red where excluded), glass white."""
    extent = (fixed.mask.shape[1] * fixed.mpp, fixed.mask.shape[0] * fixed.mpp)
    xy = pixel_centres_um(shape, extent)
    bound = float(reg.params.get("max_local_error_um", 20.0))
    err = local_error_at(reg.error_detail.get("local"), xy).reshape(shape)
    over, far = (a.reshape(shape) for a in registration_exclusions(reg, xy))
    tissue = _resize(fixed.mask.astype(np.uint8) * 255, shape, nearest=True) > 127
    grey = _resize(fixed.rgb.astype(np.uint8), shape).astype(np.float64).mean(-1)
    base = np.repeat((160 + 0.37 * grey)[..., None], 3, -1)  # pale, under the colours
    out = np.where(tissue[..., None], base, 255.0)
    measured = tissue & np.isfinite(err)
    colours = error_colours(err, bound).astype(np.float64)
    if not reg.ok:  # a refused pair gives no labels: no colour says "excluded" on it
        colours[:] = colours.mean(-1, keepdims=True)
    out[measured] = ALPHA * colours[measured] + (1 - ALPHA) * out[measured]
    hatch = tissue & ~np.isfinite(err) & _hatch(shape)
    out[hatch] = UNMEASURED_RGB
    qc_um = float(reg.params.get("qc_p90_um", 10.0))
    out[hatch & (extrapolated_of(reg, xy).reshape(shape) > qc_um)] = FAR_RGB
    out[hatch & (far | over)] = OVER_RGB
    return np.round(out).astype(np.uint8)


def checkerboard(fixed, moving, reg, shape: tuple[int, int], squares: int = 8) -> np.ndarray:
    """uint8 RGB [rows, cols, 3]: H&E and the registered IHC in alternating squares, the
    registered IHC tissue edge in green (``fixed``, ``moving``: registration levels)."""
    channels = [moving.rgb[..., i].astype(np.float32) for i in range(3)]
    ones, mask = np.ones(moving.mask.shape, np.float32), moving.mask.astype(np.float32)
    *rgb, inside, mask = warp_all_to_fixed([*channels, ones, mask], moving.mpp,
                                           fixed.mask.shape, fixed.mpp, reg.map_um)  # fmt: skip
    warped = np.stack(rgb, axis=-1)
    warped[inside < 0.5] = 255
    mask = mask > 0.5
    he = _resize(fixed.rgb.astype(np.uint8), shape)
    ihc = _resize(np.clip(warped, 0, 255).astype(np.uint8), shape)
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    side = max(8, max(shape) // squares)
    board = ((rows // side + cols // side) % 2).astype(bool)
    out = np.where(board[..., None], ihc, he)
    big = _resize(mask.astype(np.uint8) * 255, shape, nearest=True) > 127
    out[big ^ ndimage.binary_erosion(big, iterations=2)] = EDGE_RGB
    return out


@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:  # DejaVu has µ; Pillow's own font does not (text() writes u then)
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], s: str, size: int = 14,
         fill=(0, 0, 0)) -> None:  # fmt: skip
    font = _font(size)
    if "DejaVu" not in str(getattr(font, "path", "")):
        s = s.replace("µ", "u")
    draw.text(xy, s, font=font, fill=fill)


def wrap(s: str, width_px: int, size: int = 14) -> list[str]:
    """``s`` in lines no wider than ``width_px`` in :func:`text`'s font."""
    font, lines, line = _font(size), [], ""
    for word in s.split():
        trial = f"{line} {word}".strip()
        if line and font.getlength(trial) > width_px:
            lines.append(line)
            trial = word
        while len(trial) > 1 and font.getlength(trial) > width_px:  # a word wider than a line
            cut = next(k for k in range(len(trial) - 1, 0, -1)
                       if k == 1 or font.getlength(trial[:k]) <= width_px)  # fmt: skip
            lines.append(trial[:cut])
            trial = trial[cut:]
        line = trial
    return lines + ([line] if line else [])


def verdict_of(reg) -> str:
    """``"pass"``, ``"warn"`` or ``"refused"``."""
    return "refused" if not reg.ok else (reg.qc or "pass")


def header_lines(reg, title: str, width_px: int) -> list[tuple[str, int]]:
    """(line, font size) of the header: title and verdict, the reason, the estimate."""
    state = verdict_of(reg)
    head = "".join(c if c.isprintable() else " " for c in f"{title}   {state.upper()}")
    fits = _font(18).getlength(head) <= width_px  # else wrapped: the verdict stays in view
    lines = [(line, 18) for line in ([head] if fits else wrap(head, width_px, 18))]
    why = reg.reason if state == "refused" else reg.qc_reason
    lines += [(line, 14) for line in wrap(why, width_px)]
    e = reg.error_um
    med, p90 = (f"{e[k]:.1f} µm" if e.get(k) is not None else "n/a" for k in ("median", "p90"))
    bound = float(reg.params.get("max_local_error_um", 20.0))
    estimate = f"estimated error (held-out matches): median {med}, p90 {p90};"
    rule = f"tiles with a local error > {bound:g} µm (--max-local-error-um) get valid = 0"
    if state == "refused":
        rule = "refused: no labels from this pair"
    lines.append((f"{estimate} {rule}", 14))
    far = reg.error_detail.get("extrapolated") or {}
    if "unmeasured_share" in far:
        lines.append((f"unmeasured tissue (no held-out match near it): "
                      f"{far['unmeasured_share']:.0%} of the shared tissue", 14))  # fmt: skip
    return lines


def _colour_bar(draw: ImageDraw.ImageDraw, x: int, y: int, bound: float) -> None:
    bar_w, bar_h = 300, 14
    ramp = error_colours(np.linspace(0, bound, bar_w), bound)
    for i, rgb in enumerate(ramp):
        draw.line([(x + i, y), (x + i, y + bar_h)], fill=tuple(int(v) for v in rgb))
    draw.rectangle([x + bar_w + 6, y, x + bar_w + 36, y + bar_h], fill=OVER_RGB)
    for k in range(5):
        tx = x + round(k * (bar_w - 1) / 4)
        draw.line([(tx, y + bar_h), (tx, y + bar_h + 4)], fill=(0, 0, 0))
        text(draw, (tx - 6, y + bar_h + 5), f"{k * bound / 4:g}", 12)
    text(draw, (x + bar_w + 40, y), f"> {bound:g} µm: excluded", 12)
    text(draw, (x, y + bar_h + 20), "estimated local error, µm (--max-local-error-um "
         f"{bound:g}: the bar's end)", 12)  # fmt: skip


def _hatch_legend(canvas: Image.Image, x: int, y: int, reg) -> None:
    draw = ImageDraw.Draw(canvas)
    bound = float(reg.params.get("max_local_error_um", 20.0))
    qc_um = float(reg.params.get("qc_p90_um", 10.0))
    radius = (reg.error_detail.get("local") or {}).get("radius_um")
    near = f"within {radius:g} µm" if radius else "near it"
    entries = [
        (UNMEASURED_RGB, f"unmeasured tissue: no held-out match {near}"),
        (FAR_RGB, f"... extrapolated error > {qc_um:g} µm (--qc-p90-um; the QC warning counts it)"),
        (OVER_RGB, f"... excluded (extrapolated > {bound:g} µm on a warned pair)"),
    ]
    for i, (rgb, label) in enumerate(entries):
        swatch = np.full((14, 30, 3), 255, np.uint8)
        swatch[_hatch((14, 30))] = rgb
        canvas.paste(Image.fromarray(swatch), (x, y + 20 * i))
        text(draw, (x + 36, y + 20 * i), label, 12)


def layout(n_lines: int, fixed_shape: tuple[int, int]) -> tuple[int, int, int, tuple[int, int]]:
    """Where :func:`qc_figure` draws: the header's height, the panels' top row, the
    error panel's left column, and the panels' (rows, cols)."""
    head = 12 + n_lines * LINE_PX
    return head, head + GAP_PX + 20, 2 * GAP_PX + PANEL_PX, panel_shape(fixed_shape)


def qc_figure(fixed, moving, reg, title: str = "") -> np.ndarray:
    """The QC picture (module docstring) of ``reg``, drawn from the registration levels
    ``fixed`` (H&E) and ``moving`` (IHC); ``title`` names the pair (default: the files)."""
    from pathlib import Path

    title = title or f"{Path(reg.moving_path).name} onto {Path(reg.fixed_path).name}"
    lines = header_lines(reg, title, WIDTH_PX - 2 * GAP_PX)
    head, top, right, shape = layout(len(lines), fixed.mask.shape)
    canvas = Image.new("RGB", (WIDTH_PX, top + shape[0] + 75), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([0, 0, WIDTH_PX, head], fill=VERDICT_RGB[verdict_of(reg)])
    for i, (line, size) in enumerate(lines):
        text(draw, (GAP_PX, 8 + i * LINE_PX), line, size)
    text(draw, (GAP_PX, top - 20), "H&E | registered IHC, alternating; green: IHC tissue edge", 13)
    caption = "estimated local error on the H&E tissue" + (
        "" if reg.ok else " (refused: grey, no labels)"
    )
    text(draw, (right, top - 20), caption, 13)
    canvas.paste(Image.fromarray(checkerboard(fixed, moving, reg, shape)), (GAP_PX, top))
    canvas.paste(Image.fromarray(error_panel(fixed, reg, shape)), (right, top))
    _colour_bar(draw, right, top + shape[0] + 10, float(reg.params.get("max_local_error_um", 20.0)))
    _hatch_legend(canvas, GAP_PX, top + shape[0] + 10, reg)
    return np.asarray(canvas)

"""Cells and nuclei: what each tissue class is made of, and sprite banks to stamp them.

Each population (stemness-rich tumour cells, bulk tumour cells, lymphocytes, macrophages,
fibroblasts, necrotic debris, ghost nuclei) lives on its own fixed grid: one candidate
per grid cell, jittered, kept with a probability set by the tissue class under it. A
candidate's position, shape variant and fate come from a hash of its cell index, so
nuclei are seamless across tile borders. Shapes come from a per-slide bank of
pre-rendered sprites (optical density arrays, blurred with the slide's focus).

Morphology at 0.5 µm/px, the differences a CNN sees at 224 px:
- stemness-rich: packed small round dark nuclei (Ø 6-7.5 µm), scant basophilic cytoplasm;
- bulk tumour: larger pleomorphic vesicular nuclei (9-16 µm) with nucleoli, in sheets or
  around gland lumens, more eosinophilic cytoplasm;
- immunosuppressive: loose stroma with small very dark lymphocytes (Ø 4.5-6 µm) and
  large macrophages with pale foamy cytoplasm;
- stroma: collagen fibres with sparse spindle fibroblasts and vessels;
- necrosis: smudgy eosin, karyorrhectic debris, pale ghost nuclei.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# Render classes: what the renderer draws at a pixel (from the truth bits).
GLASS, STROMA, TUMOUR, STEM, IMMUNO, NICHE, NECROSIS = range(7)
N_RENDER_CLASSES = 7


@dataclass(frozen=True)
class NucleusStyle:
    """Shape and stain of one kind of nucleus (sizes in µm)."""

    radius_um: tuple[float, float]  # semi-major axis
    aspect: tuple[float, float]  # major / minor
    od: tuple[float, float]  # haematoxylin optical density
    chromatin: float = 0.25  # texture amplitude
    grain_um: float = 0.6
    rim: float = 0.0  # vesicular: dark membrane, pale centre
    nucleoli: float = 0.0  # probability of a nucleolus
    irregular: float = 0.04  # outline harmonics amplitude
    ring: bool = False  # ghost nucleus: faint outline only
    bend: float = 0.0  # spindle curvature
    fragments: int = 1  # debris: pieces per sprite


@dataclass(frozen=True)
class CytoplasmStyle:
    """A cell body stamped under its nucleus (macrophages)."""

    radius_um: tuple[float, float]
    e_od: float  # eosin OD of the cytoplasm
    h_od: float
    foam: int  # vacuoles per cell
    offset: float = 0.45  # nucleus eccentricity, fraction of the cell radius


@dataclass(frozen=True)
class Population:
    """One cell population on its own grid; ``keep[c]`` is the probability in render class c."""

    name: str
    stream: int
    cell_um: float
    jitter: float
    keep: tuple[float, ...]
    nucleus: NucleusStyle
    cytoplasm: CytoplasmStyle | None = None


def _keep(**by_class: float) -> tuple[float, ...]:
    names = ("glass", "stroma", "tumour", "stem", "immuno", "niche", "necrosis")
    return tuple(float(by_class.get(n, 0.0)) for n in names)


POPULATIONS: tuple[Population, ...] = (
    Population(
        name="stem",
        stream=11,
        cell_um=8.6,
        jitter=0.9,
        keep=_keep(stem=0.97, niche=0.62),
        nucleus=NucleusStyle(
            radius_um=(3.0, 3.8), aspect=(1.0, 1.25), od=(0.9, 1.15),
            chromatin=0.22, grain_um=0.5, nucleoli=0.15, irregular=0.04,
        ),
    ),
    Population(
        name="tumour",
        stream=12,
        cell_um=14.5,
        jitter=0.85,
        keep=_keep(tumour=0.93),
        nucleus=NucleusStyle(
            radius_um=(4.6, 8.0), aspect=(1.1, 1.7), od=(0.85, 1.1),
            chromatin=0.45, grain_um=0.9, rim=0.4, nucleoli=0.75, irregular=0.12,
        ),
    ),
    Population(
        name="lymphocyte",
        stream=13,
        cell_um=9.5,
        jitter=0.9,
        keep=_keep(stroma=0.015, tumour=0.02, immuno=0.6, niche=0.3),
        nucleus=NucleusStyle(
            radius_um=(2.2, 2.9), aspect=(1.0, 1.15), od=(1.15, 1.45),
            chromatin=0.3, grain_um=0.7, irregular=0.05,
        ),
    ),
    Population(
        name="macrophage",
        stream=14,
        cell_um=30.0,
        jitter=0.6,
        keep=_keep(stroma=0.03, immuno=0.55, niche=0.45),
        nucleus=NucleusStyle(
            radius_um=(3.2, 4.2), aspect=(1.2, 1.6), od=(0.55, 0.75),
            chromatin=0.3, grain_um=0.8, rim=0.2, nucleoli=0.2, irregular=0.15,
        ),
        cytoplasm=CytoplasmStyle(radius_um=(9.0, 12.5), e_od=0.14, h_od=0.05, foam=9),
    ),
    Population(
        name="fibroblast",
        stream=15,
        cell_um=22.0,
        jitter=0.9,
        keep=_keep(stroma=0.5, immuno=0.22, tumour=0.03, niche=0.1),
        nucleus=NucleusStyle(
            radius_um=(6.0, 9.5), aspect=(4.0, 6.5), od=(0.7, 0.95),
            chromatin=0.2, grain_um=0.6, irregular=0.02, bend=0.08,
        ),
    ),
    Population(
        name="debris",
        stream=16,
        cell_um=6.0,
        jitter=0.9,
        keep=_keep(necrosis=0.3),
        nucleus=NucleusStyle(
            radius_um=(0.5, 1.3), aspect=(1.0, 1.8), od=(1.1, 1.6),
            chromatin=0.2, grain_um=0.4, irregular=0.2, fragments=3,
        ),
    ),
    Population(
        name="ghost",
        stream=17,
        cell_um=13.0,
        jitter=0.8,
        keep=_keep(necrosis=0.55),
        nucleus=NucleusStyle(
            radius_um=(3.5, 5.5), aspect=(1.0, 1.4), od=(0.18, 0.3),
            chromatin=0.2, grain_um=0.8, irregular=0.08, ring=True,
        ),
    ),
)  # fmt: skip


@dataclass(frozen=True)
class SpriteBank:
    """Pre-rendered variants of one population: OD arrays [n, s, s] centred at s // 2."""

    nucleus_h: np.ndarray
    cyto_alpha: np.ndarray | None = None
    cyto_e: np.ndarray | None = None

    @property
    def size_px(self) -> int:
        return self.nucleus_h.shape[-1]


def _grid(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return np.broadcast_to(xx - c, (n, size, size)), np.broadcast_to(yy - c, (n, size, size))


def _texture(rng: np.random.Generator, shape: tuple[int, int, int], grain_px: float) -> np.ndarray:
    tex = ndimage.gaussian_filter(
        rng.standard_normal(shape).astype(np.float32), (0, grain_px, grain_px)
    )
    return tex / (tex.std(axis=(1, 2), keepdims=True) + 1e-6)


def _outline_radius(
    rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, style: NucleusStyle, mpp: float
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised radius (1 at the outline) and semi-minor axis (px) for each variant."""
    n = xx.shape[0]
    a = rng.uniform(*style.radius_um, n) / mpp
    b = a / rng.uniform(*style.aspect, n)
    theta = rng.uniform(0, np.pi, n)
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    u = xx * cos + yy * sin
    v = -xx * sin + yy * cos
    v = v - style.bend * (u**2) / a[:, None, None] * rng.choice([-1, 1], n)[:, None, None]
    r = np.sqrt((u / a[:, None, None]) ** 2 + (v / b[:, None, None]) ** 2)
    phi = np.arctan2(v, u)
    wobble = np.ones_like(r)
    for k in (2, 3, 5):
        amp = style.irregular * rng.uniform(0, 1, n)[:, None, None] / (k - 1)
        wobble += amp * np.cos(k * phi + rng.uniform(0, 2 * np.pi, n)[:, None, None])
    return r / wobble, b


def nucleus_sprites(
    rng: np.random.Generator, style: NucleusStyle, *, n: int, mpp: float, blur_px: float
) -> np.ndarray:
    """``n`` nucleus variants: haematoxylin OD [n, s, s]."""
    size = int(2 * np.ceil(style.radius_um[1] / mpp * (1 + style.bend) + 3 * blur_px + 2)) + 1
    xx, yy = _grid(n, size)
    od = np.zeros((n, size, size), np.float32)
    for _ in range(style.fragments):
        dx, dy = (rng.uniform(-1.5, 1.5, (2, n, 1, 1)) / mpp) if style.fragments > 1 else (0, 0)
        r, b = _outline_radius(rng, xx - dx, yy - dy, style, mpp)
        edge = np.clip((1.0 - r) * b[:, None, None] + 0.5, 0.0, 1.0)
        base = rng.uniform(*style.od, n)[:, None, None]
        tex = _texture(rng, od.shape, style.grain_um / mpp)
        if style.ring:
            shell = np.exp(-(((r - 0.85) / 0.18) ** 2))
            piece = base * shell * (1 + style.chromatin * tex)
        else:
            profile = 1.0 - style.rim + style.rim * np.clip((r - 0.45) / 0.45, 0, 1) ** 2 * 1.6
            piece = edge * base * profile * (1 + style.chromatin * tex)
        od = np.maximum(od, piece)
    if style.nucleoli > 0:
        has = rng.uniform(0, 1, n) < style.nucleoli
        cx, cy = rng.uniform(-0.25, 0.25, (2, n)) * style.radius_um[0] / mpp
        rad = rng.uniform(0.5, 0.9, n) / mpp
        d2 = (xx - cx[:, None, None]) ** 2 + (yy - cy[:, None, None]) ** 2
        dot = np.exp(-d2 / (rad[:, None, None] ** 2)) * has[:, None, None]
        od += dot * rng.uniform(0.5, 0.8, n)[:, None, None]
    od = np.clip(od, 0, None).astype(np.float32)
    return ndimage.gaussian_filter(od, (0, blur_px, blur_px))


def cytoplasm_sprites(
    rng: np.random.Generator,
    style: CytoplasmStyle,
    nuclei: np.ndarray,
    *,
    mpp: float,
    blur_px: float,
) -> SpriteBank:
    """Foamy cell bodies with their (eccentric) nuclei: alpha and eosin OD layers."""
    n, ns = nuclei.shape[0], nuclei.shape[-1]
    size = max(ns, int(2 * np.ceil(style.radius_um[1] / mpp + 3 * blur_px + 2)) + 1)
    xx, yy = _grid(n, size)
    rad = rng.uniform(*style.radius_um, n)[:, None, None] / mpp
    wob = 1 + 0.08 * np.cos(3 * np.arctan2(yy, xx) + rng.uniform(0, 6.3, n)[:, None, None])
    r = np.sqrt(xx**2 + yy**2) / (rad * wob)
    alpha = np.clip((1 - r) * rad + 0.5, 0, 1)
    e = np.full((n, size, size), style.e_od, np.float32)
    for _ in range(style.foam):
        c = rng.uniform(-0.6, 0.6, (2, n, 1, 1)) * rad
        vr = rng.uniform(1.0, 2.2, (n, 1, 1)) / mpp
        d = np.sqrt((xx - c[0]) ** 2 + (yy - c[1]) ** 2) / vr
        e += 0.22 * style.e_od * np.exp(-(((d - 1) / 0.3) ** 2)) - 0.5 * style.e_od * (d < 0.8)
    e = np.clip(e, 0.02, None)
    h = np.zeros((n, size, size), np.float32)
    off = (size - ns) // 2
    angle = rng.uniform(0, 2 * np.pi, n)
    shift = (style.offset * rad[:, 0, 0] * np.stack([np.cos(angle), np.sin(angle)])).astype(int)
    for i in range(n):
        y0, x0 = off + shift[1, i], off + shift[0, i]
        y0, x0 = np.clip(y0, 0, size - ns), np.clip(x0, 0, size - ns)
        h[i, y0 : y0 + ns, x0 : x0 + ns] = nuclei[i]
    blur = (0, blur_px, blur_px)
    return SpriteBank(
        nucleus_h=h,
        cyto_alpha=ndimage.gaussian_filter(alpha.astype(np.float32), blur),
        cyto_e=ndimage.gaussian_filter(e.astype(np.float32), blur),
    )


def sprite_banks(
    rng: np.random.Generator, *, mpp: float, blur_px: float, n_variants: int = 96
) -> dict[str, SpriteBank]:
    """One bank per population, drawn for one slide (its focus blur baked in)."""
    banks = {}
    for pop in POPULATIONS:
        nuclei = nucleus_sprites(rng, pop.nucleus, n=n_variants, mpp=mpp, blur_px=blur_px)
        if pop.cytoplasm is None:
            banks[pop.name] = SpriteBank(nuclei)
        else:
            banks[pop.name] = cytoplasm_sprites(
                rng, pop.cytoplasm, nuclei, mpp=mpp, blur_px=blur_px
            )
    return banks

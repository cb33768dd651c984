"""Another site's staining and scanning, applied to a finished H&E image, with one strength knob.

A family of site shifts for trust evaluations (``scripts/eval_trust.py``): what changes when
the same tissue is stained by another lab and scanned by another scanner. Strength ``s`` scales
every part at once; ``s = 0`` is the identity, ``s = 1`` a site within the published spread,
``s = 2`` at its edge, ``s = 3`` beyond it. Per unit strength:

- **stain hue**: the haematoxylin and eosin OD vectors each rotated by 10° towards the blue
  channel's OD axis (more blue absorbed: browner haematoxylin, as when it is under-blued,
  and more orange eosin). Macenko-fitted stain vectors of H&E slides from different sites
  differ by up to about 10–20° (Macenko's published reference pair is 9° and 30° from
  Ruifrok's, each towards blue).
- **stain amounts**: haematoxylin concentration × 1.3 (over-stained or longer in
  haematoxylin), eosin × 0.75 (pale eosin); at ``s = 2`` that is 1.7× and 0.56×, within the
  0.5–2× eosin range seen across labs.
- **scanner tone curve**: ``RGB = 255 · T ** (0.9 ** s)`` (brighter mid-tones).
- **scanner optics**: a Gaussian blur of σ = 0.75 · s px.
- **scanner compression**: JPEG quality ``90 − 10 · s`` (capped at the synthetic slides'
  own 85), which the pyramid writer applies (:attr:`SiteShift.jpeg_quality`).

The stains are unmixed with vectors fitted on the image itself (Macenko, via
:mod:`cscvision.slides.stain`) unless given; what the two stains do not explain (glass,
noise) is kept unchanged, so a pure rotation of a two-stain image moves its Macenko-fitted
vectors by exactly the rotation.

``parts`` splits the family in two at the same strength: ``"stain"`` (rotation and amounts:
what a colour normaliser is meant to undo) and ``"optics"`` (tone curve, blur, JPEG: what no
colour normaliser can undo); ``"all"`` is both.

The rotation's direction was first haematoxylin away from eosin within their plane: that
turned haematoxylin cyan-green (more red absorbed), which no H&E protocol does, so the blue
axis replaced it (a first run had scored only the unshifted slides and one shifted row).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cscvision.slides.stain import concentrations, fit_stain, optical_density

DEG_PER_STRENGTH = 10.0
H_SCALE_PER_STRENGTH = 1.3
E_SCALE_PER_STRENGTH = 0.75
GAMMA_PER_STRENGTH = 0.9
BLUR_PX_PER_STRENGTH = 0.75
SOURCE_JPEG_QUALITY = 85  # the synthetic slides' own (cscvision.synth.writer)
PARTS = ("all", "stain", "optics")


@dataclass(frozen=True)
class SiteShift:
    """One site's shift: stain rotation (degrees, each stain towards the blue OD axis), stain
    concentration factors, tone-curve exponent, blur σ (px) and JPEG quality."""

    rotation_deg: float = 0.0
    h_scale: float = 1.0
    e_scale: float = 1.0
    gamma: float = 1.0
    blur_px: float = 0.0
    jpeg_quality: int = SOURCE_JPEG_QUALITY

    @classmethod
    def at(cls, strength: float, parts: str = "all") -> SiteShift:
        """The family's member of strength ``strength`` (≥ 0; 0 is the identity); ``parts``
        ``"stain"`` keeps only the rotation and amounts, ``"optics"`` only the tone curve,
        blur and JPEG (the other part at strength 0)."""
        if not strength >= 0:
            raise ValueError(f"site shift strength {strength}: give a number >= 0")
        if parts not in PARTS:
            raise ValueError(f"site shift parts {parts!r}: give one of {', '.join(PARTS)}")
        s = float(strength)
        stain, optics = (s, 0.0) if parts == "stain" else (0.0, s) if parts == "optics" else (s, s)
        return cls(
            rotation_deg=DEG_PER_STRENGTH * stain,
            h_scale=H_SCALE_PER_STRENGTH**stain,
            e_scale=E_SCALE_PER_STRENGTH**stain,
            gamma=GAMMA_PER_STRENGTH**optics,
            blur_px=BLUR_PX_PER_STRENGTH * optics,
            jpeg_quality=round(min(SOURCE_JPEG_QUALITY, 90 - 10 * optics)),
        )

    @property
    def is_identity(self) -> bool:
        return self == SiteShift()


def rotate_stains(stains: np.ndarray, degrees: float, towards=(0.0, 0.0, 1.0)) -> np.ndarray:
    """Rows (unit OD vectors) each rotated by ``degrees`` towards ``towards`` (default the
    blue channel's OD axis), along the great circle through the two."""
    w = np.asarray(towards, np.float64) / np.linalg.norm(towards)
    t = np.radians(degrees)
    out = []
    for v in np.asarray(stains, np.float64):
        v = v / np.linalg.norm(v)
        perp = w - (w @ v) * v
        perp /= np.linalg.norm(perp)
        out.append(np.cos(t) * v + np.sin(t) * perp)
    return np.stack(out)


def apply_site_shift(
    rgb: np.ndarray, shift: SiteShift, stains: np.ndarray | None = None
) -> np.ndarray:
    """``rgb`` (uint8 [H, W, 3]) as ``shift``'s site would have stained and scanned it
    (uint8), JPEG aside (:attr:`SiteShift.jpeg_quality` is for the writer). ``stains``
    (rows H, E; default: Macenko-fitted on ``rgb``) unmix the image."""
    rgb = np.asarray(rgb)
    if shift.is_identity:
        return rgb.copy()
    if stains is None:
        stains = np.asarray(fit_stain(rgb, "macenko").stain_matrix)
    od = optical_density(rgb.reshape(-1, 3))
    conc = concentrations(od, stains)  # [N, 2]
    rest = od - conc @ stains  # what the two stains do not explain (glass, noise)
    new = rotate_stains(stains, shift.rotation_deg)
    conc = conc * np.array([shift.h_scale, shift.e_scale])
    transmission = np.exp(-np.maximum(conc @ new + rest, 0.0)) ** shift.gamma
    out = (255.0 * transmission).reshape(rgb.shape).astype(np.float32)
    if shift.blur_px > 0:
        out = ndimage.gaussian_filter(out, (shift.blur_px, shift.blur_px, 0))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)

"""Stain colour by Beer–Lambert: ``RGB = 255 * exp(-(OD_h * h + OD_e * e + glass))``.

(then the scanner's white balance and tone curve: ``255 * (gain * T) ** gamma``.)

Every slide draws its own stain profile (a patient's lab batch, then the slide's own
jitter): stain vectors, stain strengths, glass tint, focus blur and noise. The renderer
works in haematoxylin and eosin optical densities; a lookup table over a quantised
(OD_h, OD_e) grid turns them into RGB in one gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Reference stain vectors (OD per unit stain in R, G, B), Ruifrok & Johnston 2001.
HAEMATOXYLIN_OD = (0.650, 0.704, 0.286)
EOSIN_OD = (0.072, 0.990, 0.105)

# Quantisation of the OD lookup table: LUT_LEVELS steps over [0, OD_MAX).
LUT_LEVELS = 512
OD_MAX = 2.56
OD_STEP = OD_MAX / LUT_LEVELS


@dataclass(frozen=True)
class StainProfile:
    """How one slide is stained, scanned and focused."""

    haematoxylin: tuple[float, float, float]  # unit OD vector
    eosin: tuple[float, float, float]
    h_strength: float  # multiplies haematoxylin OD
    e_strength: float
    glass_od: tuple[float, float, float]  # the slide glass and mounting medium
    blur_px: float  # Gaussian sigma of the optics, level-0 pixels
    noise_od: float  # per-pixel OD noise
    gamma: float = 1.0  # scanner tone curve: RGB = 255 * (gain * transmission) ** gamma
    gain: tuple[float, float, float] = (1.0, 1.0, 1.0)  # scanner white balance

    def as_dict(self) -> dict[str, object]:
        return {
            "haematoxylin_od": list(self.haematoxylin),
            "eosin_od": list(self.eosin),
            "h_strength": self.h_strength,
            "e_strength": self.e_strength,
            "glass_od": list(self.glass_od),
            "blur_px": self.blur_px,
            "noise_od": self.noise_od,
            "gamma": self.gamma,
            "gain": list(self.gain),
        }


def _jitter_vector(
    rng: np.random.Generator, v: tuple[float, ...], sigma: float
) -> tuple[float, ...]:
    out = np.asarray(v) + rng.normal(0, sigma, 3)
    out = np.clip(out, 0.02, None)
    return tuple(float(x) for x in out / np.linalg.norm(out))


def sample_lab_profile(rng: np.random.Generator) -> StainProfile:
    """A lab batch: strong variation in stain hue and strength (shared by a patient's slides)."""
    return StainProfile(
        haematoxylin=_jitter_vector(rng, HAEMATOXYLIN_OD, 0.12),
        eosin=_jitter_vector(rng, EOSIN_OD, 0.12),
        h_strength=float(np.exp(rng.normal(0.0, 0.3))),
        e_strength=float(np.exp(rng.normal(0.0, 0.3))),
        glass_od=tuple(float(x) for x in rng.uniform(0.015, 0.07, 3)),
        blur_px=float(rng.uniform(0.45, 1.1)),
        noise_od=float(rng.uniform(0.015, 0.035)),
        gamma=float(np.exp(rng.normal(0.0, 0.12))),
        gain=tuple(float(g) for g in np.clip(rng.normal(1.0, 0.035, 3), 0.9, 1.1)),
    )


def sample_slide_profile(rng: np.random.Generator, lab: StainProfile) -> StainProfile:
    """One slide of a lab batch: smaller jitter, and its own section thickness."""
    thickness = float(np.exp(rng.normal(0.0, 0.18)))
    return StainProfile(
        haematoxylin=_jitter_vector(rng, lab.haematoxylin, 0.04),
        eosin=_jitter_vector(rng, lab.eosin, 0.04),
        h_strength=float(lab.h_strength * thickness * np.exp(rng.normal(0.0, 0.12))),
        e_strength=float(lab.e_strength * thickness * np.exp(rng.normal(0.0, 0.12))),
        glass_od=tuple(float(np.clip(x + rng.normal(0, 0.005), 0.005, 0.1)) for x in lab.glass_od),
        blur_px=float(np.clip(lab.blur_px * np.exp(rng.normal(0, 0.15)), 0.35, 1.4)),
        noise_od=lab.noise_od,
        gamma=lab.gamma,
        gain=lab.gain,
    )


def od_lut(profile: StainProfile) -> np.ndarray:
    """RGB for every quantised (OD_h, OD_e): [LUT_LEVELS * LUT_LEVELS] of 3-byte items.

    Row ``h * LUT_LEVELS + e``; the items are numpy void(3) so one gather yields RGB.
    """
    od = (np.arange(LUT_LEVELS, dtype=np.float64) + 0.5) * OD_STEP
    h_vec = np.asarray(profile.haematoxylin) * profile.h_strength
    e_vec = np.asarray(profile.eosin) * profile.e_strength
    total = (
        od[:, None, None] * h_vec[None, None, :]
        + od[None, :, None] * e_vec[None, None, :]
        + np.asarray(profile.glass_od)[None, None, :]
    )
    transmission = np.clip(np.exp(-total) * np.asarray(profile.gain), 0, 1)
    rgb = np.clip(np.rint(255.0 * transmission**profile.gamma), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb.reshape(-1, 3)).view(np.dtype((np.void, 3))).ravel()


def od_to_rgb(lut: np.ndarray, od_h: np.ndarray, od_e: np.ndarray) -> np.ndarray:
    """Optical densities (float32 [H, W] each) to RGB uint8 [H, W, 3] through ``lut``."""
    scale = np.float32(1.0 / OD_STEP)
    top = LUT_LEVELS - 1
    h = od_h * scale
    np.clip(h, 0, top, out=h)
    e = od_e * scale
    np.clip(e, 0, top, out=e)
    idx = h.astype(np.int32)
    idx *= LUT_LEVELS
    idx += e.astype(np.int32)
    return lut.take(idx).view(np.uint8).reshape(*od_h.shape, 3)

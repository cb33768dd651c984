"""An mIF image onto its H&E slide: DAPI against haematoxylin, through the IHC road's
registration (:func:`cscvision.labels.registration.register_slides`), unchanged.

The mIF image is shown to the registration as a *virtual brightfield* slide
(:class:`VirtualBrightfield`): the nuclear stain becomes haematoxylin optical density and
the tissue's autofluorescence (the mean of the other channels above the camera offset) a
faint eosin, rendered by Beer-Lambert on white glass; so the registration's
stain-independent image (haematoxylin OD inside the tissue, plus the tissue edge) sees
the same nuclei and the same tissue outline in both. Cells found on the mIF image are
carried into H&E level-0 px by inverting the registration's H&E µm → mIF µm map
(:func:`mif_to_he_l0`).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from cscvision.cells.mif_panel import Panel, channel_indices
from cscvision.cells.mif_read import MifImage
from cscvision.slides.info import SlideInfo

H_OD = np.array([0.65, 0.70, 0.29], np.float32)
E_OD = np.array([0.07, 0.99, 0.11], np.float32)


def _resize(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    img = Image.fromarray(plane.astype(np.float32), mode="F")
    return np.asarray(img.resize(size, Image.Resampling.BOX), np.float32)


class VirtualBrightfield:
    """An mIF image as a brightfield slide for the registration (module doc)."""

    def __init__(self, image: MifImage, panel: Panel) -> None:
        self.image = image
        index = channel_indices(panel, image.channels, str(image.path))
        self.nuclear = index[panel.nuclear_marker]
        self.others = [c for m, c in index.items() if m != panel.nuclear_marker]
        w0 = image.dimensions[0]
        self.info = SlideInfo(
            path=str(image.path),
            vendor=f"mif-{image.kind}",
            dimensions=image.dimensions,
            level_dimensions=image.level_dimensions,
            level_downsamples=tuple(w0 / w for w, _ in image.level_dimensions),
            mpp=image.mpp,
            mpp_source=f"{image.kind} metadata",
            objective_power=None,
            bounds=(0, 0, *image.dimensions),
        )

    def _level_for(self, mpp: float) -> int:
        best = 0
        for k in range(len(self.image.level_dimensions)):
            if self.image.level_mpp(k) <= mpp * 1.01:
                best = k
        return best

    def rgb(self, dapi: np.ndarray, af: np.ndarray) -> np.ndarray:
        """Beer-Lambert rendering of a nuclear and an autofluorescence image."""
        h = np.clip(dapi / max(float(np.percentile(dapi, 99.5)), 1e-6), 0, 1.5) * 1.2
        e = np.clip(af / max(float(np.percentile(af, 99)), 1e-6), 0, 1.5) * 0.35
        od = h[..., None] * H_OD + e[..., None] * E_OD
        return np.clip(np.rint(255 * np.exp(-od)), 0, 255).astype(np.uint8)

    def _planes(self, level: int) -> tuple[np.ndarray, np.ndarray]:
        dapi = self.image.plane(self.nuclear, level).astype(np.float32)
        dapi -= np.percentile(dapi, 1)
        if not self.others:
            return np.clip(dapi, 0, None), np.zeros_like(dapi)
        af = np.zeros_like(dapi)
        for c in self.others:
            plane = self.image.plane(c, level).astype(np.float32)
            af += np.clip(plane - np.percentile(plane, 1), 0, None)
        af /= len(self.others)
        return np.clip(dapi, 0, None), af

    def thumbnail(self, mpp: float) -> np.ndarray:
        w, h = self.image.dimensions
        scale = self.image.mpp / mpp
        size = (max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale)))
        dapi, af = self._planes(self._level_for(mpp))
        return self.rgb(_resize(dapi, size), _resize(af, size))

    def read_region(self, xy_l0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        dapi, af = self._planes(level)
        ds = self.info.level_downsamples[level]
        x, y = round(xy_l0[0] / ds), round(xy_l0[1] / ds)
        out = np.zeros((size[1], size[0]), np.float32), np.zeros((size[1], size[0]), np.float32)
        for src, dst in zip((dapi, af), out, strict=True):
            crop = src[y : y + size[1], x : x + size[0]]
            dst[: crop.shape[0], : crop.shape[1]] = crop
        return self.rgb(*out)


def mif_to_he_l0(reg, xy_mif_l0: np.ndarray, iterations: int = 20) -> np.ndarray:
    """H&E level-0 px [N, 2] of mIF level-0 px, inverting ``reg`` (a Registration: H&E µm
    → mIF µm, affine plus an optional smooth field) by fixed-point iteration."""
    target = np.asarray(xy_mif_l0, np.float64).reshape(-1, 2) * reg.moving_mpp
    m = reg.matrix_um
    inv = np.linalg.inv(m[:2, :2])
    guess = (target - m[:2, 2]) @ inv.T
    for _ in range(iterations):
        guess = guess + (target - reg.map_um(guess)) @ inv.T
    return guess / reg.fixed_mpp

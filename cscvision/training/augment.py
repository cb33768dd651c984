"""Batch augmentations for histology tiles, as named presets; torch on the batch's device.

Every transform keeps the tile's content where it is up to a symmetry of the square
(flips, 90° rotations) or changes only colour, sharpness and intensity, so the tile's
soft targets (fractions of its tissue) stay true. All operate on a float batch
``[B, 3, H, W]`` in [0, 1] with one random draw per tile.

HED stain jitter is done in optical-density space as one 3×3 matrix per tile:
``OD' = OD · (M⁻¹ diag(α) M) + β M`` with ``M`` the H, E, DAB stain vectors (Ruifrok &
Johnston, as skimage's ``rgb_from_hed``), ``α ~ U(1 − a, 1 + a)``, ``β ~ U(−b, b)``: the
same transform as ``hed2rgb(rgb2hed(x) · α + β)`` at the cost of a batched matmul.

L*a*b* jitter (the ``stain`` preset) is RandStainNA-style stain augmentation (Shen et al.,
MICCAI 2022): each tile is Reinhard-transferred to a random virtual template, its per-
channel L*a*b* mean shifted by ``N(0, lab_mean_sd)`` and its standard deviation scaled by
``exp(N(0, lab_std_sd))``. RandStainNA draws the templates from statistics fitted on the
training set; here the spread is a fixed prior (a few L*a*b* units, about the spread of
per-slide means between H&E sites), so nothing is fitted before training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Stain vectors (rows: haematoxylin, eosin, DAB) in optical-density RGB, from skimage.
RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float32
)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
_OD_FLOOR = 1.0 / 255.0


@dataclass(frozen=True)
class AugmentParams:
    """Strengths of each transform; zero turns it off."""

    dihedral: bool = True  # random flips and 90° rotations
    hed_alpha: float = 0.0  # stain scale jitter: α ~ U(1 − a, 1 + a) per stain
    hed_beta: float = 0.0  # stain shift jitter: β ~ U(−b, b) per stain, in OD units
    brightness: float = 0.0  # additive, ~ U(−v, v)
    contrast: float = 0.0  # multiplicative about the tile mean, ~ U(1 − v, 1 + v)
    blur_p: float = 0.0  # probability of a Gaussian blur
    blur_sigma_px: float = 1.0  # its largest σ in pixels
    lab_mean_sd: tuple[float, float, float] = (0.0, 0.0, 0.0)  # L*a*b* mean shift sd
    lab_std_sd: float = 0.0  # sd of the log scale of the L*a*b* standard deviations


AUGMENT_PRESETS: dict[str, AugmentParams] = {
    "none": AugmentParams(dihedral=False),
    "flips": AugmentParams(),
    "histo": AugmentParams(
        hed_alpha=0.05, hed_beta=0.01, brightness=0.05, contrast=0.1, blur_p=0.1
    ),
    "strong": AugmentParams(
        hed_alpha=0.1, hed_beta=0.03, brightness=0.1, contrast=0.2, blur_p=0.3, blur_sigma_px=1.5
    ),
    "stain": AugmentParams(
        hed_alpha=0.05,
        hed_beta=0.01,
        brightness=0.05,
        contrast=0.1,
        blur_p=0.1,
        lab_mean_sd=(4.0, 3.0, 3.0),
        lab_std_sd=0.1,
    ),
}


def augment_preset(name: str) -> AugmentParams:
    if name not in AUGMENT_PRESETS:
        raise ValueError(
            f"unknown augment preset {name!r}; choose one of {sorted(AUGMENT_PRESETS)}"
        )
    return AUGMENT_PRESETS[name]


def _uniform(n: int, low: float, high: float, like: torch.Tensor, shape=()) -> torch.Tensor:
    return torch.rand((n, *shape), device=like.device, dtype=like.dtype) * (high - low) + low


def dihedral(x: torch.Tensor) -> torch.Tensor:
    """Each tile flipped and rotated by one of the 8 symmetries of the square, at random."""
    square = x.shape[-1] == x.shape[-2]
    code = torch.randint(0, 8 if square else 4, (x.shape[0],), device=x.device)
    out = x.clone()
    for k in range(1, 8):  # bit 0: flip x, bit 1: flip y, bit 2: transpose
        idx = (code == k).nonzero().flatten()
        if idx.numel() == 0:
            continue
        tiles = x[idx]
        if k & 4:
            tiles = tiles.transpose(-1, -2)
        if k & 1:
            tiles = tiles.flip(-1)
        if k & 2:
            tiles = tiles.flip(-2)
        out[idx] = tiles
    return out


def hed_jitter(x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Random stain scale and shift per tile in HED optical-density space."""
    n = x.shape[0]
    m = RGB_FROM_HED.to(x.device, x.dtype)
    m_inv = HED_FROM_RGB.to(x.device, x.dtype)
    a = _uniform(n, 1 - alpha, 1 + alpha, x, (3,))
    b = _uniform(n, -beta, beta, x, (3,))
    matrix = m_inv.unsqueeze(0) * a.unsqueeze(1) @ m  # [B, 3, 3]: OD row-vector transform
    shift = b @ m  # [B, 3]
    od = -torch.log(x.clamp_min(_OD_FLOOR)).flatten(2)  # [B, 3, P]
    od = torch.einsum("bji,bjp->bip", matrix, od) + shift.unsqueeze(-1)
    return torch.exp(-od).clamp(0, 1).view_as(x)


def lab_jitter(x: torch.Tensor, mean_sd: tuple[float, float, float], std_sd: float) -> torch.Tensor:
    """Each tile Reinhard-transferred to a random L*a*b* template around its own statistics:
    mean + ``N(0, mean_sd)`` per channel, standard deviation × ``exp(N(0, std_sd))``."""
    from cscvision.slides.stain import lab_to_rgb, rgb_to_lab

    n = x.shape[0]
    lab = rgb_to_lab(x * 255.0)
    mean = lab.mean((2, 3), keepdim=True)
    shift = torch.randn(n, 3, 1, 1, device=x.device) * torch.tensor(mean_sd, device=x.device).view(
        1, 3, 1, 1
    )
    scale = torch.exp(torch.randn(n, 3, 1, 1, device=x.device) * std_sd)
    out = lab_to_rgb((lab - mean) * scale + mean + shift) / 255.0
    return out.to(x.dtype).contiguous(memory_format=_memory_format(x))


def brightness_contrast(x: torch.Tensor, brightness: float, contrast: float) -> torch.Tensor:
    n = x.shape[0]
    c = _uniform(n, 1 - contrast, 1 + contrast, x).view(-1, 1, 1, 1)
    b = _uniform(n, -brightness, brightness, x).view(-1, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * c + mean + b).clamp(0, 1)


def gaussian_blur(x: torch.Tensor, p: float, max_sigma_px: float) -> torch.Tensor:
    """Blur a random fraction ``p`` of tiles, each with σ ~ U(0.3, max_sigma_px)."""
    idx = (torch.rand(x.shape[0], device=x.device) < p).nonzero().flatten()
    if idx.numel() == 0:
        return x
    tiles = x[idx]
    n, c, h, w = tiles.shape
    radius = max(1, math.ceil(2 * max_sigma_px))
    sigma = _uniform(n, min(0.3, max_sigma_px), max_sigma_px, x)
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(offsets**2) / (2 * sigma.view(-1, 1) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n*c, K]
    flat = F.pad(tiles.reshape(1, n * c, h, w), (radius,) * 4, mode="reflect")
    flat = F.conv2d(flat, kernel.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(flat, kernel.view(n * c, 1, -1, 1), groups=n * c)
    out = x.clone()
    out[idx] = flat.view(n, c, h, w)
    return out


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def augment_batch(x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Apply ``params`` to a float batch in [0, 1]; returns a new tensor of the same shape."""
    if params.dihedral:
        x = dihedral(x)
    if params.hed_alpha or params.hed_beta:
        x = hed_jitter(x, params.hed_alpha, params.hed_beta)
    if any(params.lab_mean_sd) or params.lab_std_sd:
        x = lab_jitter(x, params.lab_mean_sd, params.lab_std_sd)
    if params.brightness or params.contrast:
        x = brightness_contrast(x, params.brightness, params.contrast)
    if params.blur_p > 0:
        x = gaussian_blur(x, params.blur_p, params.blur_sigma_px)
    return x


def to_unit_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 batch → float32 in [0, 1], channels_last (the layout the CNN runs fastest in)."""
    return image.to(torch.float32).div_(255.0).contiguous(memory_format=torch.channels_last)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(x − mean) / std`` per channel; ``mean``, ``std`` shaped ``[3]``."""
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)

"""The permutation null of the co-localisation statistics: rigid moves of one map.

Each permutation moves the second target's map as a whole on the bounding rectangle of the
slide's scored map pixels: a toroidal shift (wrapping round the rectangle) combined with
one of its symmetries (flips and 180° rotation; on a square rectangle also the 90°
rotations and transposes). A moved pixel keeps its value only where it lands on a scored
pixel. Each map keeps its own spatial structure (patch sizes, smoothness, autocorrelation);
only the relative position of the two maps is randomised, which is the hypothesis tested.
A library's default null (esda's ``p_sim``: values shuffled pixel by pixel) destroys that
structure and makes any two smooth maps look significantly related.

Seeded (:func:`null_seed` from the slide id): the same slide gives the same null.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

MAX_STACK_PX = 4_000_000  # pixels held at once when moving a map for many permutations


def null_seed(slide_id: str) -> int:
    """A seed that depends on the slide id only (stable across runs and machines)."""
    return zlib.crc32(slide_id.encode("utf-8"))


def _symmetries(image: np.ndarray) -> list[np.ndarray]:
    """The images of ``image`` under the symmetries of its rectangle (last two axes)."""
    flips = [image, image[..., ::-1, :], image[..., :, ::-1], image[..., ::-1, ::-1]]
    if image.shape[-1] != image.shape[-2]:
        return flips
    return flips + [np.swapaxes(f, -1, -2) for f in flips]


@dataclass(frozen=True)
class RigidNull:
    """``permutations`` rigid moves on the bounding rectangle ``window`` of a mask."""

    window: tuple[slice, slice]
    symmetry: np.ndarray  # int[P]: index into the rectangle's symmetries
    shift: np.ndarray  # int[P, 2]: (rows, cols) toroidal shift

    @property
    def permutations(self) -> int:
        return len(self.symmetry)

    def crop(self, image: np.ndarray) -> np.ndarray:
        return image[self.window]

    def moved(self, image: np.ndarray) -> Iterator[np.ndarray]:
        """``image`` (already cropped to the window) moved by each permutation, in chunks
        of stacked images [p, h, w]."""
        h, w = image.shape
        options = np.stack(_symmetries(image))
        rows, cols = np.arange(h)[None, :, None], np.arange(w)[None, None, :]
        step = max(1, MAX_STACK_PX // max(1, h * w))
        for start in range(0, self.permutations, step):
            k = self.symmetry[start : start + step, None, None]
            dy = self.shift[start : start + step, 0, None, None]
            dx = self.shift[start : start + step, 1, None, None]
            yield options[k, (rows - dy) % h, (cols - dx) % w]


def rigid_null(mask: np.ndarray, permutations: int, seed: int) -> RigidNull:
    """Random rigid moves (never the identity) on the bounding rectangle of ``mask``."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if len(rows) == 0:
        rows = cols = np.array([0])
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    h, w = rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0]
    rng = np.random.default_rng(seed)
    n_sym = 8 if h == w else 4
    symmetry = rng.integers(0, n_sym, permutations)
    shift = np.stack([rng.integers(0, h, permutations), rng.integers(0, w, permutations)], 1)
    identity = (symmetry == 0) & (shift == 0).all(1)
    shift[identity, 1] = 1 % w  # a rectangle one pixel wide cannot shift along x
    return RigidNull(window=window, symmetry=symmetry, shift=shift)


def summarize_null(observed: float | None, null: np.ndarray) -> dict[str, float | None]:
    """Observed value, null mean and sd, z, and the one-sided permutation p-value for
    attraction: ``(1 + #{null ≥ observed}) / (1 + #null)`` (NaN nulls left out)."""
    keys = ("observed", "null_mean", "null_sd", "z", "p")
    null = null[np.isfinite(null)]
    if observed is None or not np.isfinite(observed) or len(null) == 0:
        return dict.fromkeys(keys, None) | {"observed": _num(observed)}
    mean, sd = float(null.mean()), float(null.std(ddof=1)) if len(null) > 1 else 0.0
    tie = 1e-9 * max(1.0, abs(observed))
    p = (1 + int((null >= observed - tie).sum())) / (1 + len(null))
    z = (observed - mean) / sd if sd > 0 else None
    return {"observed": float(observed), "null_mean": mean, "null_sd": sd, "z": z, "p": p}


def _num(value: float | None) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)

"""A marker's positivity threshold from the data, and its QC.

The rule: take the marker's positive densities (DAB-positive share of the tissue, smoothed
over the marker's ``smooth_um``) of every H&E-frame map cell that lies on H&E and IHC tissue;
fit a two-component Gaussian mixture to them; the threshold is the density between the two
means where the upper component becomes the more probable. Positive regions are a minority
of tissue: while more than ``MAX_POSITIVE`` of the densities lie above the split, it is
inside the stained background, and the mixture is fitted again to the densities above it
(at most ``MAX_SPLITS`` fits). A low DAB threshold stains 10-20 % of the cells of cellular
tissue, so the background itself has two modes (sparse tissue ~0.02, cellular ~0.17): on
the held-out cohort seed 77, slide SYN-P002 FOXP3, one split (D 2.48) put 62 % of the
tissue above it and FOXP3 tile AUROC was 0.855; see ``scripts/ihc_threshold_rules.py``
for the figures before and after. Each slide gets its own such
threshold when its densities separate (Ashman's D ≥ ``MIN_SEPARATION``, the upper component
≥ 2 % of its tissue: a slide's own DAB threshold and stain strength shift its densities, and
one cohort threshold labelled 97 % of one slide positive), else the threshold of the
densities pooled over the cohort's slides.
Stained background cells lift the lower component; they no longer decide what is positive,
as a fixed 0.05 did (it took 94-99 % of tissue for positive with 10-20 % of cells stained).

A marker whose positive share of tissue tiles comes out above ``MAX_POSITIVE`` (saturated)
or under ``MIN_POSITIVE`` (nothing found) is warned about by name; each marker's histogram,
with its components and threshold, is written as a PNG and a CSV for a look.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

MAX_POSITIVE = 0.5  # positive share of tissue tiles flagged above; of densities split again
MIN_POSITIVE = 0.01  # ... and under which
MAX_SAMPLES = 200_000
MAX_SPLITS = 3  # mixture fits at most: the first, and two inside a majority upper side
MIN_SEPARATION = 2.0  # Ashman's D over which a slide's own two components are trusted
SPLIT_AGAIN = " (split again inside the upper side: it held the majority)"
BINS = 60


@dataclass(frozen=True)
class Threshold:
    marker: str
    value: float
    rule: str  # how it was chosen
    means: tuple[float, float] = (np.nan, np.nan)  # mixture component means (low, high)
    weights: tuple[float, float] = (np.nan, np.nan)
    separation: float = np.nan  # Ashman's D of the two components (> 2: well separated)

    def as_dict(self) -> dict:
        return {
            "value": round(self.value, 4),
            "rule": self.rule,
            "means": [round(float(m), 4) for m in self.means],
            "weights": [round(float(w), 4) for w in self.weights],
            "separation_ashman_d": round(float(self.separation), 3),
        }


def mixture_threshold(marker: str, densities: np.ndarray, seed: int = 0) -> Threshold:
    """The two-component Gaussian mixture threshold of ``densities`` (see the module): split
    again inside the upper side while that side holds more than ``MAX_POSITIVE`` of them."""
    x = _finite(marker, densities, seed)
    thr, rest = two_component_split(marker, x, seed), x
    for _ in range(MAX_SPLITS - 1):
        if (x >= thr.value).mean() <= MAX_POSITIVE:
            break
        upper = rest[rest >= thr.value]
        if len(upper) < 20 or np.ptp(upper) < 1e-6:
            break
        rest = upper
        thr = two_component_split(marker, rest, seed)
        thr = replace(thr, rule=thr.rule + SPLIT_AGAIN)
    return thr


def _finite(marker: str, densities: np.ndarray, seed: int) -> np.ndarray:
    x = np.asarray(densities, np.float64).ravel()
    x = x[np.isfinite(x)]
    if len(x) < 20 or np.ptp(x) < 1e-6:
        raise ValueError(f"marker {marker}: too few tissue densities ({len(x)}) for a threshold")
    if len(x) > MAX_SAMPLES:
        x = np.random.default_rng(seed).choice(x, MAX_SAMPLES, replace=False)
    return x


def two_component_split(marker: str, densities: np.ndarray, seed: int = 0) -> Threshold:
    """One two-component Gaussian mixture split of ``densities``: the density between the
    two means where the upper component becomes the more probable."""
    from sklearn.mixture import GaussianMixture

    x = _finite(marker, densities, seed)
    gm = GaussianMixture(2, random_state=seed, n_init=2).fit(x[:, None])
    order = np.argsort(gm.means_.ravel())
    means = gm.means_.ravel()[order]
    sds = np.sqrt(gm.covariances_.ravel()[order])
    weights = gm.weights_[order]
    grid = np.linspace(means[0], means[1], 512)
    upper = gm.predict_proba(grid[:, None])[:, order[1]]
    value = float(grid[np.argmax(upper >= 0.5)]) if (upper >= 0.5).any() else float(means[1])
    d = float(np.sqrt(2) * abs(means[1] - means[0]) / np.sqrt(sds[0] ** 2 + sds[1] ** 2))
    return Threshold(
        marker, value, "two-component Gaussian mixture on the cohort's densities",
        (float(means[0]), float(means[1])), (float(weights[0]), float(weights[1])), d,
    )  # fmt: skip


def positive_share_warning(marker: str, share: float, n_tiles: int) -> str | None:
    """A one-line warning when a marker's positive share of tissue tiles is implausible."""
    if n_tiles and share > MAX_POSITIVE:
        return (
            f"marker {marker}: {share:.0%} of {n_tiles} tissue tiles came out positive (more "
            "than half): its threshold may sit in the stained background; check "
            f"qc/{marker}_density.png and set min_density for {marker} in the marker config"
        )
    if n_tiles and share < MIN_POSITIVE:
        return (
            f"marker {marker}: {share:.1%} of {n_tiles} tissue tiles came out positive: check "
            f"qc/{marker}_density.png, the DAB threshold and min_density for {marker}"
        )
    return None


def histogram(densities: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Counts and bin edges of the densities on [0, max(1, threshold)]."""
    x = np.asarray(densities, np.float64).ravel()
    top = max(1.0, threshold, float(np.nanmax(x)) if x.size else 1.0)
    return np.histogram(x[np.isfinite(x)], bins=BINS, range=(0.0, top))


def histogram_png(
    counts: np.ndarray, edges: np.ndarray, threshold: float, title: str, size=(480, 260)
) -> np.ndarray:
    """An RGB picture of a density histogram (log counts) with the threshold in red."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size, "white")
    pen = ImageDraw.Draw(img)
    left, bottom, top = 30, h - 30, 24
    scale = np.log1p(counts) / max(np.log1p(counts).max(), 1e-9)
    bar = (w - left - 10) / len(counts)
    for i, s in enumerate(scale):
        x0 = left + i * bar
        pen.rectangle([x0, bottom - s * (bottom - top), x0 + bar - 1, bottom], fill=(90, 90, 160))
    span = edges[-1] - edges[0]
    tx = left + (threshold - edges[0]) / span * (w - left - 10)
    pen.line([tx, top, tx, bottom], fill=(220, 0, 0), width=2)
    pen.text((left, 4), f"{title}; threshold {threshold:.3f} (red); log counts", fill="black")
    for v in np.linspace(edges[0], edges[-1], 5):
        pen.text((left + (v - edges[0]) / span * (w - left - 10) - 8, bottom + 6), f"{v:.2f}",
                 fill="black")  # fmt: skip
    return np.asarray(img)


def pooled(samples: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(s) for s in samples]) if samples else np.zeros(0)

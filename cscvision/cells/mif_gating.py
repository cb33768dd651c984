"""Marker positivity per slide, phenotype rules, and the cell table of an mIF image.

**Gating**, per marker and slide, on the log of the compartment means (the positive and
negative cells are roughly log-normal, so the split is found where they are separable):

- ``otsu`` (default): Otsu's threshold of the log intensities;
- ``gmm``: a two-component Gaussian mixture on the log intensities; the threshold is where
  the higher component's posterior reaches 1/2 between the two means;
- ``negative``: the negative population's gate alone: its mode plus ``NEG_K`` robust SDs
  (:func:`negative_threshold`), as flow cytometry gates a marker from its negative peak;
- a ``threshold`` given in the panel (intensity units) wins over all.

**Guard** (on by default for ``otsu`` and ``gmm``): both split a marker into two
populations; when its positive cells are rare (macrophage markers: 1-2 % of cells) the
split can fall inside the negative peak instead, calling a third to a half of the cells
positive. The cells a split calls positive must then be mostly the negative peak's upper
half: their median lies less than ``GUARD_SD`` robust SDs above the mode of the cells it
calls negative (a positive population of its own lies beyond them), and the split is
replaced by the negative gate (:func:`auto_threshold`).

**Spillover compensation** (optional, :func:`compensate`): before gating, each marker's
intensity loses what its neighbouring channels of the image (file order: the spectral order
of Akoya, Orion and most exports) spill into it. The coefficient from channel A into B is
estimated per slide on the cells a first gate (same method and guard) calls positive for A
and negative for B: the ``RATIO_QUANTILE``-th percentile of (B - background) /
(A - background); backgrounds are each channel's 10th percentile; coefficients are capped
at ``MAX_SPILL``. Cells positive for both are left out: on co-expressed neighbours (CD163
on CD68+ cells, CD44 on panCK+ cells) they carry B themselves, and the estimate sat at the
cap (0.2) where the true spill was 0.05-0.07. Without a first gate (:func:`compensate`
called alone), the ``TOP_SHARE`` cells brightest in A are used.

**Lineage**: where the panel lists mutually exclusive lineage markers, a cell positive for
several keeps the one furthest above its threshold (log intensity over threshold) and is
made negative for the others (:func:`resolve_lineage`).

**Phenotypes**: the panel's rules in order; the first rule a cell meets gives its type
(``all`` positive, at least one ``any`` when given, no ``none``); cells no rule takes get
``default_type``. The result is a cell table (:mod:`cscvision.cells.table`): ``cell_type``,
one float column per marker (its compartment mean) and one ``<marker>_pos`` per gated
marker, so densities, compartments, immune phenotypes and tile labels read it unchanged.
"""

from __future__ import annotations

import numpy as np

from cscvision.cells.mif_panel import Panel, PhenotypeRule
from cscvision.cells.table import CellTable, make_table
from cscvision.core.errors import CscvisionError

METHODS = ("otsu", "gmm", "negative")
DEFAULT_METHOD = "otsu"
LOG_FLOOR = 1e-3
NEG_K = 3.0  # the negative gate: mode + NEG_K robust SDs of the negative peak
GUARD_SD = 2.0  # robust SDs: a positive class whose median is closer is the negatives'
MODE_BIN = 0.05  # log units; the histogram is smoothed over 2 bins (sd) to find the mode
MIN_NEGATIVE = 20  # fewer cells below a split: too few to judge it, it is kept
TOP_SHARE = 0.03
RATIO_QUANTILE = 10.0
MAX_SPILL = 0.2


class GatingError(CscvisionError, ValueError):
    """A marker that cannot be gated (too few cells, a flat channel, an unknown method)."""


def _log(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, np.float64)
    return np.log(np.maximum(v[np.isfinite(v)], LOG_FLOOR))


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of log(values), back in intensity units: the split of the sorted
    log intensities with the largest between-class variance, placed half-way across the
    gap it cuts (exact, no histogram bins: binned Otsu puts it at the gap's lower edge)."""
    logs = np.sort(_log(values))
    n = len(logs)
    if n < 2 or logs[-1] <= logs[0]:
        raise GatingError(f"cannot gate {n} cells of one intensity; give a threshold")
    k = np.arange(1, n)
    cum = np.cumsum(logs)[:-1]
    mean0, mean1 = cum / k, (logs.sum() - cum) / (n - k)
    between = k * (n - k) * (mean0 - mean1) ** 2
    between[logs[1:] == logs[:-1]] = -1  # a split must fall between different values
    best = int(np.argmax(between))
    return float(np.exp((logs[best] + logs[best + 1]) / 2))


def gmm_threshold(values: np.ndarray, seed: int = 0) -> float:
    """Where a two-component Gaussian mixture of log(values) changes its mind, between the
    two means (intensity units)."""
    from sklearn.mixture import GaussianMixture

    logs = _log(values)
    if len(logs) < 10 or logs.max() <= logs.min():
        raise GatingError(f"cannot fit a mixture to {len(logs)} cells; give a threshold")
    gmm = GaussianMixture(2, random_state=seed).fit(logs[:, None])
    lo, hi = np.sort(gmm.means_.ravel())
    grid = np.linspace(lo, hi, 2001)
    post = gmm.predict_proba(grid[:, None])[:, int(np.argmax(gmm.means_.ravel()))]
    return float(np.exp(grid[int(np.argmax(post >= 0.5))]))


def negative_mode(logs: np.ndarray) -> tuple[float, float]:
    """(mode, robust SD) of the main peak of log intensities: the peak of a histogram of
    ``MODE_BIN`` bins smoothed by a Gaussian of 2 bins, and the SD of a normal whose lower
    half matches the cells below the mode (median distance below it / 0.6745), so the
    positive cells above do not widen it."""
    logs = np.asarray(logs, np.float64)
    lo, hi = np.percentile(logs, [0.5, 99.5])
    edges = np.arange(lo, hi + 2 * MODE_BIN, MODE_BIN)
    counts, _ = np.histogram(logs, edges)
    kernel = np.exp(-0.5 * (np.arange(-6, 7) / 2.0) ** 2)
    smooth = np.convolve(counts, kernel / kernel.sum(), mode="same")
    mode = float(edges[int(np.argmax(smooth))] + MODE_BIN / 2)
    below = mode - logs[logs < mode]
    sd = float(np.median(below)) / 0.6745 if len(below) else 0.0
    return mode, max(sd, MODE_BIN / 2)


def negative_threshold(values: np.ndarray, k: float = NEG_K) -> float:
    """The negative population's gate (intensity units): its mode plus ``k`` robust SDs of
    the log intensities (:func:`negative_mode`), i.e. above all but ~0.1 % of a log-normal
    negative peak. Right where positives are rare (the peak is the negatives'); wrong where
    they outnumber the negatives (the peak is theirs), which is why it is the guard's
    fallback, not the first rule."""
    logs = _log(values)
    if len(logs) < 2 or logs.max() <= logs.min():
        raise GatingError(f"cannot gate {len(logs)} cells of one intensity; give a threshold")
    mode, sd = negative_mode(logs)
    return float(np.exp(mode + k * sd))


def auto_threshold(values: np.ndarray, method: str = DEFAULT_METHOD,
                   guard: bool = True) -> tuple[float, bool]:  # fmt: skip
    """(threshold, guarded) of one marker on one slide by ``method``; ``guarded``: the split
    fell inside the negative peak (module doc) and the negative gate replaced it."""
    if method not in METHODS:
        raise GatingError(f"gating method {method!r}; one of {', '.join(METHODS)}")
    if method == "negative":
        return negative_threshold(values), False
    split = otsu_threshold(values) if method == "otsu" else gmm_threshold(values)
    if not guard:
        return split, False
    logs = _log(values)
    below, above = logs[logs < np.log(split)], logs[logs >= np.log(split)]
    if len(below) < MIN_NEGATIVE or not len(above):
        return split, False
    mode, sd = negative_mode(below)
    if np.median(above) >= mode + GUARD_SD * sd:
        return split, False
    return negative_threshold(values), True


def gate(
    values: np.ndarray,
    method: str = DEFAULT_METHOD,
    threshold: float | None = None,
    guard: bool = True,
) -> tuple[float, np.ndarray]:
    """(threshold, positive bool[N]) of one marker on one slide (:func:`auto_threshold`
    unless a ``threshold`` is given)."""
    if threshold is None:
        threshold, _ = auto_threshold(values, method, guard)
    v = np.asarray(values, np.float64)
    return float(threshold), np.nan_to_num(v, nan=-np.inf) > threshold


def spill_coefficient(
    source: np.ndarray, target: np.ndarray, first: tuple[np.ndarray, np.ndarray] | None = None
) -> float:
    """Share of ``source`` seen in ``target`` (module doc); 0 when too few cells. Without
    ``first``, from the ``TOP_SHARE`` cells brightest in ``source``, the
    ``RATIO_QUANTILE``-th percentile of the ratios; with ``first`` (bool[N] masks: positive
    for the source, positive for the target, by a first gate), the same percentile over the
    cells positive for the source and negative for the target."""
    a = np.nan_to_num(np.asarray(source, np.float64), nan=0.0)
    b = np.nan_to_num(np.asarray(target, np.float64), nan=0.0)
    if len(a) < 50:
        return 0.0
    a, b = a - np.percentile(a, 10), b - np.percentile(b, 10)
    if first is not None:
        use = np.asarray(first[0], bool) & ~np.asarray(first[1], bool) & (a > 0)
        if use.sum() < 5:
            return 0.0
        return float(np.clip(np.percentile(b[use] / a[use], RATIO_QUANTILE), 0, MAX_SPILL))
    top = a > max(np.percentile(a, 100 * (1 - TOP_SHARE)), 0)
    if top.sum() < 5:
        return 0.0
    return float(np.clip(np.percentile(b[top] / a[top], RATIO_QUANTILE), 0, MAX_SPILL))


def compensate(
    intensity: dict[str, np.ndarray],
    order: list[str],
    skip: tuple[str, ...] = (),
    first: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Intensities less the spillover from their neighbours in ``order`` (the image's channel
    order of the markers); ``skip``: markers never used as a source (the nuclear stain);
    ``first``: each marker's positive cells by a first gate, to estimate each spill on the
    cells positive for its source and negative for its target (:func:`spill_coefficient`).
    Returns the new intensities and the coefficients (``"A>B"``: from A into B)."""
    out, coef = dict(intensity), {}
    for k, target in enumerate(order):
        v = np.asarray(intensity[target], np.float64).copy()
        for j in (k - 1, k + 1):
            if 0 <= j < len(order) and order[j] not in skip and target not in skip:
                src = np.asarray(intensity[order[j]], np.float64)
                pair = (first[order[j]], first[target]) if first else None
                c = spill_coefficient(src, intensity[target], pair)
                coef[f"{order[j]}>{target}"] = round(c, 4)
                v -= c * np.clip(src - np.nanpercentile(src, 10), 0, None)
        out[target] = v
    return out, coef


def resolve_lineage(positive: dict[str, np.ndarray], score: dict[str, np.ndarray],
                    lineage: tuple[str, ...]) -> dict[str, np.ndarray]:  # fmt: skip
    """``positive`` with at most one of ``lineage`` per cell: the highest ``score``."""
    if len(lineage) < 2:
        return positive
    s = np.stack([np.where(positive[m], score[m], -np.inf) for m in lineage])
    best, hit = np.argmax(s, axis=0), np.isfinite(s).any(axis=0)
    out = dict(positive)
    for k, m in enumerate(lineage):
        out[m] = positive[m] & (~hit | (best == k))
    return out


def _meets(rule: PhenotypeRule, positive: dict[str, np.ndarray], n: int) -> np.ndarray:
    ok = np.ones(n, bool)
    for m in rule.all:
        ok &= positive[m]
    if rule.any:
        ok &= np.logical_or.reduce([positive[m] for m in rule.any])
    for m in rule.none:
        ok &= ~positive[m]
    return ok


def apply_rules(
    positive: dict[str, np.ndarray], rules: tuple[PhenotypeRule, ...], default: str
) -> np.ndarray:
    """The type of each cell (object[N]): the first rule it meets, else ``default``."""
    n = len(next(iter(positive.values()))) if positive else 0
    out = np.full(n, default, dtype=object)
    free = np.ones(n, bool)
    for rule in rules:
        hit = free & _meets(rule, positive, n)
        out[hit] = rule.type
        free &= ~hit
    return out


def phenotype_table(
    x: np.ndarray,
    y: np.ndarray,
    intensity: dict[str, np.ndarray],
    panel: Panel,
    *,
    method: str = DEFAULT_METHOD,
    guard: bool = True,
    mpp: float | None = None,
    slide_id: str = "",
    source: str = "cscvision mif",
    spill_order: list[str] | None = None,
) -> tuple[CellTable, dict[str, float], tuple[str, ...]]:
    """The cell table of gated, phenotyped cells, each marker's threshold, and the markers
    whose split the guard replaced (:func:`auto_threshold`). With ``spill_order`` (the
    markers in the image's channel order) the intensities are first compensated
    (:func:`compensate`, on a first gate's negatives); the table keeps the measured ones."""
    gated, positive, thresholds, guarded = intensity, {}, {}, []
    if spill_order:
        first = {m.marker: gate(intensity[m.marker], method, m.threshold, guard)[1]
                 for m in panel.measured}  # fmt: skip
        gated, _ = compensate(intensity, spill_order, (panel.nuclear_marker,), first)
    score = {}
    for m in panel.measured:
        if m.threshold is None:
            threshold, hit = auto_threshold(gated[m.marker], method, guard)
            guarded += [m.marker] if hit else []
        else:
            threshold = m.threshold
        thresholds[m.marker], positive[m.marker] = gate(gated[m.marker], threshold=threshold)
        ratio = np.asarray(gated[m.marker], np.float64) / max(thresholds[m.marker], LOG_FLOOR)
        score[m.marker] = np.log(np.maximum(np.nan_to_num(ratio, nan=0.0), LOG_FLOOR))
    positive = resolve_lineage(positive, score, panel.lineage)
    types = apply_rules(positive, panel.rules, panel.default_type)
    markers = {m: np.asarray(v, np.float64) for m, v in intensity.items()}
    markers |= {f"{m}_pos": p for m, p in positive.items()}
    table = make_table(
        x,
        y,
        types,
        source=source,
        mpp=mpp,
        slide_id=slide_id,
        markers=markers,
        class_map={r.type: r.type for r in panel.rules},
    )
    return table, thresholds, tuple(guarded)

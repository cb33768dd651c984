"""Each slide's own stain vectors, for Macenko/Vahadane normalisation to a template.

A Macenko or Vahadane template recomposes a tile's stain concentrations under the template's
stains; the concentrations must be unmixed with the *slide's* stains, or a slide whose stain
vectors differ from the template's is not corrected at all (only its amounts are rescaled).
The slide's stains are fitted once per slide on a fixed sample of its tissue
(:data:`SAMPLE_TILES` tiles of :data:`SAMPLE_PX` px at :data:`SAMPLE_MPP` µm/px, seed 0:
deterministic) and cached by slide path. Inference, training, OOD calibration and the
confidence thresholds all use this, so a model sees its tiles normalised the same way
everywhere. Reinhard needs no source (it matches each tile's own L*a*b* statistics).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cscvision.slides.stain import (
    StainError,
    StainReference,
    angle_deg,
    fit_stain,
    sample_tissue_tiles,
)

if TYPE_CHECKING:
    from cscvision.slides.slide import Slide

SAMPLE_TILES = 16
SAMPLE_PX = 256
SAMPLE_MPP = 1.0
SAMPLE_SEED = 0

_CACHE: dict[tuple, StainReference] = {}


def _key(path: str | Path, method: str) -> tuple:
    """The cache key of a slide file: its path, size and modification time (a file written
    anew at the same path is fitted again), and the method."""
    try:
        stat = Path(path).stat()
        return str(path), stat.st_size, stat.st_mtime_ns, method
    except OSError:
        return str(path), None, None, method


def needs_source(reference: StainReference | None) -> bool:
    """Whether normalising to ``reference`` needs each slide's own stains."""
    return reference is not None and reference.method != "reinhard"


def slide_stains(slide: Slide, reference: StainReference | None) -> StainReference | None:
    """The stains of ``slide`` (an open slide) fitted by ``reference``'s method on a fixed
    sample of its tissue: the ``source`` for :func:`~cscvision.slides.stain.normalise_batch`.
    None for Reinhard or no reference. A slide with too little tissue to fit gets ``reference`` (its
    tiles then keep the template's stains, as before per-slide fitting) and one warning."""
    if not needs_source(reference):
        return None
    key = _key(slide.info.path, reference.method)
    if key not in _CACHE:
        _CACHE[key] = _fit(slide, reference)
    return _CACHE[key]


def _fit(slide: Slide, reference: StainReference) -> StainReference:
    try:
        tiles = sample_tissue_tiles(
            slide, mpp=SAMPLE_MPP, tile_px=SAMPLE_PX, n_tiles=SAMPLE_TILES, seed=SAMPLE_SEED
        )
        return fit_stain(tiles, reference.method, source=str(slide.info.path))
    except StainError as e:
        warnings.warn(
            f"{slide.info.path}: its own stains cannot be fitted ({e}); its tiles are "
            f"unmixed with the {reference.method} template's stains instead",
            stacklevel=3,
        )
        return reference


def path_stains(
    path: str | Path, reference: StainReference, mpp: float | None = None
) -> StainReference | None:
    """:func:`slide_stains` of the slide file ``path`` (``mpp``: its level-0 µm/px when
    the file gives none), cached by path."""
    from cscvision.slides.slide import open_slide

    if not needs_source(reference):
        return None
    cached = _CACHE.get(_key(path, reference.method))
    if cached is not None:
        return cached
    with open_slide(path, mpp=mpp) as slide:
        return slide_stains(slide, reference)


def cohort_stains(
    slides: Sequence[tuple[str, float | None]], reference: StainReference | None
) -> list[StainReference] | None:
    """Each slide's stains (``slides``: path and µm/px override, in ``slide_idx`` order), or
    None when ``reference`` needs none."""
    if not needs_source(reference):
        return None
    return [path_stains(path, reference, mpp) for path, mpp in slides]


def per_tile(sources: Sequence[StainReference] | None, slide_idx: Any) -> list | None:
    """The source stains of each tile of a batch from its ``slide_idx``, or None."""
    if sources is None or slide_idx is None:
        return None
    idx = slide_idx.tolist() if hasattr(slide_idx, "tolist") else list(slide_idx)
    return [sources[int(i)] for i in np.ravel(idx)]


def stain_record(source: StainReference | None, reference: StainReference) -> dict[str, Any]:
    """What a slide's summary says of its normalisation: the template's method, the slide's
    fitted stains and their angles to the template's (degrees, haematoxylin then eosin)."""
    record: dict[str, Any] = {"method": reference.method}
    if source is None:
        return record
    if source is reference:
        return {**record, "slide_stains": "not fitted (too little tissue): template's used"}
    ours, theirs = np.asarray(source.stain_matrix), np.asarray(reference.stain_matrix)
    return {
        **record,
        "slide_stain_matrix": ours.round(4).tolist(),
        "angle_to_template_deg": [
            round(angle_deg(a, b), 2) for a, b in zip(ours, theirs, strict=True)
        ],
    }

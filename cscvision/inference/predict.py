"""Inference on one slide: tile it at the model's µm/px, score every tile, stitch the maps.

``predict_slide`` is the whole path for one slide file; ``predict_grid`` starts from a
tile grid that is already made (tests, or a grid saved by ``cscvision tile``).

Reading overlaps compute. With ``workers > 0`` and ``reader="threads"`` (the default) a
pool of threads in this process fills each batch (the slide readers are thread-safe and
their decoders release the GIL), one batch ahead of the model, with no copies between
processes. With ``reader="processes"``, a DataLoader's worker processes each open the
slide once and return *whole batches* (uint8 [B, 3, H, W] in channels-last memory, with
their level-0 ``xy`` and tile indices); moving single tiles between processes costs more
than decoding them. Measured (``scripts/bench_infer.py``): threads were as fast or faster
on 2 CPU cores (ResNet-18 bf16 95 % of the model alone either way; small_cnn 83 % vs 77 %)
and on an H200 with 12 readers (6,600 vs 5,250 tiles/s), with flat memory.

Normalisation ``(x / 255 - mean) / std`` and the sigmoid run in the main process, on the
model's device, with channels-last memory and, with ``amp``, bfloat16 autocast on CPUs
that support it or mixed precision on GPUs.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cscvision.core.geometry import area_fraction
from cscvision.core.validate import check_flags
from cscvision.inference.settings import READERS, InferSettings
from cscvision.inference.stitch import choose_sub, map_layout, stitch
from cscvision.inference.trust import (
    card_stain,
    check_uncertainty,
    has_ood,
    ood_scorer,
    run_with_ood,
    scored_ensemble,
    scored_with_uncertainty,
    split_trust,
    trust_columns,
)
from cscvision.models.card import ModelCard
from cscvision.models.ensemble import LoadedEnsemble
from cscvision.models.export import LoadedModel
from cscvision.outputs.prediction import SlidePrediction
from cscvision.slides.grid import GridSpec, TileGrid, detect_tissue, make_grid
from cscvision.slides.info import ON_CORRUPT_TILE
from cscvision.slides.slide import Slide, SlideError, open_slide
from cscvision.slides.slide_stains import needs_source, path_stains, slide_stains, stain_record
from cscvision.slides.stain import StainReference, normalise_batch
from cscvision.slides.tilebatches import (
    TileBatches,
    autocast,
    channels_last,
    cpu_supports_bf16,
    process_batches,
    resolve_device,
    threaded_batches,
)

__all__ = [
    "PreparedSlide",
    "TileBatches",
    "TileScorer",
    "assemble_prediction",
    "cpu_supports_bf16",
    "drop_corrupt_tiles",
    "predict_grid",
    "predict_slide",
    "predict_tiles",
    "prepare_slide",
    "resolve_device",
]


class TileScorer:
    """The model as inference runs it: uint8 tiles [B, 3, H, W] → per-tile outputs [B, W]
    (probabilities, scores in the card's units, or a MIL model's per-tile parts: the
    model kind's :meth:`~cscvision.models.kinds.ModelKind.tile_outputs`).

    Moves the net to ``device`` (eval mode, channels-last where that is faster), applies
    ``(x / 255 - mean) / std`` and autocast with ``amp``. A card's Macenko/Vahadane stain
    template needs the stains of the slide being scored in ``source``
    (:func:`~cscvision.slides.slide_stains.slide_stains`; :func:`predict_tiles` sets it);
    left None, tiles are unmixed with the template's own stains.
    """

    def __init__(
        self,
        model: LoadedModel,
        *,
        device: str | torch.device = "cpu",
        amp=False,
        uncertainty: str | None = None,
    ):
        self.device = resolve_device(device)
        card = model.card
        self.memory = (
            torch.channels_last
            if channels_last(self.device, card.tile_px)
            else torch.contiguous_format
        )
        self.net = model.net.to(self.device).eval().to(memory_format=self.memory)
        self.mean = torch.tensor(card.mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(card.std, device=self.device).view(1, 3, 1, 1) * 255
        self.amp = amp
        self.card = card
        self.kind = model.kind
        self.model = model
        self.ood = ood_scorer(model)
        self.ood = self.ood.to(self.device) if self.ood is not None else None
        self.uncertainty = check_uncertainty(model, uncertainty)
        self.stain = card_stain(card)  # the template the model was trained with, or None
        # the stains of the slide being scored (slides.slide_stains), set per slide
        self.source: StainReference | None = None
        # appended after the outputs (inference.trust): the OOD ratio, std_<t>, mi_<t>
        self.trust = trust_columns(card, ood=self.ood is not None, uncertainty=uncertainty)

    def __call__(self, image: torch.Tensor) -> np.ndarray:
        """Per-tile outputs [B, W] (with ``uncertainty``: the predictive mean)."""
        rows = self.scored(image)
        return rows[:, : rows.shape[1] - len(self.trust)]

    def scored(self, image: torch.Tensor) -> np.ndarray:
        """Per-tile outputs [B, W], then the trust columns ``self.trust`` [B, K]."""
        with torch.inference_mode(), autocast(self.device, self.amp):
            x = image.to(self.device, non_blocking=True)
            if self.stain is not None:
                x = normalise_batch(x, self.stain, source=self.source)
            x = ((x.float() - self.mean) / self.std).contiguous(memory_format=self.memory)
            if isinstance(self.model, LoadedEnsemble):
                return scored_ensemble(self, x)
            if self.uncertainty is not None:
                return scored_with_uncertainty(self, x)
            if self.ood is None:
                return self.kind.tile_outputs(self.card, self.net(x).float())
            logits, ratio = run_with_ood(self.net, x, self.ood)
            return np.column_stack([self.kind.tile_outputs(self.card, logits), ratio])


def predict_tiles(
    grid: TileGrid,
    model: LoadedModel,
    *,
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device = "cpu",
    amp: bool = False,
    reader: str = "threads",
    progress: bool = True,
    dataset: TileBatches | None = None,
    decode: str = "cpu",
    on_corrupt_tile: str = "fail",
    uncertainty: str | None = None,
    stain_source: StainReference | None = None,
) -> np.ndarray:
    """Sigmoid probabilities float32[N, T] for the tiles of ``grid``, in grid order, then
    the trust columns (:func:`cscvision.inference.trust.trust_columns`) if any.

    ``workers`` > 0 reads ahead of the model in that many DataLoader processes
    (``reader="processes"``) or threads of this process (``reader="threads"``). A tile
    that cannot be decoded raises :class:`CorruptTileError`, or with
    ``on_corrupt_tile="skip"`` gets a row of NaN.
    ``dataset``: the grid's batches, some perhaps read already (:func:`prepare_slide`).
    ``decode``: ``gpu`` decodes stored JPEG tiles in batches on the model's device (on a
    CPU device, with torch's CPU decoder: the same path), ``auto`` does so on CUDA only,
    ``cpu`` never; slides the device path does not serve are read on the CPU.
    ``stain_source``: the slide's own stains for a Macenko/Vahadane card template (fitted
    on the slide here when not given: :func:`~cscvision.slides.slide_stains.slide_stains`).
    """
    if reader not in READERS:
        raise ValueError(f"reader {reader!r}: choose one of {READERS}")
    if on_corrupt_tile not in ON_CORRUPT_TILE:
        raise ValueError(f"on_corrupt_tile {on_corrupt_tile!r}: choose one of {ON_CORRUPT_TILE}")
    scorer = TileScorer(model, device=device, amp=amp, uncertainty=uncertainty)
    scorer.source = stain_source or grid_stains(grid, scorer.stain)
    width = output_width(model) + len(scorer.trust)
    probs = np.full((len(grid), width), np.nan, np.float32)
    corrupt = np.zeros(len(grid), bool)
    dataset = dataset or TileBatches(grid, batch_size)
    in_process = workers == 0 or reader == "threads"  # no CUDA in DataLoader processes
    if in_process and (decode == "gpu" or (decode == "auto" and scorer.device.type == "cuda")):
        dataset.decode_device = scorer.device
    if workers > 0 and reader == "processes":
        dataset.ready.clear()  # read again by the workers: no tensors pickled to them
    if workers > 0 and reader == "threads":
        batches = threaded_batches(dataset, workers, scorer.device)
    else:
        batches = process_batches(dataset, workers, scorer.device)
    bar = tqdm(total=len(grid), desc=grid.slide_id, unit="tile", leave=False, disable=not progress)
    try:
        for batch in batches:
            if batch["errors"] and on_corrupt_tile == "fail":
                raise batch["errors"][0]
            index = batch["index"].numpy()
            probs[index] = scorer.scored(batch["image"])
            corrupt[index] = batch["corrupt"].numpy()
            bar.update(len(index))
    finally:
        bar.close()
        dataset.close()
    probs[corrupt] = np.nan
    if np.isnan(probs[~corrupt]).any():
        raise RuntimeError(f"{grid.slide_path}: some tiles got no prediction (NaN)")
    return probs


def grid_stains(grid: TileGrid, template: StainReference | None) -> StainReference | None:
    """The stains of ``grid``'s slide for normalising to ``template`` (None: none needed)."""
    if not needs_source(template):
        return None
    return path_stains(grid.slide_path, template, grid.slide_mpp)


def output_width(model: LoadedModel) -> int:
    """Columns the net gives per tile: one per target, or a MIL model's per-tile parts."""
    return model.kind.output_width(model.card)


def assemble_prediction(
    grid: TileGrid,
    probs: np.ndarray,
    *,
    targets: tuple[str, ...],
    thumb: np.ndarray,
    mask: np.ndarray,
    sub: int | None = None,
    seconds: float = 0.0,
    predict_seconds: float = 0.0,
    device: str = "cpu",
    amp: bool = False,
    trust: dict[str, np.ndarray] | None = None,
) -> SlidePrediction:
    """Stitch tile probabilities ``probs`` [N, T] of ``grid`` into a :class:`SlidePrediction`
    (pure: no model, no slide). ``mask`` is the tissue mask over the whole slide; ``trust``
    per-tile trust columns (OOD, uncertainty), stitched like the scores."""
    layout = map_layout(
        grid.origin_l0,
        grid.shape(),
        tile_l0=grid.plan.tile_l0,
        stride_l0=grid.stride_l0,
        sub=sub or choose_sub(grid.spec.overlap),
    )
    mask_scale = mask.shape[1] / grid.dimensions[0]
    trust = trust or {}
    trust_maps = {}
    if trust:
        stacked = stitch(grid.cells(), np.column_stack(list(trust.values())), layout)
        trust_maps = dict(zip(trust, stacked, strict=True))
    mask_px_um = grid.slide_mpp / mask_scale
    return SlidePrediction(
        grid=grid,
        targets=tuple(targets),
        probs=np.asarray(probs, np.float32),
        maps=stitch(grid.cells(), probs, layout),
        tissue_map=area_fraction(mask, mask_scale, layout.transform, layout.shape),
        map_transform=layout.transform,
        thumb=thumb,
        mask=mask,
        mask_scale=mask_scale,
        tissue_mm2=float(mask.sum()) * mask_px_um * mask_px_um / 1e6,
        seconds=seconds,
        predict_seconds=predict_seconds,
        device=device,
        amp=amp,
        trust={k: np.asarray(v, np.float32) for k, v in trust.items()},
        trust_maps=trust_maps,
    )


def predict_grid(
    grid: TileGrid,
    model: LoadedModel,
    *,
    thumb: np.ndarray,
    mask: np.ndarray,
    batch_size: int = 64,
    workers: int = 0,
    device: str | torch.device = "cpu",
    amp: bool = False,
    reader: str = "threads",
    progress: bool = True,
    sub: int | None = None,
    started: float | None = None,
    batches: TileBatches | None = None,
    decode: str = "cpu",
    on_corrupt_tile: str = "fail",
    uncertainty: str | None = None,
    stain_source: StainReference | None = None,
) -> SlidePrediction:
    """Score the tiles of ``grid`` and stitch them; ``mask`` is the tissue mask the grid
    came from (covering the whole slide), ``thumb`` its thumbnail. With
    ``on_corrupt_tile="skip"`` undecodable tiles are dropped from the grid and listed in
    ``corrupt_xy_l0``. ``stain_source``: as :func:`predict_tiles`."""
    started = time.perf_counter() if started is None else started
    t0 = time.perf_counter()
    template = card_stain(model.card)
    stain_source = stain_source or grid_stains(grid, template)
    kw = dict(batch_size=batch_size, workers=workers, device=device, amp=amp, reader=reader)
    kw.update(decode=decode, uncertainty=uncertainty, stain_source=stain_source)
    probs = predict_tiles(
        grid, model, progress=progress, dataset=batches, on_corrupt_tile=on_corrupt_tile, **kw
    )
    predict_seconds = time.perf_counter() - t0
    grid, probs, corrupt_xy = drop_corrupt_tiles(grid, probs)
    names = trust_columns(model.card, ood=has_ood(model), uncertainty=uncertainty)
    probs, trust = split_trust(probs, names)
    probs, extra = model.kind.slide_outputs(model.net, model.card, probs)
    pred = assemble_prediction(
        grid,
        probs,
        targets=tuple(model.card.targets),
        thumb=thumb,
        mask=mask,
        sub=sub,
        predict_seconds=predict_seconds,
        device=str(resolve_device(device)),
        amp=amp,
        trust=trust,
    )
    seconds = time.perf_counter() - started
    stain = stain_record(stain_source, template) if template is not None else None
    return dataclasses.replace(
        pred, seconds=seconds, corrupt_xy_l0=corrupt_xy, stain=stain, **extra
    )


def drop_corrupt_tiles(
    grid: TileGrid, probs: np.ndarray
) -> tuple[TileGrid, np.ndarray, np.ndarray]:
    """The grid and probabilities without the tiles skipped as corrupt (rows of NaN), and
    those tiles' level-0 corners int[K, 2]; a slide with no readable tile is an error."""
    bad = np.isnan(probs).any(axis=1)
    if not bad.any():
        return grid, probs, np.zeros((0, 2), np.int64)
    if bad.all():
        raise SlideError(f"{grid.slide_path}: every one of its {len(grid)} tiles is corrupt")
    kept = dataclasses.replace(grid, xy_l0=grid.xy_l0[~bad], tissue=grid.tissue[~bad])
    return kept, probs[~bad], np.asarray(grid.xy_l0[bad], np.int64)


@dataclasses.dataclass
class PreparedSlide:
    """A slide ready to score: its grid, thumbnail and mask, and its first batches read."""

    grid: TileGrid
    thumb: np.ndarray
    mask: np.ndarray
    batches: TileBatches
    started: float  # perf_counter when its preparation began
    stain_source: StainReference | None = None  # its own stains (Macenko/Vahadane card)


# predict_slide's keywords before the settings record (0.2): still read, with a warning
_SETTINGS_KEYWORDS = ("overlap", "batch_size", "workers", "device", "amp", "min_tissue",
                      "mask_mpp", "reader", "decode", "on_corrupt_tile")  # fmt: skip


def _settings(settings: InferSettings | None, legacy: dict[str, Any], caller: str) -> InferSettings:
    """``settings`` (default :class:`InferSettings`) with the old keywords applied."""
    unknown = sorted(set(legacy) - set(_SETTINGS_KEYWORDS))
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword argument(s) {unknown}")
    settings = settings or InferSettings()
    if not legacy:
        return settings
    warnings.warn(
        f"{caller}(..., {', '.join(f'{k}=' for k in legacy)}) is deprecated: pass "
        f"{caller}(slide, model, InferSettings(...))",
        DeprecationWarning,
        stacklevel=3,
    )
    if isinstance(legacy.get("device"), torch.device):
        legacy["device"] = str(legacy["device"])
    return check_flags(InferSettings, **{**dataclasses.asdict(settings), **legacy})


def prepare_slide(
    slide: Slide | str | Path,
    card: ModelCard,
    settings: InferSettings | None = None,
    *,
    slide_mpp: float | None = None,
    read_ahead: int = 0,
    **legacy: Any,
) -> PreparedSlide:
    """Detect tissue on ``slide`` (an open :class:`Slide`, or a path opened here with
    ``slide_mpp``), make the grid at the card's µm/px and tile size and read its first
    ``read_ahead`` batches; raises ``SlideError`` for a slide with no tile reaching
    ``settings.min_tissue``. What a prefetch thread does for the next slide. An open slide
    stays open and its batches read from it."""
    started = time.perf_counter()
    settings = _settings(settings, legacy, "prepare_slide")
    spec = GridSpec(mpp=card.mpp, tile_px=card.tile_px, overlap=settings.overlap,
                    min_tissue=settings.min_tissue, mask_mpp=settings.mask_mpp)  # fmt: skip
    template, source = card_stain(card), None
    if isinstance(slide, Slide):
        thumb, mask = detect_tissue(slide, spec.mask_mpp)
        grid = make_grid(slide, spec, mask=mask)
        source = slide_stains(slide, template) if len(grid) else None
    else:
        with open_slide(slide, mpp=slide_mpp) as opened:
            thumb, mask = detect_tissue(opened, spec.mask_mpp)
            grid = make_grid(opened, spec, mask=mask)
            source = slide_stains(opened, template) if len(grid) else None
    if len(grid) == 0:
        raise SlideError(
            f"{grid.slide_path}: no tile reaches --min-tissue {settings.min_tissue} (tissue "
            f"covers {mask.mean():.1%} of the thumbnail); lower --min-tissue or check the slide"
        )
    batches = TileBatches(grid, settings.batch_size)
    if isinstance(slide, Slide):
        batches.use_slide(slide)
    for index in range(min(read_ahead, len(batches))):
        batches.ready[index] = batches.read(index)
    return PreparedSlide(grid, thumb, mask, batches, started, source)


def predict_slide(
    slide: Slide | str | Path,
    model: LoadedModel,
    settings: InferSettings | None = None,
    *,
    slide_mpp: float | None = None,
    progress: bool = True,
    prepared: PreparedSlide | None = None,
    **legacy: Any,
) -> SlidePrediction:
    """Score one slide with a model: tile it at the card's µm/px and tile size, score every
    tissue tile and blend the tiles into maps.

    Parameters
    ----------
    slide
        An open :class:`~cscvision.slides.slide.Slide` (``open_slide``; opened once for
        tissue, grid and tiles, left open), or a slide file's path.
    model
        A loaded model (``load_model``).
    settings
        How the slide is read and scored (:class:`InferSettings`: overlap, batch size,
        readers, device, amp, tissue, decoder; the defaults of ``cscvision infer``'s
        flags). The 0.1.0 keywords (``overlap=``, ``batch_size=``, ...) still work, with a
        ``DeprecationWarning``.
    slide_mpp
        Level-0 µm/px for a slide (path) whose metadata gives none.
    progress
        Show a progress bar.
    prepared
        This slide made ready ahead (``prepare_slide``).

    Returns
    -------
    SlidePrediction
        The grid, tile probabilities float[N, T], the blended maps [T, rows, cols] with their
        level-0 transform, the tissue map and the thumbnail.

    Raises
    ------
    SlideError
        The slide cannot be read or has no tile with ``min_tissue`` tissue.

    Examples
    --------
    >>> model = cscvision.load_model("demo")
    >>> with cscvision.open_slide("slide.svs") as slide:
    ...     pred = cscvision.predict_slide(slide, model, cscvision.InferSettings(device="cpu"))
    >>> pred.probs.shape, pred.maps.shape
    """
    settings = _settings(settings, legacy, "predict_slide")
    if prepared is None:
        prepared = prepare_slide(slide, model.card, settings, slide_mpp=slide_mpp)
    return predict_grid(
        prepared.grid,
        model,
        thumb=prepared.thumb,
        mask=prepared.mask,
        batch_size=settings.batch_size,
        workers=settings.workers,
        device=settings.device,
        amp=settings.amp,
        reader=settings.reader,
        progress=progress,
        started=prepared.started,
        batches=prepared.batches,
        decode=settings.decode,
        on_corrupt_tile=settings.on_corrupt_tile,
        uncertainty=settings.uncertainty,
        stain_source=prepared.stain_source,
    )

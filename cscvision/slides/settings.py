"""How slides are read for a batch: one record, one set of ranges, for every command.

:class:`ReadSettings` holds what ``cscvision tile``, ``infer`` and ``features`` share
(tissue, grid, reader, decoder, device, batch); ``infer`` and ``features`` extend it
(:class:`cscvision.inference.settings.InferSettings`,
:class:`cscvision.features.extract.ExtractSettings`). Each field carries its default, its
range and its flag's help (``description``), so the command-line flags are generated from
it (:func:`cscvision.cli.common.add_settings_args`) and the Python API takes the same
defaults. A value out of range is refused when the record is made, with the flag's name
(:func:`cscvision.core.validate.check_flags`).

Adding a setting is one field here or in a subclass: its flag, its check and its default
in the API follow.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from cscvision.core.validate import FLAG_CONFIG
from cscvision.slides.info import MPP_RANGE
from cscvision.slides.tissue import DEFAULT_MASK_MPP

MASK_MPP_RANGE = (1.0, 100.0)  # tissue thumbnails: never level 0, never a few pixels
TILE_PX_RANGE = (8, 8192)
MAX_OVERLAP = 0.75  # beyond, 16x the tiles and more for maps no smoother

# The ranges, one place: the training config's grid and the commands' flags use these.
Mpp = Annotated[float, Field(ge=MPP_RANGE[0], le=MPP_RANGE[1])]
TilePx = Annotated[int, Field(ge=TILE_PX_RANGE[0], le=TILE_PX_RANGE[1])]
Fraction = Annotated[float, Field(ge=0, le=1)]
MaskMpp = Annotated[float, Field(ge=MASK_MPP_RANGE[0], le=MASK_MPP_RANGE[1])]
Device = Annotated[str, Field(pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")]
DEVICES = ("auto", "cpu", "cuda")  # the flag's choices (the API also takes cuda:N, mps)


def flag(
    default: object,
    help: str,
    *,
    group: str | None = None,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    **kw: object,
) -> object:
    """A settings field whose flag says ``help`` (``%(default)s`` shows the default);
    ``group`` names the flags' section in ``--help``, ``choices`` the flag's choices where
    the field takes more (a pattern), ``metavar`` the value's name in ``--help``."""
    given = {"group": group, "choices": choices, "metavar": metavar}
    extra = {k: v for k, v in given.items() if v is not None}
    return Field(default, description=help, json_schema_extra=extra or None, **kw)


@dataclass(frozen=True, config=FLAG_CONFIG)
class ReadSettings:
    """How the slides of a batch are read: tissue, grid, readers, decoder, device, batch."""

    min_tissue: Fraction = flag(
        0.5, "tissue fraction a tile needs to be kept and scored (default %(default)s)"
    )
    mask_mpp: MaskMpp = flag(
        DEFAULT_MASK_MPP,
        f"µm/px of the tissue-detection thumbnail, {MASK_MPP_RANGE[0]:g} to "
        f"{MASK_MPP_RANGE[1]:g} (default %(default)s)",
    )
    overlap: float = flag(
        0.0,
        f"fraction of a tile shared with its neighbour, 0 to {MAX_OVERLAP} (default "
        "%(default)s); 0.5 gives smoother maps for 4x the tiles",
        ge=0,
        le=MAX_OVERLAP,
    )
    batch_size: int = flag(64, "tiles per batch (default %(default)s)", ge=1, le=65536)
    workers: int = flag(
        2,
        "readers working ahead of the model (default %(default)s; 0 reads between batches)",
        ge=0,
        le=256,
    )
    reader: Literal["processes", "threads"] = flag(
        "threads",
        "readers are threads of this process filling each batch (default; measured as fast "
        "or faster on CPU and GPU, memory flat), or DataLoader processes returning whole "
        "batches",
    )
    decode: Literal["auto", "cpu", "gpu"] = flag(
        "cpu",
        "where stored JPEG tiles are decoded: cpu (default), gpu (batched on the CUDA "
        "device, for JPEG-tiled TIFF/SVS slides; others fall back to cpu), or auto (gpu when "
        "CUDA is there and the slide supports it)",
    )
    on_corrupt_tile: Literal["fail", "skip"] = flag(
        "fail",
        "a tile whose stored data cannot be decoded fails its slide, naming the level and "
        "level-0 x, y (default), or is skipped: dropped from the outputs and listed in the "
        "slide's record (corrupt_tiles)",
    )
    device: Device = flag(
        "auto",
        "where the model runs: auto (CUDA when there is one; default), cpu or cuda",
        choices=DEVICES,
    )
    amp: bool = flag(False, "bfloat16 autocast on CPUs that support it, mixed precision on GPUs")

    def check(self) -> None:
        """Kept for callers of the dataclass version: the values were checked when made."""

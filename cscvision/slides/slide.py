"""Slide reading: one small reader over OpenSlide with a µm/px policy and a fast JPEG path.

Coordinates are always level-0 pixels ``(x, y)``, as OpenSlide defines them.
"""

from __future__ import annotations

import csv
import math
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import openslide
from PIL import Image

from cscvision.slides.formats import check_plausible_size, open_dicom_folder
from cscvision.slides.info import (
    MEMORY_BUDGET_BYTES,
    MPP_FROM_OPENSLIDE,
    MPP_FROM_OVERRIDE,
    MPP_FROM_TIFF,
    MPP_TOLERANCE,
    CorruptTileError,
    SlideError,
    SlideInfo,
    check_buffer,
    describe_mpp_range,
    mpp_is_plausible,
)

_TIFF_UNIT_UM = {2: 25_400.0, 3: 10_000.0}  # ResolutionUnit: 2 = inch, 3 = centimetre


@dataclass(frozen=True)
class ReadPlan:
    """How to read tiles of ``tile_px`` at ``mpp``: level, size read there, level-0 side."""

    mpp: float
    tile_px: int
    level: int
    downsample: float
    read_px: int  # pixels read at ``level`` before resizing to ``tile_px``
    tile_l0: float  # tile side in level-0 pixels

    @property
    def resize_factor(self) -> float:
        return self.tile_px / self.read_px


def plan_read(info: SlideInfo, *, mpp: float, tile_px: int) -> ReadPlan:
    """Choose the level and read size for tiles of ``tile_px`` pixels at ``mpp`` µm/px."""
    level = info.best_level_for_mpp(mpp)
    factor = mpp / info.level_mpp(level)
    whole = max(1, round(factor))
    if abs(factor / whole - 1) <= MPP_TOLERANCE:
        # Within tolerance of a whole factor (0.2527 µm/px x 2 for 0.5): read exactly that
        # many pixels, so resizing is a box reduction, the way pyramid levels are made.
        read_px = tile_px * whole
    else:
        read_px = max(1, round(tile_px * factor))
    downsample = info.level_downsamples[level]
    return ReadPlan(
        mpp=mpp,
        tile_px=tile_px,
        level=level,
        downsample=downsample,
        read_px=read_px,
        tile_l0=read_px * downsample,
    )


class SlideReader(Protocol):
    """What the rest of cscvision needs from a slide; an in-memory array can stand in."""

    info: SlideInfo

    def read_region(
        self, xy_l0: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray: ...

    def thumbnail(self, mpp: float) -> np.ndarray: ...


# --- µm/px policy -----------------------------------------------------------------------


def load_mpp_overrides(csv_path: str | Path) -> dict[str, float]:
    """Read an override CSV with columns ``slide,mpp``; slides match by file name or stem."""
    csv_path = Path(csv_path)
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as f:  # Excel writes a BOM
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise SlideError(f"{csv_path}: cannot read the µm/px override CSV ({e})") from e
    if not rows or not {"slide", "mpp"} <= set(rows[0]):
        raise SlideError(f"{csv_path}: the µm/px override CSV needs the columns 'slide,mpp'")
    overrides: dict[str, float] = {}
    for line, row in enumerate(rows, start=2):
        try:
            value = float(row["mpp"])
        except (TypeError, ValueError):  # TypeError: a short row has no mpp
            raise SlideError(f"{csv_path}:{line}: mpp {row['mpp']!r} is not a number") from None
        if not mpp_is_plausible(value):
            raise SlideError(
                f"{csv_path}:{line}: mpp {value:g} lies outside the plausible "
                f"{describe_mpp_range()}; give the slide's level-0 µm/px"
            )
        overrides[Path((row["slide"] or "").strip()).name] = value
    return overrides


def override_for(path: str | Path, overrides: dict[str, float]) -> float | None:
    """The override for a slide, matched by file name, then by stem."""
    path = Path(path)
    if path.name in overrides:
        return overrides[path.name]
    stems = {Path(name).stem: v for name, v in overrides.items()}
    return stems.get(path.stem)


def _mpp_from_tiff_tags(path: str) -> float | None:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            unit = tags.get("ResolutionUnit")
            xres = tags.get("XResolution")
            if unit is None or xres is None or int(unit.value) not in _TIFF_UNIT_UM:
                return None
            num, den = xres.value
            if num <= 0 or den <= 0:
                return None
            return _TIFF_UNIT_UM[int(unit.value)] * den / num
    except Exception:  # not a TIFF, or unreadable tags: no µm/px from this source
        return None


def _mpp_from_openslide(properties: dict[str, str]) -> float | None:
    """The vendor's µm/px as OpenSlide reports it; NaN when it is not a number."""
    mpp_x = properties.get(openslide.PROPERTY_NAME_MPP_X)
    mpp_y = properties.get(openslide.PROPERTY_NAME_MPP_Y)
    if not mpp_x:
        return None
    try:
        x = float(mpp_x)
        y = float(mpp_y) if mpp_y else x
    except ValueError:
        return math.nan
    return (x + y) / 2


# OpenSlide drivers whose µm/px is the TIFF resolution tags, not a scanner's own record.
_MPP_FROM_TIFF_TAGS_VENDORS = frozenset({"generic-tiff"})


def _mpp_from_metadata(path: str, properties: dict[str, str]) -> tuple[float, str] | None:
    # Plain TIFFs often carry 72-1200 dpi (353-21 µm/px) from an image editor: not a
    # microscope, so TIFF tags outside MPP_RANGE count as no µm/px at all, whether
    # OpenSlide (generic-tiff) or tifffile read them. A scanner's own value is kept, to be
    # refused when implausible.
    vendor_mpp = _mpp_from_openslide(properties)
    from_tags = properties.get(openslide.PROPERTY_NAME_VENDOR) in _MPP_FROM_TIFF_TAGS_VENDORS
    if vendor_mpp is not None and (mpp_is_plausible(vendor_mpp) or not from_tags):
        return vendor_mpp, MPP_FROM_OPENSLIDE
    if vendor_mpp is not None:
        return None
    tiff_mpp = _mpp_from_tiff_tags(path)
    if tiff_mpp is not None and mpp_is_plausible(tiff_mpp):
        return tiff_mpp, MPP_FROM_TIFF
    return None


def resolve_mpp(path: str, properties: dict[str, str], override: float | None) -> tuple[float, str]:
    """µm/px of level 0: OpenSlide metadata, else TIFF tags, else the override.

    The override fills in what the slide does not say, so one ``--slide-mpp`` over a mixed
    batch cannot replace a scanner's own value; a disagreeing override is warned about.
    Every value must lie in ``MPP_RANGE``: an implausible override is an error, and so is
    implausible vendor metadata unless an override replaces it. Nothing at all is an error
    naming the slide and both fixes: never a silent default.
    """
    if override is not None and not mpp_is_plausible(override):
        raise SlideError(
            f"{path}: µm/px override {override:g} lies outside the plausible "
            f"{describe_mpp_range()}; give the slide's level-0 µm/px"
        )
    found = _mpp_from_metadata(path, properties)
    if found is not None and not mpp_is_plausible(found[0]):
        said = f"{path}: the slide's metadata says {found[0]:g} µm/px, outside the plausible "
        if override is None:
            raise SlideError(
                f"{said}{describe_mpp_range()} (a wrong or corrupt header); pass --slide-mpp "
                "VALUE with the true level-0 µm/px, or --mpp-override CSV for a batch"
            )
        warnings.warn(
            f"{said}{describe_mpp_range()}; the override {override} is used", stacklevel=2
        )
        return float(override), MPP_FROM_OVERRIDE
    if found is not None:
        if override is not None and abs(override / found[0] - 1) > MPP_TOLERANCE:
            warnings.warn(
                f"{path}: the slide says {found[0]:.4f} µm/px ({found[1]}); "
                f"the override {override} is not used",
                stacklevel=2,
            )
        return found
    if override is not None:
        return float(override), MPP_FROM_OVERRIDE
    raise SlideError(
        f"{path}: no µm/px in the slide metadata or TIFF resolution tags; pass --slide-mpp "
        "VALUE for this slide, or --mpp-override CSV (columns slide,mpp) for a batch"
    )


# --- the reader --------------------------------------------------------------------------


def _bounds(props: dict[str, str], dimensions: tuple[int, int]) -> tuple[int, int, int, int]:
    def prop(name: str, default: int) -> int:
        value = props.get(name)
        return int(value) if value not in (None, "") else default

    return (
        prop(openslide.PROPERTY_NAME_BOUNDS_X, 0),
        prop(openslide.PROPERTY_NAME_BOUNDS_Y, 0),
        prop(openslide.PROPERTY_NAME_BOUNDS_WIDTH, dimensions[0]),
        prop(openslide.PROPERTY_NAME_BOUNDS_HEIGHT, dimensions[1]),
    )


def _rgba_to_rgb_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite OpenSlide's RGBA (not premultiplied) onto white: transparent = glass."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _open_backend(path: str) -> openslide.AbstractSlide:
    """OpenSlide for slides (a folder: a DICOM WSI); its PIL-backed ImageSlide for plain
    images OpenSlide refuses (untiled TIFFs, for example)."""
    if Path(path).is_dir():
        return open_dicom_folder(path)
    try:
        return openslide.OpenSlide(path)
    except openslide.OpenSlideUnsupportedFormatError:
        pass
    except openslide.OpenSlideError as e:
        raise SlideError(f"{path}: corrupt or unreadable slide ({e})") from None
    try:
        return openslide.ImageSlide(path)
    except Image.DecompressionBombError as e:
        raise SlideError(
            f"{path}: {e}; an image this large must be a tiled, pyramidal slide (SVS, TIFF)"
        ) from None
    except (OSError, ValueError):
        raise SlideError(f"{path}: not a slide or image format OpenSlide can open") from None


def resize_tile(rgb: np.ndarray, tile_px: int) -> np.ndarray:
    """Antialiased resize of a square tile to ``tile_px``: the whole-number part of the
    factor by box averaging (``Image.reduce``, how pyramid levels are built, ~10x faster
    than Lanczos), the rest with Lanczos. 448 -> 224 px is one ``reduce(2)``."""
    image = Image.fromarray(rgb)
    factor = rgb.shape[0] // tile_px
    if factor >= 2:
        image = image.reduce(factor)
    if image.size != (tile_px, tile_px):
        image = image.resize((tile_px, tile_px), Image.Resampling.LANCZOS)
    return np.asarray(image)


class Slide:
    """An open whole-slide image. Use as a context manager; see :func:`open_slide`."""

    def __init__(
        self,
        path: str | Path,
        *,
        mpp: float | None = None,
        fast: bool = True,
        memory_budget: int = MEMORY_BUDGET_BYTES,
    ):
        self.path = str(path)
        if not Path(self.path).exists():
            raise SlideError(f"{self.path}: file not found")
        self.memory_budget = int(memory_budget)
        self._osr = _open_backend(self.path)
        self._stale: list[openslide.AbstractSlide] = []  # handles replaced after an error
        self._reopen_lock = threading.Lock()
        props = dict(self._osr.properties)
        try:
            check_plausible_size(self.path, tuple(self._osr.dimensions))
            slide_mpp, source = resolve_mpp(self.path, props, mpp)
        except SlideError:
            self._osr.close()
            raise
        power = props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
        dims = tuple(self._osr.dimensions)
        self.info = SlideInfo(
            path=self.path,
            vendor=props.get(openslide.PROPERTY_NAME_VENDOR) or "image",
            dimensions=dims,  # type: ignore[arg-type]
            level_dimensions=tuple(tuple(d) for d in self._osr.level_dimensions),
            level_downsamples=tuple(float(d) for d in self._osr.level_downsamples),
            mpp=slide_mpp,
            mpp_source=source,
            objective_power=float(power) if power else None,
            bounds=_bounds(props, dims),  # type: ignore[arg-type]
        )
        self.properties = props
        self._fast = None
        if fast:
            from cscvision.slides.fastread import StoredTileReader

            self._fast = StoredTileReader.open(self.path, self.info)

    # context manager -------------------------------------------------------------------
    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fast is not None:
            self._fast.close()
            self._fast = None
        for handle in self._stale:
            handle.close()
        self._stale = []
        self._osr.close()

    # reading ---------------------------------------------------------------------------
    @property
    def uses_fast_path(self) -> bool:
        return self._fast is not None

    def read_region(self, xy_l0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 ``[h, w, 3]`` of ``size`` pixels at ``level``; transparent areas white.

        Raises :class:`CorruptTileError` where the stored data cannot be decoded, and
        ``SlideError`` for a region over the memory budget (before allocating it)."""
        what = f"a {size[0]} x {size[1]} px region"
        check_buffer(self.path, what, 4 * size[0] * size[1], self.memory_budget)
        if self._fast is not None:
            rgb = self._fast.read_region(xy_l0, level, size)
            if rgb is not None:
                return rgb
        return self.read_region_openslide(xy_l0, level, size)

    def read_region_openslide(
        self, xy_l0: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        osr = self._osr
        try:
            region = osr.read_region((int(xy_l0[0]), int(xy_l0[1])), level, size)
        except openslide.OpenSlideError as e:
            self._reopen(osr)  # OpenSlide errors are sticky: later reads need a new handle
            raise CorruptTileError(self.path, level, xy_l0, str(e)) from None
        return _rgba_to_rgb_on_white(np.asarray(region))

    def _reopen(self, failed: openslide.AbstractSlide) -> None:
        """Replace a handle in OpenSlide's error state; other threads may still hold the
        old one, so it is closed with the slide."""
        with self._reopen_lock:
            if self._osr is failed:
                self._stale.append(failed)
                self._osr = _open_backend(self.path)

    def reserve_raster(self, plan: ReadPlan) -> None:
        """Say a grid is about to be read with ``plan`` in raster order: the fast path's
        cache then keeps the stored rows the next grid row reuses, so each stored tile is
        decoded once even on levels 100k px wide (at the cost of up to a few hundred MB
        there). Readers of random tiles should not call it."""
        if self._fast is None:
            return
        factor, rest = divmod(plan.read_px, plan.tile_px)
        self._fast.reserve_raster(plan.level, plan.read_px, factor if rest == 0 else 1)

    def read_tile(
        self, xy_l0: tuple[int, int], plan: ReadPlan, out: np.ndarray | None = None
    ) -> np.ndarray:
        """One tile of ``plan.tile_px`` at ``plan.mpp``, resized with antialiasing if needed.

        A whole-factor reduction on the fast path reads stored tiles reduced once each
        (:meth:`StoredTileReader.read_reduced`): the same pixels as reducing the region.
        With ``out`` (uint8 ``[tile_px, tile_px, 3]``, e.g. a slot of a batch) the tile is
        written there and ``out`` returned; a tile that is one stored tile (an aligned grid
        at a level's own µm/px) is then decoded straight into it, with no copy.
        """
        if out is not None:
            side = plan.tile_px
            if out.shape != (side, side, 3) or out.dtype != np.uint8:
                what = f"{out.dtype} {out.shape}"
                raise ValueError(f"out must be uint8 {side} x {side} x 3, not {what}")
            direct = out.flags.c_contiguous and out.flags.writeable
            if self._fast is not None and plan.read_px == side and direct:
                rgb = self._fast.read_region(xy_l0, plan.level, (side, side), out=out)
                if rgb is not None:
                    return out
            out[...] = self.read_tile(xy_l0, plan)
            return out
        factor, rest = divmod(plan.read_px, plan.tile_px)
        if self._fast is not None and factor >= 2 and rest == 0:
            size = (plan.read_px, plan.read_px)
            rgb = self._fast.read_reduced(xy_l0, plan.level, size, factor)
            if rgb is not None:
                return rgb
        rgb = self.read_region(xy_l0, plan.level, (plan.read_px, plan.read_px))
        if plan.read_px != plan.tile_px:
            rgb = resize_tile(rgb, plan.tile_px)
        return rgb

    def thumbnail(self, mpp: float) -> np.ndarray:
        """The whole slide at about ``mpp`` µm/px, read from the nearest pyramid level in strips."""
        w, h = self.info.dimensions
        scale = self.info.mpp / mpp
        out_w, out_h = max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))
        what = f"a {out_w} x {out_h} px thumbnail at {mpp:g} µm/px"
        check_buffer(self.path, what, 3 * out_w * out_h, self.memory_budget)
        level = self._osr.get_best_level_for_downsample(mpp / self.info.mpp)
        lw, lh = self.info.level_dimensions[level]
        ds = self.info.level_downsamples[level]
        rows_per_out = lh / out_h
        # ~2k level rows a strip, fewer where a strip (RGBA read + RGB copy) would not fit.
        budget_rows = min(2048, self.memory_budget // (7 * lw))
        what = f"a thumbnail strip of level {level} ({lw} px wide)"
        check_buffer(self.path, what, 7 * lw * math.ceil(rows_per_out), self.memory_budget)
        strip_out = max(1, int(budget_rows / max(rows_per_out, 1e-9)))
        strips = []
        for oy in range(0, out_h, strip_out):
            oh = min(strip_out, out_h - oy)
            y0 = round(oy * rows_per_out)
            y1 = max(y0 + 1, min(lh, round((oy + oh) * rows_per_out)))
            # The fast path where it applies: the same pixels, without cairo's compositing.
            try:
                rgb = self.read_region((0, round(y0 * ds)), level, (lw, y1 - y0))
            except CorruptTileError as e:
                raise SlideError(f"{self.path}: cannot read a thumbnail ({e.detail})") from None
            if rgb.shape[:2] != (oh, out_w):
                rgb = np.asarray(Image.fromarray(rgb).resize((out_w, oh), Image.Resampling.BOX))
            strips.append(rgb)
        return np.concatenate(strips, axis=0)

    def associated_images(self) -> list[str]:
        return list(self._osr.associated_images)


def open_slide(
    path: str | Path,
    *,
    mpp: float | None = None,
    fast: bool = True,
    memory_budget: int = MEMORY_BUDGET_BYTES,
) -> Slide:
    """Open a whole-slide image for reading, as a context manager.

    Any format OpenSlide opens is a slide (SVS, NDPI, MRXS, SCN, generic tiled TIFF, DICOM
    WSI, plain images); a folder holding one DICOM WSI is one slide. The level-0 µm/px comes
    from the metadata, else the TIFF resolution tags, else ``mpp``; never a silent guess.

    Parameters
    ----------
    path
        The slide file, or the folder of a DICOM WSI.
    mpp
        Level-0 µm/px for a slide whose metadata gives none (0.05–20). A slide that states
        its own keeps it, with a warning if the two disagree.
    fast
        Decode stored JPEG tiles directly where the file allows (same pixels as OpenSlide).
    memory_budget
        Bytes one read may allocate; larger reads are refused before allocating.

    Returns
    -------
    Slide
        The open slide; ``slide.info`` holds its geometry and µm/px. Close it, or use
        ``with``.

    Raises
    ------
    SlideError
        The file is missing, not a slide, corrupt, or states no plausible µm/px (the message
        names the file and the fix, e.g. ``--slide-mpp``).

    Examples
    --------
    >>> with cscvision.open_slide("slide.svs") as slide:
    ...     print(slide.info.dimensions, slide.info.mpp)
    """
    return Slide(path, mpp=mpp, fast=fast, memory_budget=memory_budget)


def openslide_library_version() -> str:
    return getattr(openslide, "__library_version__", "unknown")

"""Readers of multiplex immunofluorescence (mIF) images: channel names, µm/px and planes.

============  ================================================================================
kind          what is read
============  ================================================================================
``ome``       an OME-TIFF (``*.ome.tif[f]``, any writer, pyramid levels in SubIFDs or as more
              pages): channel names from the OME-XML's ``Channel/@Name``, µm/px from
              ``Pixels/@PhysicalSizeX`` (and its unit), levels from tifffile's series
``qptiff``    an Akoya/PerkinElmer ``.qptiff`` (Vectra Polaris, PhenoCycler-Fusion, Phenoimager):
              one page per channel at full resolution, each with a
              ``<PerkinElmer-QPI-ImageDescription>`` XML whose ``<Name>`` is the channel's
              name; µm/px from the pages' resolution tags; reduced levels after the thumbnail
``channels``  a folder of single-channel TIFFs, one per channel, the channel named by the file
              stem (``CD8.tif``); µm/px from each file's OME-XML or resolution tags, and all
              channels must agree on size and µm/px
============  ================================================================================

Planes are read whole, one channel at a time (:meth:`MifImage.plane`), at any pyramid level.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cscvision.core.errors import CscvisionError

KINDS = ("ome", "qptiff", "channels")
_UNIT_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}
_TIFF_SUFFIXES = (".tif", ".tiff")


class MifReadError(CscvisionError, ValueError):
    """An mIF image that cannot be read: the message names the file and the fix."""


@dataclass(frozen=True)
class MifImage:
    """An mIF image: where each channel's pages are, their names, level sizes and µm/px."""

    path: Path
    kind: str
    channels: tuple[str, ...]
    mpp: float  # level-0 µm/px
    level_dimensions: tuple[tuple[int, int], ...]  # (width, height) per level
    files: tuple[Path, ...] = ()  # per channel (kind "channels"); else empty

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.dimensions[0] / self.level_dimensions[level][0]

    def index(self, channel: str) -> int:
        try:
            return self.channels.index(channel)
        except ValueError:
            raise MifReadError(
                f"{self.path}: no channel {channel!r}; channels: {', '.join(self.channels)}"
            ) from None

    def plane(self, channel: int | str, level: int = 0) -> np.ndarray:
        """One channel at one pyramid level, [height, width], the file's dtype."""
        import tifffile

        c = self.index(channel) if isinstance(channel, str) else int(channel)
        if not 0 <= level < len(self.level_dimensions):
            raise MifReadError(
                f"{self.path}: no level {level} (it has {len(self.level_dimensions)})"
            )
        try:
            if self.kind == "channels":
                with tifffile.TiffFile(self.files[c]) as tif:
                    return np.asarray(tif.series[0].levels[level].asarray()).squeeze()
            with tifffile.TiffFile(self.path) as tif:
                series = tif.series[0].levels[level]
                return np.asarray(series.asarray(key=c)).squeeze()
        except (OSError, ValueError, IndexError) as e:
            raise MifReadError(
                f"{self.path}: cannot read channel {c} level {level} ({e})"
            ) from None


def open_mif(path: str | Path, *, mpp: float | None = None) -> MifImage:
    """Open an mIF image: a ``.qptiff``, an OME-TIFF, or a folder of one TIFF per channel.

    ``mpp`` overrides the µm/px of the file (needed when the file gives none)."""
    path = Path(path)
    if path.is_dir():
        return _open_channels(path, mpp)
    if not path.is_file():
        raise MifReadError(f"{path}: no such mIF image (an OME-TIFF, a .qptiff or a folder)")
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if tif.is_qpi:
                return _open_qptiff(path, tif, mpp)
            if tif.is_ome:
                return _open_ome(path, tif, mpp)
    except tifffile.TiffFileError as e:
        raise MifReadError(f"{path}: not a readable TIFF ({e})") from None
    raise MifReadError(
        f"{path}: neither an OME-TIFF nor a .qptiff; convert it (bfconvert, QuPath's OME-TIFF "
        "export) or give a folder of one TIFF per channel"
    )


def _levels(series) -> tuple[tuple[int, int], ...]:
    dims = []
    for level in series.levels:
        axes = level.axes
        dims.append((int(level.shape[axes.index("X")]), int(level.shape[axes.index("Y")])))
    return tuple(dims)


def _open_ome(path: Path, tif, mpp: float | None) -> MifImage:
    root = ET.fromstring(tif.ome_metadata)
    ns = {"ome": root.tag[1:].split("}")[0]} if root.tag.startswith("{") else {}
    q = "ome:" if ns else ""
    pixels = root.find(f"{q}Image/{q}Pixels", ns)
    if pixels is None:
        raise MifReadError(f"{path}: its OME-XML has no Image/Pixels element")
    names = [
        c.get("Name") or f"Channel {i}" for i, c in enumerate(pixels.findall(f"{q}Channel", ns))
    ]
    series = tif.series[0]
    axes = series.axes
    if "C" not in axes and len(names) <= 1:
        pass
    elif "C" not in axes or series.shape[axes.index("C")] != len(names):
        raise MifReadError(
            f"{path}: {len(names)} OME channels but series axes {axes} {series.shape}"
        )
    extra = [a for a in axes if a not in "CYX" and series.shape[axes.index(a)] > 1]
    if extra:
        raise MifReadError(
            f"{path}: axes {''.join(extra)} beyond C, Y, X; export one plane per channel"
        )
    size = pixels.get("PhysicalSizeX")
    found = float(size) * _UNIT_UM.get(pixels.get("PhysicalSizeXUnit", "µm"), 1.0) if size else None
    return MifImage(
        path, "ome", tuple(names), _mpp(path, found, mpp, "PhysicalSizeX"), _levels(series)
    )


def qpi_name(description: str) -> str | None:
    """The ``<Name>`` of a PerkinElmer-QPI page description (None if it has none)."""
    text = re.sub(r"^<\?xml[^>]*\?>", "", description.strip())
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        return None
    name = root.findtext("Name")
    return name.strip() if name else None


def _open_qptiff(path: Path, tif, mpp: float | None) -> MifImage:
    series = tif.series[0]
    names = [qpi_name(p.description) or f"Channel {i}" for i, p in enumerate(series.pages)]
    found = _mpp(path, _tag_mpp(series.pages[0]), mpp, "resolution tags")
    return MifImage(path, "qptiff", tuple(names), found, _levels(series))


def _tag_mpp(page) -> float | None:
    try:
        xres = page.tags["XResolution"].value
        unit = int(page.tags["ResolutionUnit"].value)
    except KeyError:
        return None
    per_unit = xres[0] / xres[1] if xres[1] else 0
    um = {2: 25_400.0, 3: 10_000.0}.get(unit)
    return um / per_unit if um and per_unit > 1 else None


def _mpp(path: Path, found: float | None, override: float | None, where: str) -> float:
    mpp = override or found
    if mpp is None or not 0.05 <= mpp <= 50:
        raise MifReadError(
            f"{path}: no plausible µm/px in its {where} ({found}); pass --mif-mpp (mpp=)"
        )
    return float(mpp)


def _open_channels(folder: Path, override: float | None) -> MifImage:
    import tifffile

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _TIFF_SUFFIXES)
    if not files:
        raise MifReadError(f"{folder}: no .tif/.tiff files (one per channel, named by channel)")
    names, dims, mpps = [], set(), set()
    for f in files:
        with tifffile.TiffFile(f) as tif:
            series = tif.series[0]
            mpp = None
            if tif.is_ome:
                mpp = _open_ome(f, tif, override).mpp
            mpp = mpp or _tag_mpp(tif.pages.first)
            dims.add(_levels(series)[0])
            mpps.add(round(_mpp(f, mpp, override, "OME-XML or resolution tags"), 6))
            levels = _levels(series)
        names.append(f.name.split(".")[0])
    if len(dims) > 1 or len(mpps) > 1:
        raise MifReadError(
            f"{folder}: channels differ in size {sorted(dims)} or µm/px {sorted(mpps)}"
        )
    return MifImage(folder, "channels", tuple(names), mpps.pop(), levels, tuple(files))

"""Synthetic slides for tests and benchmarks: pyramidal TIFFs written with tifffile.

``write_pyramid`` writes a tiled, pyramidal TIFF that OpenSlide opens either as
``generic-tiff`` (µm/px in the resolution tags, YCbCr JPEG tiles, as tifffile and libvips
write them) or as ``aperio`` (µm/px in the ImageDescription, RGB JPEG tiles with shared
JPEGTables, as Aperio scanners write them). Levels are written in the main IFD chain,
finest first, which is what both OpenSlide drivers read.

Nothing here is used by cscvision at run time; tests and ``scripts/`` import it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile
from PIL import Image

# (level, x, y, width, height) in that level's pixels -> uint8 [height, width, 3]
TileFn = Callable[[int, int, int, int, int], np.ndarray]

COMPRESSIONS = {"jpeg": "jpeg", "deflate": "zlib", "lzw": "lzw", "none": None}

# JPEG marker bytes that carry tables or colour-space hints inside a tile stream.
_TABLE_MARKERS = {0xDB, 0xC4}  # DQT, DHT
_APP_MARKERS = set(range(0xE0, 0xF0))  # APP0 (JFIF) .. APP15 (APP14 = Adobe)


def write_pyramid(
    path: str | Path,
    source: np.ndarray | TileFn,
    *,
    size: tuple[int, int] | None = None,
    mpp: float | None = 0.5,
    tile_px: int = 256,
    levels: int = 3,
    downsample: int = 2,
    compression: str = "jpeg",
    quality: int = 85,
    aperio: bool = False,
    missing_tiles: Collection[tuple[int, int, int]] = (),
    thumbnail_px: int | None = None,
) -> Path:
    """Write a tiled pyramidal TIFF and return its path.

    ``source`` is an RGB uint8 array ``[H, W, 3]`` (coarser levels are box-reduced from it)
    or a ``TileFn`` with ``size=(W, H)`` that draws any level's pixels on demand, so a
    20k x 20k slide never sits in memory. Level ``k`` is ``ceil(W / downsample**k)`` wide.
    ``mpp=None`` writes no µm/px. ``compression``: one of ``COMPRESSIONS``. ``aperio=True``
    writes an Aperio SVS layout (``compression`` must be "jpeg"); otherwise OpenSlide
    reports the file as ``generic-tiff``. ``missing_tiles``: ``(level, col, row)`` tiles
    written with no bytes, as scanners leave them (Aperio layout only). ``thumbnail_px``
    (Aperio layout only) writes a stripped thumbnail of that longest side as the second
    page, where Aperio scanners put it (OpenSlide and opentile read it as the thumbnail).
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression {compression!r}: use one of {sorted(COMPRESSIONS)}")
    if aperio and compression != "jpeg":
        raise ValueError("aperio=True writes JPEG tiles; use compression='jpeg'")
    if missing_tiles and not aperio:
        raise ValueError("missing_tiles needs aperio=True (tifffile fills other tiles)")
    if thumbnail_px is not None and not aperio:
        raise ValueError("thumbnail_px needs aperio=True (the Aperio page layout)")
    tile_fn, (width, height) = _as_tile_fn(source, size, downsample)
    path = Path(path)
    with tifffile.TiffWriter(path, bigtiff=width * height * 3 > 2**31) as tif:
        for level in range(levels):
            factor = downsample**level
            level_wh = (math.ceil(width / factor), math.ceil(height / factor))
            kwargs = _page_kwargs(level, level_wh, factor, mpp, tile_px, quality, aperio)
            if thumbnail_px is not None:  # Aperio's own layout: levels are not marked reduced
                kwargs.pop("subfiletype", None)
            if aperio:
                tiles, tables = _aperio_tiles(tile_fn, level, level_wh, tile_px, quality)
                tiles = _drop_tiles(tiles, level, level_wh, tile_px, set(missing_tiles))
                kwargs.update(jpegtables=tables, compression="jpeg")
                kwargs["compressionargs"] = {"outcolorspace": "RGB"}
                kwargs["subsampling"] = (1, 1)
                tif.write(tiles, **kwargs)
                if level == 0 and thumbnail_px is not None:
                    _write_thumbnail_page(tif, tile_fn, (width, height), thumbnail_px)
            else:
                kwargs["compression"] = COMPRESSIONS[compression]
                if compression == "jpeg":
                    kwargs["compressionargs"] = {"level": quality}
                tif.write(_tiles(tile_fn, level, level_wh, tile_px), **kwargs)
    return path


def texture_tile_fn(seed: int = 0, *, variants: int = 16, period_px: int = 256) -> TileFn:
    """A cheap H&E-like texture for big synthetic slides: pink stroma, purple nuclei, noise.

    A few ``period_px`` texture blocks are made once and picked per block position, so
    drawing a tile costs a few array copies; JPEG q85 tiles of it are about 10-20 KB.
    """
    rng = np.random.default_rng(seed)
    blocks = [_texture_block(rng, period_px) for _ in range(variants)]

    def draw(level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        out = np.empty((h, w, 3), np.uint8)
        for by in range(y // period_px, (y + h - 1) // period_px + 1):
            for bx in range(x // period_px, (x + w - 1) // period_px + 1):
                block = blocks[(bx * 7919 + by * 104_729 + level * 31) % variants]
                x0, y0 = max(x, bx * period_px), max(y, by * period_px)
                x1, y1 = min(x + w, (bx + 1) * period_px), min(y + h, (by + 1) * period_px)
                out[y0 - y : y1 - y, x0 - x : x1 - x] = block[
                    y0 - by * period_px : y1 - by * period_px,
                    x0 - bx * period_px : x1 - bx * period_px,
                ]
        return out

    return draw


# --- helpers -----------------------------------------------------------------------------


def _as_tile_fn(
    source: np.ndarray | TileFn, size: tuple[int, int] | None, downsample: int
) -> tuple[TileFn, tuple[int, int]]:
    if callable(source):
        if size is None:
            raise ValueError("a tile function needs size=(width, height) of level 0")
        return source, (int(size[0]), int(size[1]))
    rgb = np.asarray(source)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"source must be uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    reduced: dict[int, np.ndarray] = {0: rgb}

    def from_array(level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        if level not in reduced:  # box filter; PIL rounds the size up, as levels do
            reduced[level] = np.asarray(Image.fromarray(rgb).reduce(downsample**level))
        return reduced[level][y : y + h, x : x + w]

    return from_array, (rgb.shape[1], rgb.shape[0])


def _page_kwargs(level, level_wh, factor, mpp, tile_px, quality, aperio) -> dict:
    width, height = level_wh
    kwargs: dict = {
        "shape": (height, width, 3),
        "dtype": np.uint8,
        "tile": (tile_px, tile_px),
        "photometric": "rgb",
        "metadata": None,
    }
    if level > 0:
        kwargs["subfiletype"] = 1  # reduced-resolution image
    if aperio:
        kwargs["description"] = _aperio_description(level_wh, factor, mpp, tile_px, quality)
    elif mpp is not None:
        px_per_cm = 10_000.0 / (mpp * factor)
        kwargs["resolution"] = (px_per_cm, px_per_cm)
        kwargs["resolutionunit"] = "CENTIMETER"
    return kwargs


def _aperio_description(level_wh, factor, mpp, tile_px, quality) -> str:
    w, h = level_wh
    text = f"Aperio Image Library vCSCVISION \r\n{w}x{h} ({tile_px}x{tile_px}) JPEG/RGB Q={quality}"
    if factor == 1:
        text += "|AppMag = 20"
        if mpp is not None:
            text += f"|MPP = {mpp:.4f}"
    return text


def _write_thumbnail_page(tif, tile_fn: TileFn, size: tuple[int, int], longest_px: int) -> None:
    width, height = size
    scale = longest_px / max(width, height)
    thumb = Image.fromarray(np.asarray(tile_fn(0, 0, 0, width, height), np.uint8))
    thumb = thumb.resize((max(1, round(width * scale)), max(1, round(height * scale))))
    tif.write(np.asarray(thumb), photometric="rgb", metadata=None, description="Aperio thumbnail")


def _tiles(tile_fn: TileFn, level: int, level_wh, tile_px: int) -> Iterator[np.ndarray]:
    """Tiles of one level in raster order, edge tiles zero-padded to full size."""
    width, height = level_wh
    for y in range(0, height, tile_px):
        for x in range(0, width, tile_px):
            w, h = min(tile_px, width - x), min(tile_px, height - y)
            rgb = np.asarray(tile_fn(level, x, y, w, h), dtype=np.uint8)
            if rgb.shape != (h, w, 3):
                raise ValueError(f"tile function gave {rgb.shape} for a {h}x{w} request")
            if (w, h) != (tile_px, tile_px):
                padded = np.zeros((tile_px, tile_px, 3), np.uint8)
                padded[:h, :w] = rgb
                rgb = padded
            yield rgb


def _aperio_tiles(tile_fn: TileFn, level: int, level_wh, tile_px: int, quality: int):
    """Abbreviated RGB JPEG streams (no tables, no colour-space marker) and shared tables."""
    streams, tables = [], None
    for rgb in _tiles(tile_fn, level, level_wh, tile_px):
        full = imagecodecs.jpeg8_encode(
            rgb, level=quality, colorspace="RGB", outcolorspace="RGB", subsampling="444"
        )
        stream, tile_tables = _split_tables(bytes(full))
        if tables is None:
            tables = tile_tables
        elif tile_tables != tables:
            raise RuntimeError("JPEG tiles did not share tables; cannot write JPEGTables")
        streams.append(stream)
    return iter(streams), tables


def _drop_tiles(streams, level: int, level_wh, tile_px: int, missing: set) -> Iterator[bytes]:
    across = math.ceil(level_wh[0] / tile_px)
    for index, stream in enumerate(streams):
        row, col = divmod(index, across)
        yield b"" if (level, col, row) in missing else stream


def _split_tables(jpeg: bytes) -> tuple[bytes, bytes]:
    """Split a full JPEG into (stream without tables or APPn, SOI+tables+EOI)."""
    stream, tables = bytearray(b"\xff\xd8"), bytearray(b"\xff\xd8")
    pos = 2
    while pos < len(jpeg):
        marker = jpeg[pos + 1]
        if marker == 0xDA:  # start of scan: the rest is entropy-coded data
            stream += jpeg[pos:]
            break
        length = int.from_bytes(jpeg[pos + 2 : pos + 4], "big")
        segment = jpeg[pos : pos + 2 + length]
        if marker in _TABLE_MARKERS:
            tables += segment
        elif marker not in _APP_MARKERS:
            stream += segment
        pos += 2 + length
    return bytes(stream), bytes(tables + b"\xff\xd9")


def _texture_block(rng: np.random.Generator, side_px: int, noise: float = 5.0) -> np.ndarray:
    """One H&E-like block: smooth pink stroma, purple nuclei, a little pixel noise."""
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(rng.normal(size=(side_px, side_px)), 6, mode="wrap")
    smooth /= np.abs(smooth).max() + 1e-9
    nuclei = ndimage.gaussian_filter(
        (rng.random((side_px, side_px)) < 0.004).astype(np.float32), 2.5, mode="wrap"
    )
    nuclei = np.clip(nuclei / (nuclei.max() + 1e-9) * 3, 0, 1)[..., None]
    stroma = np.array([232, 170, 205]) + 25 * smooth[..., None] * np.array([1, 1.6, 1])
    rgb = stroma * (1 - nuclei) + np.array([95, 55, 150]) * nuclei
    rgb += rng.normal(scale=noise, size=rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


# --- a toy annotated cohort (training tests and benchmarks) -------------------------------------

TOY_COLORS = {  # RGB of the toy "tissue" kinds: plain, stemness-rich, immunosuppressive
    "tissue": (215, 150, 190),
    "stemness": (120, 70, 160),
    "immunosuppressive": (200, 110, 90),
}


def _toy_slide(rng: np.random.Generator, size_px: int) -> tuple[np.ndarray, dict[str, list]]:
    """Glass with a textured tissue square holding one stemness and one immuno rectangle."""
    rgb = np.full((size_px, size_px, 3), 242, np.float32)
    margin = size_px // 16
    rgb[margin:-margin, margin:-margin] = TOY_COLORS["tissue"]
    boxes: dict[str, list] = {}
    for name in ("stemness", "immunosuppressive"):
        w, h = (int(v) for v in rng.integers(size_px // 5, size_px // 2.5, 2))
        x, y = (int(v) for v in rng.integers(margin, size_px - margin - max(w, h), 2))
        rgb[y : y + h, x : x + w] = TOY_COLORS[name]
        boxes[name] = [x, y, w, h]
    tissue = np.zeros(rgb.shape[:2], bool)
    tissue[margin:-margin, margin:-margin] = True
    rgb[tissue] += rng.normal(0, 12, (int(tissue.sum()), 1))
    return np.clip(rgb, 0, 255).astype(np.uint8), boxes


def _qupath_box(name: str, box: list) -> dict:
    x, y, w, h = box
    ring = [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"objectType": "annotation", "classification": {"name": name}},
    }


def write_toy_cohort(
    out_dir: str | Path,
    *,
    n_slides: int = 6,
    n_patients: int = 3,
    size_px: int = 768,
    seed: int = 0,
) -> Path:
    """A tiny annotated cohort: pyramidal TIFFs (0.5 µm/px), QuPath GeoJSON, ``cohort.csv``.

    Each slide shows a tissue square with one "Stemness-rich" and one "Immunosuppressive"
    rectangle of distinct colour (they may overlap), annotated as QuPath would export them.
    Returns the path of ``cohort.csv`` (columns slide_id, patient_id, slide_path,
    annotation_path; paths relative to it).
    """
    import json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = ["slide_id,patient_id,slide_path,annotation_path"]
    for i in range(n_slides):
        rgb, boxes = _toy_slide(rng, size_px)
        slide_id = f"toy_{i:02d}"
        write_pyramid(out_dir / f"{slide_id}.tif", rgb, mpp=0.5, tile_px=256, levels=3)
        features = [_qupath_box("Stemness-rich", boxes["stemness"])]
        features.append(_qupath_box("Immunosuppressive", boxes["immunosuppressive"]))
        doc = {"type": "FeatureCollection", "features": features}
        (out_dir / f"{slide_id}.geojson").write_text(json.dumps(doc))
        rows.append(f"{slide_id},P{i % n_patients},{slide_id}.tif,{slide_id}.geojson")
    csv_path = out_dir / "cohort.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    return csv_path


def output_snapshot(out: str | Path) -> dict[str, bytes]:
    """Every file under ``out`` by relative path, with run-time fields (seconds) blanked:
    two runs that did the same work compare equal."""
    import json

    out = Path(out)
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == "summary.json":
            summary = json.loads(data)
            summary["seconds"] = summary["predict_seconds"] = None
            data = json.dumps(summary).encode()
        elif path.name.startswith("results") and path.suffix == ".csv":
            rows = [line.split(",") for line in data.decode().splitlines()]
            col = rows[0].index("seconds")
            data = "\n".join(",".join(r[:col] + r[col + 1 :]) for r in rows).encode()
        files[str(path.relative_to(out))] = data
    return files

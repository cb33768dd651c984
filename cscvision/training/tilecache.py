"""Labelled tiles per slide: grid + soft targets, computed once and cached on disk.

The cache folder of a slide is keyed by the slide file (path, size, mtime), the annotation
file (same, plus a digest of its content), the grid spec and the class map; ``key.json`` is
written last and marks the entry complete, so an interrupted run recomputes only what it had
not finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from cscvision import __version__
from cscvision.core.errors import CscvisionError
from cscvision.core.io import atomic_path, file_sha256, write_json
from cscvision.labels.annotations import (
    ClassMap,
    check_within,
    is_tile_label_csv,
    read_annotations,
    read_slide_annotations,
    read_tile_labels,
    tile_targets,
)
from cscvision.labels.cohort import CohortEntry
from cscvision.labels.table import LabelTableError, read_label_table
from cscvision.slides.grid import GridSpec, TileGrid, detect_tissue, load_grid, make_grid, save_grid
from cscvision.slides.info import MPP_TOLERANCE
from cscvision.slides.slide import MPP_FROM_OVERRIDE, ReadPlan, Slide, open_slide, plan_read

SPLITS = ("train", "val", "test")
_KEY_FILE = "key.json"
_LABEL_FILE = "labels.npz"


class DataError(CscvisionError, ValueError):
    """Training data that cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class SlideTiles:
    """The labelled tissue tiles of one slide: level-0 corners and soft targets."""

    slide_id: str
    patient_id: str
    split: str
    slide_path: str
    plan: ReadPlan
    mpp_override: float | None  # level-0 µm/px to pass to open_slide, if not from metadata
    xy_l0: np.ndarray  # int64[N, 2]
    targets: np.ndarray  # float32[N, T], fraction of the tile's tissue in each target
    tissue: np.ndarray  # float32[N]
    n_excluded: int = 0  # label-table rows dropped (valid == 0 or a target unknown)
    weight: np.ndarray | None = None  # float32[N] sample weights (a table's column); None = 1

    def __len__(self) -> int:
        return len(self.xy_l0)

    def weights(self) -> np.ndarray:
        """float32[N]: each tile's sample weight, 1 where the labels carry none."""
        if self.weight is None:
            return np.ones(len(self), np.float32)
        return np.asarray(self.weight, np.float32)


# --- labelling and caching ---------------------------------------------------------------------


def _stat_key(path: str | Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    stat = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime": stat.st_mtime}


def _content_key(path: str | Path | None) -> dict[str, Any] | None:
    """Stat plus a digest of the content: annotation files are small, and an edit copied
    back with its old mtime (``cp -p``, ``rsync -t``, an unzipped archive) must not hit."""
    key = _stat_key(path)
    if key is not None:
        key["sha256"] = file_sha256(path)
    return key


def cache_key(
    slide_path: str | Path,
    annotation_path: str | Path | None,
    spec: GridSpec,
    class_map: ClassMap,
    mpp_override: float | None = None,
) -> str:
    """Hex digest of everything the tiles and targets of a slide depend on."""
    record = {
        "slide": _stat_key(slide_path),
        "annotations": _content_key(annotation_path),
        "labels": 2,  # how regions become targets; 2: bounds offset for QuPath GeoJSON only
        "spec": dataclasses.asdict(spec),
        "class_map": class_map.to_dict(),
        "mpp_override": mpp_override,
        "version": __version__,
    }
    return hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()


def label_slide(
    slide: Slide, annotation_path: str | Path | None, spec: GridSpec, class_map: ClassMap
) -> tuple[TileGrid, np.ndarray, np.ndarray, list[str]]:
    """Grid of ``slide`` and its soft targets: (grid, float32[N, T], excluded bool[N], unmapped).

    Annotations are QuPath GeoJSON (bounds offset added) / ASAP XML (level-0) regions, or a
    tile-label CSV (``x,y,<target>…``) whose rows must match grid tiles (others are excluded).
    """
    _, mask = detect_tissue(slide, spec.mask_mpp)
    grid = make_grid(slide, spec, mask=mask)
    n = len(grid)
    if annotation_path is None or n == 0:
        return grid, np.zeros((n, len(class_map.targets)), np.float32), np.zeros(n, bool), []
    if is_tile_label_csv(annotation_path):
        return (grid, *_csv_targets(grid, annotation_path, class_map.targets), [])
    regions = read_slide_annotations(annotation_path, slide.info.bounds[:2])
    check_within(regions, slide.info.dimensions, annotation_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unmapped classes: reported once per cohort, by file
        result = tile_targets(
            regions,
            class_map,
            grid.xy_l0,
            grid.plan.tile_l0,
            tissue_mask=mask,
            mask_scale=mask.shape[1] / slide.info.dimensions[0],
        )
    return grid, result.targets.astype(np.float32), result.excluded, list(result.unmapped)


def _csv_targets(
    grid: TileGrid, path: str | Path, targets: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    xy, values = read_tile_labels(path, targets)
    row_of = {(int(x), int(y)): i for i, (x, y) in enumerate(xy)}
    rows = np.array([row_of.get((int(x), int(y)), -1) for x, y in grid.xy_l0], np.int64)
    if len(rows) and (rows < 0).all():
        raise DataError(
            f"{path}: no tile-label row matches a tissue tile of the grid; x,y must be the "
            f"level-0 corners of tiles of {grid.plan.tile_px} px at {grid.plan.mpp} µm/px"
        )
    out = np.zeros((len(rows), len(targets)), np.float32)
    out[rows >= 0] = values[rows[rows >= 0]]
    return out, rows < 0


def _load_cached(
    folder: Path, key: str
) -> tuple[TileGrid, np.ndarray, np.ndarray, list[str]] | None:
    try:
        meta = json.loads((folder / _KEY_FILE).read_text())
        if meta.get("key") != key:
            return None
        with np.load(folder / _LABEL_FILE) as z:
            targets, excluded = z["targets"], z["excluded"]
        return load_grid(folder), targets, excluded, list(meta.get("unmapped", []))
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None


def _save_cached(
    folder: Path,
    key: str,
    grid: TileGrid,
    targets: np.ndarray,
    excluded: np.ndarray,
    unmapped: list[str],
) -> None:
    save_grid(grid, folder)
    with atomic_path(folder / _LABEL_FILE) as tmp, tmp.open("wb") as f:
        np.savez(f, targets=targets, excluded=excluded)
    write_json(folder / _KEY_FILE, {"key": key, "unmapped": unmapped})  # last: marks complete


def prepare_slide(
    entry: CohortEntry,
    *,
    split: str,
    spec: GridSpec,
    class_map: ClassMap,
    cache_dir: str | Path,
    mpp_override: float | None = None,
    targets: Sequence[str] | None = None,
) -> tuple[SlideTiles, list[str]]:
    """Tiles and soft targets of one cohort slide, from the cache when it is current.

    Returns the tiles (excluded tiles dropped) and the annotation classes no target maps.
    A slide with a tile-label table (``label_path``) takes its table's tiles as the samples,
    for ``targets`` (default: the class map's).
    """
    if entry.label_path is not None:
        chosen = targets or class_map.targets
        return table_tiles(
            entry, split=split, spec=spec, targets=chosen, mpp_override=mpp_override
        ), []
    key = cache_key(entry.slide_path, entry.annotation_path, spec, class_map, mpp_override)
    folder = Path(cache_dir) / f"{entry.slide_id}-{key[:12]}"
    cached = _load_cached(folder, key)
    if cached is None:
        with open_slide(entry.slide_path, mpp=mpp_override) as slide:
            cached = label_slide(slide, entry.annotation_path, spec, class_map)
        _save_cached(folder, key, *cached)
    grid, targets, excluded, unmapped = cached
    keep = ~np.asarray(excluded, bool)
    tiles = SlideTiles(
        slide_id=entry.slide_id,
        patient_id=entry.patient_id,
        split=split,
        slide_path=str(entry.slide_path),
        plan=grid.plan,
        mpp_override=grid.slide_mpp if grid.mpp_source == MPP_FROM_OVERRIDE else None,
        xy_l0=grid.xy_l0[keep],
        targets=np.asarray(targets, np.float32)[keep],
        tissue=grid.tissue[keep],
    )
    return tiles, unmapped


def table_tiles(
    entry: CohortEntry,
    *,
    split: str,
    spec: GridSpec,
    targets: Sequence[str],
    mpp_override: float | None = None,
) -> SlideTiles:
    """The tiles of ``entry``'s tile-label table: rows with ``valid == 0`` or with no known
    value of any of ``targets`` are dropped and counted; a row missing some targets (NaN) is
    kept, and training leaves those targets out of its loss; values outside [0, 1] are kept
    (regression targets); a ``weight`` column becomes the tiles' sample weights."""
    path = entry.label_path
    try:
        table = read_label_table(path)
    except LabelTableError as e:
        raise DataError(str(e)) from None
    if table.tile_px != spec.tile_px or abs(table.mpp / spec.mpp - 1) > MPP_TOLERANCE:
        raise DataError(
            f"{path}: tiles of {table.tile_px} px at {table.mpp} µm/px, but the config's grid "
            f"is {spec.tile_px} px at {spec.mpp} µm/px; set grid.tile_px/grid.mpp to match or "
            "rebuild the table at the config's grid"
        )
    missing = [t for t in targets if t not in table.targets]
    if missing:
        raise DataError(f"{path}: no column for target(s) {missing} (it has {table.targets})")
    values = table.values[:, [table.targets.index(t) for t in targets]]
    keep = ~np.isnan(values).all(axis=1)
    if table.valid is not None:
        keep &= table.valid
    if table.slide_id != entry.slide_id:
        raise DataError(
            f"{path}: its sidecar names slide {table.slide_id!r}, but the cohort row is "
            f"{entry.slide_id!r} ({entry.slide_path}); point label_path at that slide's table"
        )
    with open_slide(entry.slide_path, mpp=mpp_override) as slide:
        plan = plan_read(slide.info, mpp=spec.mpp, tile_px=spec.tile_px)
        override = slide.info.mpp if slide.info.mpp_source == MPP_FROM_OVERRIDE else None
        _check_on_slide(path, table.xy_l0, plan.tile_l0, slide.info.dimensions, entry.slide_path)
    return SlideTiles(
        slide_id=entry.slide_id,
        patient_id=entry.patient_id,
        split=split,
        slide_path=str(entry.slide_path),
        plan=plan,
        mpp_override=override,
        xy_l0=table.xy_l0[keep],
        targets=values[keep].astype(np.float32),
        tissue=np.ones(int(keep.sum()), np.float32),
        n_excluded=int((~keep).sum()),
        weight=None if table.weight is None else table.weight[keep].astype(np.float32),
    )


def _check_on_slide(
    path: Path, xy_l0: np.ndarray, tile_l0: float, dimensions: tuple[int, int], slide: Path
) -> None:
    """Refuse a table with a tile wholly off the slide (another slide's table, or
    coordinates at another level or scale); a tile over the edge (a spot near it) is kept."""
    w, h = dimensions
    x, y = xy_l0[:, 0], xy_l0[:, 1]
    off = (x + tile_l0 <= 0) | (y + tile_l0 <= 0) | (x >= w) | (y >= h)
    if off.any():
        row = int(np.argmax(off))
        x0, y0 = (int(v) for v in xy_l0[row])
        raise DataError(
            f"{path}: line {row + 2}: tile at x {x0}, y {y0} lies off the slide {slide} "
            f"({w} x {h} level-0 px; {int(off.sum())} such rows); x, y must be level-0 "
            "pixels of this slide"
        )


def prepare_cohort(
    entries: Sequence[CohortEntry],
    splits: Mapping[str, str],
    *,
    spec: GridSpec,
    class_map: ClassMap,
    cache_dir: str | Path,
    progress: bool = True,
    targets: Sequence[str] | None = None,
) -> dict[str, list[SlideTiles]]:
    """Tiles of every cohort slide, grouped by split; slides without tissue are skipped.

    Warns once listing every annotation class that maps to no target, and for each slide
    skipped; raises :class:`DataError` when the training or validation split is empty.
    """
    if not entries:
        raise DataError("the cohort is empty; the cohort CSV needs one row per slide")
    by_split: dict[str, list[SlideTiles]] = {s: [] for s in SPLITS}
    unmapped: dict[str, set[str]] = {}
    for entry in tqdm(entries, desc="tiling slides", unit="slide", disable=not progress):
        split = splits[entry.slide_id]
        tiles, names = prepare_slide(
            entry,
            split=split,
            spec=spec,
            class_map=class_map,
            cache_dir=cache_dir,
            targets=targets,
        )
        for name in names:
            unmapped.setdefault(name, set()).add(str(entry.annotation_path))
        if len(tiles) == 0:
            warnings.warn(
                f"{entry.slide_path}: no tissue tiles at {spec.mpp} µm/px with min_tissue "
                f"{spec.min_tissue}; slide skipped (check the slide or lower grid.min_tissue)",
                stacklevel=2,
            )
            continue
        by_split[split].append(tiles)
    if unmapped:
        listing = "; ".join(f"{n!r} in {', '.join(sorted(f))}" for n, f in sorted(unmapped.items()))
        warnings.warn(
            f"annotation classes that map to no target (ignored): {listing}; add them to "
            "classes.mapping, classes.ignore or classes.exclude in the config",
            stacklevel=2,
        )
    for split in ("train", "val"):
        if not by_split[split]:
            raise DataError(
                f"no {split} slide with tissue tiles among the {len(entries)} cohort slides; "
                "check the slides, the cohort CSV's split column or the split fractions"
            )
    return by_split


def require_positives(
    train: Sequence[SlideTiles],
    entries: Sequence[CohortEntry],
    class_map: ClassMap,
    targets: Sequence[str],
) -> None:
    """Raise :class:`DataError` when a classification target has no positive training tile
    (target ≥ 0.5): a model exported from such data cannot have learned it. The message
    lists the annotation classes found in the training slides and the class map."""
    counts = sum(((t.targets >= 0.5).sum(axis=0) for t in train), np.zeros(len(targets)))
    empty = [t for t, n in zip(targets, counts, strict=True) if n == 0]
    if not empty:
        return
    ids = {t.slide_id for t in train}
    tables = [e for e in entries if e.slide_id in ids and e.label_path is not None]
    if tables:
        raise DataError(
            f"target(s) {empty} have no positive training tile (value ≥ 0.5) in the tile-label "
            f"tables of the {len(train)} training slides (e.g. {tables[0].label_path}), so a "
            "model could not learn them. Check how the tables were made (for IHC tables: the "
            "marker's threshold in the sidecar and qc/<marker>_density.png), or train on other "
            "columns (the config's targets)"
        )
    found: set[str] = set()
    for entry in entries:
        if entry.slide_id in ids and entry.annotation_path is not None:
            with contextlib.suppress(ValueError, OSError):
                found |= {r.name for r in read_annotations(entry.annotation_path)}
    raise DataError(
        f"target(s) {empty} have no positive training tile ({len(train)} training slides), so "
        f"a model could not learn them. Annotation classes found: {sorted(found) or 'none'}; "
        f"class map: targets {list(class_map.targets)}, mapping {class_map.mapping or '{}'}, "
        f"ignore {list(class_map.ignore)}. Map a class to each target (classes.mapping in the "
        "config), annotate it, or drop the target"
    )


def subsample(tiles: SlideTiles, max_tiles: int | None, seed: int) -> SlideTiles:
    """At most ``max_tiles`` tiles of a slide drawn at random, kept in raster order."""
    if max_tiles is None or len(tiles) <= max_tiles:
        return tiles
    salt = int(hashlib.sha1(tiles.slide_id.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng([seed, salt])
    keep = np.sort(rng.choice(len(tiles), size=max_tiles, replace=False))
    return dataclasses.replace(
        tiles,
        xy_l0=tiles.xy_l0[keep],
        targets=tiles.targets[keep],
        tissue=tiles.tissue[keep],
        weight=None if tiles.weight is None else tiles.weight[keep],
    )

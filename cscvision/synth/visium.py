"""Synthetic Visium: a Space Ranger-shaped ``outs/`` folder whose counts follow the ground truth.

Per slide, ``<slide_id>_visium/outs/`` holds what Space Ranger writes for Visium, in the
layout of Space Ranger ≥ 2.0 (default) or 1.x (``VisiumSpec.layout``), as scanpy's and
squidpy's Visium readers expect:

- ``filtered_feature_bc_matrix.h5``: 10x feature-barcode HDF5 (``matrix/`` with ``barcodes``,
  ``data``, ``indices``, ``indptr``, ``shape`` = (genes, spots), ``features/`` with
  ``_all_tag_keys``, ``feature_type``, ``genome``, ``id``, ``name``), in-tissue spots only;
  the root attributes every real file carries (``chemistry_description``, ``filetype``,
  ``library_ids``, ``original_gem_groups``, ``software_version``, ``version``; types as in
  Space Ranger 1.0.0's own file in squidpy's test data) plus ``generator`` naming cscvision;
- ``spatial/tissue_positions.csv`` (≥ 2.0): header ``barcode,in_tissue,array_row,array_col,
  pxl_row_in_fullres,pxl_col_in_fullres``, every spot of the grid; or
  ``spatial/tissue_positions_list.csv`` (1.x): the same columns without a header;
- ``spatial/scalefactors_json.json`` and ``spatial/tissue_hires_image.png`` /
  ``tissue_lowres_image.png`` (longest side 2000 / 600 px);
- beside ``outs/``: ``spot_truth.csv``, each spot's overlap with the truth regions.

Spots lie on Visium's hexagonal grid, 100 µm centre to centre (rows 86.6 µm apart, odd rows
shifted half a pitch, ``array_col`` even on even rows), 55 µm across. Counts are negative
binomial around ``library size × baseline share × (1 + fold × overlap)``: each panel gene is
raised in proportion to the fraction of the spot covered by its programme's region
(stemness-rich or immunosuppressive), and a few hundred background genes are not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from PIL import Image

from cscvision.core.io import atomic_path, write_csv, write_text
from cscvision.core.panels import DEFAULT_PANELS
from cscvision.synth.layout import IMMUNO, STEMNESS, SlideLayout

PANEL_GENES = DEFAULT_PANELS  # the genes the synthetic counts raise
REGION_OF = {"stemness": STEMNESS, "immunosuppressive": IMMUNO}  # panel -> truth region
POSITION_HEADER = (
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
)
HIRES_PX, LOWRES_PX = 2000, 600
# per layout: positions file, whether it has a header, the software_version written
LAYOUTS = {
    "2.0": ("tissue_positions.csv", True, "spaceranger-2.0.0"),
    "1.x": ("tissue_positions_list.csv", False, "spaceranger-1.3.1"),
}
FIDUCIAL_TO_SPOT = 1.6154  # fiducial / spot diameter on a Visium slide (89.5 / 55.4 µm)


@dataclass(frozen=True)
class VisiumSpec:
    pitch_um: float = 100.0  # centre to centre
    spot_um: float = 55.0  # diameter
    n_background: int = 300  # genes unrelated to the truth
    library_size: float = 3000.0  # median counts per spot
    fold: float = 8.0  # panel genes at full overlap: 1 + fold times baseline
    dispersion: float = 0.2  # negative binomial: var = mu + dispersion * mu^2
    min_tissue: float = 0.5  # in_tissue = the spot's tissue fraction reaches this
    layout: str = "2.0"  # Space Ranger output layout: "2.0" (and later) or "1.x"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"Visium layout {self.layout!r}: choose one of {sorted(LAYOUTS)}")


def spot_grid(width_px: int, height_px: int, mpp: float, pitch_um: float) -> np.ndarray:
    """Visium's hexagonal grid over the slide: rows of (array_row, array_col, x, y), float64."""
    pitch = pitch_um / mpp
    dy = pitch * np.sqrt(3) / 2
    rows = []
    for r in range(int((height_px - pitch / 2) // dy) + 1):
        y = pitch / 2 + r * dy
        x0 = pitch / 2 + (pitch / 2 if r % 2 else 0.0)
        for c in range(int((width_px - x0 - pitch / 4) // pitch) + 1):
            rows.append((r, 2 * c + r % 2, x0 + c * pitch, y))
    return np.asarray(rows, np.float64).reshape(-1, 4)


def spot_overlaps(layout: SlideLayout, xy: np.ndarray, radius_px: float) -> dict[str, np.ndarray]:
    """Fraction of each spot's disc inside the tissue and each programme's region."""
    discs = shapely.buffer(shapely.points(xy), radius_px, quad_segs=16)
    area = shapely.area(discs)
    out = {"tissue": shapely.area(shapely.intersection(discs, layout.tissue)) / area}
    for name in PANEL_GENES:
        region = shapely.intersection(layout.regions[REGION_OF[name]], layout.tissue)
        out[name] = shapely.area(shapely.intersection(discs, region)) / area
    return out


def barcodes(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct 16-nt barcodes with Space Ranger's ``-1`` suffix."""
    seen: dict[str, None] = {}
    while len(seen) < n:
        for code in rng.integers(0, 4, size=(n, 16)):
            seen.setdefault("".join("ACGT"[i] for i in code) + "-1", None)
    return list(seen)[:n]


def sample_counts(
    rng: np.random.Generator, overlaps: dict[str, np.ndarray], spec: VisiumSpec
) -> tuple[np.ndarray, list[str]]:
    """Counts int32[spots, genes] and gene names (panel genes first, then background)."""
    panel = [(g, name) for name, genes in PANEL_GENES.items() for g in genes]
    names = [g for g, _ in panel] + [f"SYNBG{i + 1:04d}" for i in range(spec.n_background)]
    share = rng.lognormal(0.0, 1.0, len(names))
    share[: len(panel)] *= 0.3  # markers are rarer than the average gene
    share /= share.sum()
    n = len(overlaps["tissue"])
    library = spec.library_size * rng.lognormal(0.0, 0.25, n) * overlaps["tissue"]
    raise_by = np.ones((n, len(names)))
    for j, (_, name) in enumerate(panel):
        raise_by[:, j] += spec.fold * overlaps[name]
    mu = library[:, None] * share[None, :] * raise_by
    size = 1.0 / spec.dispersion
    return rng.negative_binomial(size, size / (size + mu)).astype(np.int32), names


def write_10x_h5(
    path: Path,
    counts: np.ndarray,
    names: list[str],
    codes: list[str],
    *,
    library_id: str = "synthetic",
    software_version: str = LAYOUTS["2.0"][2],
) -> None:
    """The 10x feature-barcode matrix HDF5 (genes × barcodes, compressed sparse columns)."""
    import h5py

    cols = [np.flatnonzero(row) for row in counts]  # one barcode's genes
    data = np.concatenate([row[c] for row, c in zip(counts, cols, strict=True)] or [[]])
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        # fixed-length byte arrays and int32 arrays, as in a real Space Ranger file;
        # software_version a variable-length string (scanpy reads it as str or bytes)
        f.attrs["chemistry_description"] = np.array([b"Spatial 3' v1"])
        f.attrs["filetype"] = np.array([b"matrix"])
        f.attrs["library_ids"] = np.array([library_id.encode()])
        f.attrs["original_gem_groups"] = np.array([1], np.int32)
        f.attrs["software_version"] = software_version
        f.attrs["version"] = np.array([2], np.int32)
        f.attrs["generator"] = "cscvision synth (synthetic counts)"
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=np.array(codes, dtype="S"))
        m.create_dataset("data", data=data.astype(np.int32), compression="gzip")
        m.create_dataset("indices", data=np.concatenate(cols or [[]]).astype(np.int64))
        m.create_dataset("indptr", data=np.cumsum([0] + [len(c) for c in cols]).astype(np.int64))
        m.create_dataset("shape", data=np.array([len(names), len(codes)], np.int32))
        feats = m.create_group("features")
        feats.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
        feats.create_dataset("feature_type", data=np.array([b"Gene Expression"] * len(names)))
        feats.create_dataset("genome", data=np.array([b"GRCh38-synthetic"] * len(names)))
        feats.create_dataset("id", data=np.array([f"SYN{i:011d}" for i in range(len(names))], "S"))
        feats.create_dataset("name", data=np.array(names, dtype="S"))


def _image(levels: list[np.ndarray], layout: SlideLayout, side_px: int) -> tuple[np.ndarray, float]:
    scalef = side_px / max(layout.width_px, layout.height_px)
    source = min(
        (lv for lv in levels if max(lv.shape[:2]) >= side_px),
        key=lambda a: a.size,
        default=max(levels, key=lambda a: a.size),
    )
    size = (max(1, round(layout.width_px * scalef)), max(1, round(layout.height_px * scalef)))
    return np.asarray(Image.fromarray(source).resize(size, Image.Resampling.BOX)), scalef


def _write_png(path: Path, rgb: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")


def write_visium(
    folder: str | Path,
    layout: SlideLayout,
    *,
    seed: int,
    levels: list[np.ndarray],
    spec: VisiumSpec | None = None,
) -> Path:
    """Write ``folder/outs/`` (Space Ranger layout) and ``folder/spot_truth.csv``; return outs."""
    spec = spec or VisiumSpec()
    folder, rng = Path(folder), np.random.default_rng([seed, 7])
    outs = folder / "outs"
    grid = spot_grid(layout.width_px, layout.height_px, layout.mpp, spec.pitch_um)
    radius_px = spec.spot_um / layout.mpp / 2
    overlaps = spot_overlaps(layout, grid[:, 2:], radius_px)
    in_tissue = overlaps["tissue"] >= spec.min_tissue
    codes = barcodes(rng, len(grid))
    counts, names = sample_counts(rng, {k: v[in_tissue] for k, v in overlaps.items()}, spec)
    positions_name, with_header, software = LAYOUTS[spec.layout]
    write_10x_h5(
        outs / "filtered_feature_bc_matrix.h5",
        counts,
        names,
        [c for c, keep in zip(codes, in_tissue, strict=True) if keep],
        library_id=folder.name.removesuffix("_visium") or "synthetic",
        software_version=software,
    )
    rows = [
        (code, int(t), int(r), int(c), round(y, 2), round(x, 2))
        for code, t, (r, c, x, y) in zip(codes, in_tissue, grid, strict=True)
    ]
    write_csv(outs / "spatial" / positions_name, POSITION_HEADER if with_header else None, rows)
    hires, hires_f = _image(levels, layout, HIRES_PX)
    lowres, lowres_f = _image(levels, layout, LOWRES_PX)
    _write_png(outs / "spatial" / "tissue_hires_image.png", hires)
    _write_png(outs / "spatial" / "tissue_lowres_image.png", lowres)
    factors = {
        "spot_diameter_fullres": 2 * radius_px,
        "tissue_hires_scalef": hires_f,
        "fiducial_diameter_fullres": 2 * radius_px * FIDUCIAL_TO_SPOT,
        "tissue_lowres_scalef": lowres_f,
    }
    write_text(outs / "spatial" / "scalefactors_json.json", json.dumps(factors, indent=2) + "\n")
    header = ["barcode", "in_tissue", "tissue_fraction", *(f"{n}_fraction" for n in PANEL_GENES)]
    truth = zip(codes, in_tissue, *(overlaps[k] for k in ("tissue", *PANEL_GENES)), strict=True)
    write_csv(
        folder / "spot_truth.csv",
        header,
        [(c, int(t), *(round(float(v), 4) for v in rest)) for c, t, *rest in truth],
    )
    return outs

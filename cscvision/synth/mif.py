"""A multiplex immunofluorescence (mIF) image of the H&E section, with its truth.

``cscvision synth --mif`` gives each H&E slide ``<id>_mif.ome.tiff``: the same section
(same cells, same place), imaged on an 8-channel panel and written as a pyramidal
OME-TIFF by tifffile's OME writer (channel names and ``PhysicalSizeX`` in the OME-XML,
pyramid levels in SubIFDs, uint16, zlib). Beside it:

- ``<id>_mif_truth.json``: the true transform (mIF level-0 px → H&E level-0 px, a small
  rotation, shift and scale: the same section scanned again), the optics, and the panel;
- ``<id>_mif_truth.cells.parquet``: the cell table of every true cell in **H&E level-0
  px** with its true phenotype (``treg``, ``cd8_t``, ``t_cell`` (CD4 helper),
  ``m2_macrophage``, ``macrophage``, ``csc_like``, ``tumour``; fibroblasts ``stroma``,
  debris ``dead``) and its true ``<marker>_pos`` columns.

and, for the cohort, ``mif_panel.yaml`` (the panel file, :mod:`cscvision.cells.mif_panel`)
and ``mif_manifest.csv`` (``slide_id, patient_id, slide_path, mif_path``).

Phenotypes come from the H&E ground truth: stem cells are panCK+ CD44+, tumour cells
panCK+; lymphocytes are Tregs (CD4+ FOXP3+), cytotoxic (CD8+) or helper (CD4+) T cells
with shares that depend on the region they sit in (many Tregs in immunosuppressive
regions); macrophages are CD68+, and CD163+ (M2) mostly in immunosuppressive regions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cscvision.cells.table import CellTable, make_table, write_cell_table
from cscvision.core.io import atomic_path, write_json, write_text
from cscvision.synth.cells import slide_cells
from cscvision.synth.mif_render import WINDOW_PX, MifCells, MifRenderer, Optics

# (channel name, marker, compartment), in spectral order: spillover goes to neighbours.
CHANNELS = (
    ("DAPI", "DAPI", "nucleus"),
    ("Opal 520", "FOXP3", "nucleus"),
    ("Opal 540", "CD8", "membrane"),
    ("Opal 570", "CD4", "membrane"),
    ("Opal 620", "CD68", "membrane"),
    ("Opal 650", "CD163", "membrane"),
    ("Opal 690", "CD44", "membrane"),
    ("Opal 780", "panCK", "membrane"),
)
MARKERS = tuple(m for _, m, _ in CHANNELS)
AUTOFLUORESCENCE = (0.05, 0.07, 0.06, 0.05, 0.04, 0.035, 0.03, 0.025)
PHENOTYPE_MARKERS = {
    "treg": ("CD4", "FOXP3"),
    "cd8_t": ("CD8",),
    "t_cell": ("CD4",),
    "m2_macrophage": ("CD68", "CD163"),
    "macrophage": ("CD68",),
    "csc_like": ("panCK", "CD44"),
    "tumour": ("panCK",),
}
# share of lymphocytes that are (treg, cd8_t) in immunosuppressive regions and elsewhere;
# the rest are CD4 helpers. Share of macrophages that are CD163+ (M2).
T_SHARES = {"immuno": (0.45, 0.25), "other": (0.08, 0.55)}
M2_SHARE = {"immuno": 0.75, "other": 0.2}
IMMUNO_CLASSES = (4, 5)  # render classes "immuno" and "niche" (cscvision.synth.morphology)
NUCLEUS_UM = {"csc_like": 3.2, "tumour": 5.0, "lymphocyte": 2.5, "macrophage": 3.3,
              "stroma": 3.3, "dead": 1.8}  # fmt: skip
BODY_UM = {"csc_like": 4.4, "tumour": 7.5, "lymphocyte": 3.8, "macrophage": 8.0,
           "stroma": 5.0, "dead": 2.2}  # fmt: skip
PANEL_RULES = (  # (type, all, any)
    ("treg", ("CD4", "FOXP3"), ()),
    ("cd8_t", ("CD8",), ()),
    ("t_cell", ("CD4",), ()),
    ("m2_macrophage", ("CD68", "CD163"), ()),
    ("macrophage", ("CD68",), ()),
    ("csc_like", ("panCK",), ("CD44",)),
    ("tumour", ("panCK",), ()),
)
# lineage markers exclude each other (a tumour cell touching CD8+ lymphocytes picks up some
# of their membrane signal): cscvision.cells.mif_panel
LINEAGE = ("CD8", "CD4", "CD68", "panCK")
SUFFIX = "_mif.ome.tiff"
TRUTH_CELLS = "_mif_truth.cells.parquet"


@dataclass(frozen=True)
class MifTransform:
    """mIF level-0 px → H&E level-0 px: ``x_he = M @ (x, y, 1)``."""

    matrix: np.ndarray  # float64[2, 3]

    def __call__(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = self.matrix
        return m[0, 0] * x + m[0, 1] * y + m[0, 2], m[1, 0] * x + m[1, 1] * y + m[1, 2]

    def inverse(self, x_he: np.ndarray, y_he: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        full = np.vstack([self.matrix, [0, 0, 1]])
        inv = np.linalg.inv(full)
        return inv[0, 0] * x_he + inv[0, 1] * y_he + inv[0, 2], (
            inv[1, 0] * x_he + inv[1, 1] * y_he + inv[1, 2]
        )


def draw_transform(rng: np.random.Generator, he_size: tuple[int, int], he_mpp: float,
                   mif_mpp: float) -> tuple[MifTransform, tuple[int, int]]:  # fmt: skip
    """The same section rescanned: rotation ±1.5°, shift ±25 µm, scale 1 ± 0.5 %; the mIF
    canvas (w, h) covers the H&E slide's extent."""
    angle = np.deg2rad(rng.uniform(-1.5, 1.5))
    s = mif_mpp / he_mpp * (1 + rng.uniform(-0.005, 0.005))
    shift = rng.uniform(-25, 25, 2) / he_mpp
    w, h = (round(n * he_mpp / mif_mpp) for n in he_size)
    rot = s * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre_mif, centre_he = np.array([w, h]) / 2, np.array(he_size) / 2
    offset = centre_he + shift - rot @ centre_mif
    return MifTransform(np.hstack([rot, offset[:, None]])), (w, h)


def true_phenotypes(table: CellTable, region: np.ndarray, seed: int) -> CellTable:
    """The cell table with the true phenotype of each cell and its ``<marker>_pos``
    columns (``region``: render class under each cell)."""
    kind = table.cell_type.astype(str)
    u = np.random.default_rng([seed, 63]).uniform(size=len(kind))
    immuno = np.isin(region, IMMUNO_CLASSES)
    pheno = kind.astype(object).copy()
    lym = kind == "lymphocyte"
    treg = np.where(immuno, T_SHARES["immuno"][0], T_SHARES["other"][0])
    cd8 = treg + np.where(immuno, T_SHARES["immuno"][1], T_SHARES["other"][1])
    pheno[lym] = np.where(u[lym] < treg[lym], "treg", np.where(u[lym] < cd8[lym], "cd8_t",
                                                               "t_cell"))  # fmt: skip
    mac = kind == "macrophage"
    m2 = np.where(immuno, M2_SHARE["immuno"], M2_SHARE["other"])
    pheno[mac] = np.where(u[mac] < m2[mac], "m2_macrophage", "macrophage")
    markers = {f"{m}_pos": np.zeros(len(kind), bool) for m in MARKERS if m != "DAPI"}
    for t, needs in PHENOTYPE_MARKERS.items():
        for m in needs:
            markers[f"{m}_pos"] |= pheno == t
    return make_table(
        table.x, table.y, pheno, source="cscvision synth mif (truth)", mpp=table.mpp,
        prob=np.ones(len(kind), np.float32), slide_id=table.slide_id, markers=markers,
        cell_id=table.ids,
    )  # fmt: skip


def cell_signals(rng: np.random.Generator, kind: np.ndarray, truth: CellTable,
                 brightness: np.ndarray) -> np.ndarray:  # fmt: skip
    """float32[N, C]: DAPI in every nucleus (dim in dead ones), each marker in its cells."""
    n = len(kind)
    out = np.zeros((n, len(CHANNELS)), np.float32)
    out[:, 0] = rng.lognormal(0, 0.2, n) * np.where(kind == "dead", 0.5, 1.0) * brightness[0]
    for k, marker in enumerate(MARKERS[1:], start=1):
        pos = np.asarray(truth.markers[f"{marker}_pos"], bool)
        out[:, k] = pos * rng.lognormal(0, 0.35, n) * brightness[k]
    return out


def panel_yaml() -> str:
    """The panel file of the synthetic mIF (format: cscvision.cells.mif_panel)."""
    lines = ["# cscvision mIF panel of `cscvision synth --mif`", "nuclear_marker: DAPI",
             "markers:"]  # fmt: skip
    lines += [f"  - {{channel: {c}, marker: {m}, compartment: {p}}}" for c, m, p in CHANNELS]
    lines += ["phenotypes:"]
    for t, all_of, any_of in PANEL_RULES:
        rule = f"  - {{type: {t}, all: [{', '.join(all_of)}]"
        lines.append(rule + (f", any: [{', '.join(any_of)}]}}" if any_of else "}"))
    lines.append("default_type: other")
    lines.append(f"lineage: [{', '.join(LINEAGE)}]")
    return "\n".join(lines) + "\n"


def write_mif_slide(path: Path, *, he_id: str, renderer, seed: int, mif_mpp: float | None = None,
                    tile_px: int = 256) -> dict:  # fmt: skip
    """Write ``path`` (``<he_id>_mif.ome.tiff``), its truth JSON and its true cell table;
    return the truth record."""
    layout = renderer.layout
    mif_mpp = mif_mpp or layout.mpp
    rng = np.random.default_rng([seed, 60])
    transform, (w, h) = draw_transform(rng, (layout.width_px, layout.height_px), layout.mpp,
                                       mif_mpp)  # fmt: skip
    cells = slide_cells(renderer, he_id)
    region = renderer.class_at(cells.x, cells.y)
    truth = true_phenotypes(cells, region, seed)
    kind = cells.cell_type.astype(str)
    brightness = np.concatenate([[1.0], rng.uniform(0.6, 1.2, len(CHANNELS) - 1)])
    af = np.asarray(AUTOFLUORESCENCE, np.float32) * np.float32(rng.uniform(0.7, 1.5))
    to_um = 1.0 / layout.mpp
    nucleus_um = np.array([NUCLEUS_UM[k] for k in kind]) * rng.uniform(0.9, 1.1, len(kind))
    mif_cells = MifCells(
        x=cells.x,
        y=cells.y,
        nucleus_px=nucleus_um * to_um,
        body_px=np.array([BODY_UM[k] for k in kind]) * to_um,
        signal=cell_signals(rng, kind, truth, brightness),
    )
    optics = Optics(tuple(c for _, _, c in CHANNELS), af, spillover=float(rng.uniform(0.04, 0.08)),
                    blur_px=0.4 / mif_mpp)  # fmt: skip
    mif = MifRenderer(mif_cells, optics, transform, renderer.class_at, mpp=mif_mpp, seed=seed)
    write_ome_pyramid(path, render_all(mif, w, h), [c for c, _, _ in CHANNELS], mif_mpp,
                      tile_px=tile_px)  # fmt: skip
    slide_id = path.name[: -len(".ome.tiff")]
    record = {
        "slide_id": slide_id, "he_slide_id": he_id, "seed": seed, "width_px": w, "height_px": h,
        "mpp": mif_mpp, "he_mpp": layout.mpp,
        "transform": {"direction": "mif level-0 px -> he level-0 px: x_he = M @ [x, y, 1]",
                      "matrix": transform.matrix.tolist()},
        "channels": [{"name": c, "marker": m, "compartment": p,
                      "brightness": round(float(b), 4), "autofluorescence": round(float(a), 4)}
                     for (c, m, p), b, a in zip(CHANNELS, brightness, af, strict=True)],
        "spillover": optics.spillover, "blur_px": optics.blur_px,
        "counts": {"gain": 4000.0, "offset": 200.0},
        "true_cells": path.name[: -len(SUFFIX)] + TRUTH_CELLS,
        "type_counts": truth.counts(),
    }  # fmt: skip
    write_json(path.with_name(f"{slide_id}_truth.json"), record)
    write_cell_table(path.with_name(record["true_cells"]), truth)
    return record


def render_all(mif: MifRenderer, width: int, height: int) -> np.ndarray:
    out = np.empty((len(CHANNELS), height, width), np.uint16)
    for y0 in range(0, height, WINDOW_PX):
        for x0 in range(0, width, WINDOW_PX):
            ww, hh = min(WINDOW_PX, width - x0), min(WINDOW_PX, height - y0)
            out[:, y0 : y0 + hh, x0 : x0 + ww] = mif.render(x0, y0, ww, hh)
    return out


def reduce2(level: np.ndarray) -> np.ndarray:
    """Mean of 2 x 2 blocks (an odd last row/column is averaged with itself)."""
    c, h, w = level.shape
    padded = np.pad(level, ((0, 0), (0, h % 2), (0, w % 2)), mode="edge").astype(np.float32)
    red = padded.reshape(c, (h + 1) // 2, 2, (w + 1) // 2, 2).mean(axis=(2, 4))
    return np.rint(red).astype(level.dtype)


def write_ome_pyramid(path: Path, data: np.ndarray, channel_names: list[str], mpp: float, *,
                      tile_px: int = 256, min_side: int = 512) -> Path:  # fmt: skip
    """``data`` (C, Y, X) as a pyramidal OME-TIFF: tifffile's OME writer, levels halving in
    SubIFDs down to ``min_side``, channel names and physical pixel size in the OME-XML."""
    import tifffile

    levels = [data]
    while max(levels[-1].shape[1:]) > min_side:
        levels.append(reduce2(levels[-1]))
    meta = {
        "axes": "CYX", "Channel": {"Name": list(channel_names)},
        "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm",
    }  # fmt: skip
    opts = {"tile": (tile_px, tile_px), "compression": "zlib", "photometric": "minisblack"}
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
        tif.write(levels[0], subifds=len(levels) - 1, metadata=meta,
                  resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER",
                  **opts)  # fmt: skip
        for k, level in enumerate(levels[1:], start=1):
            res = 1e4 / (mpp * 2**k)
            tif.write(level, subfiletype=1, resolution=(res, res), resolutionunit="CENTIMETER",
                      **opts)  # fmt: skip
    return path


def write_panel(path: Path) -> Path:
    return write_text(path, panel_yaml())


def qpi_description(name: str, image_type: str = "FullResolution") -> str:
    """A page description as Akoya's scanners write it (a subset of its elements)."""
    return (
        '<?xml version="1.0" encoding="utf-8"?>\r\n<PerkinElmer-QPI-ImageDescription>\r\n'
        "<DescriptionVersion>2</DescriptionVersion>\r\n"
        "<AcquisitionSoftware>cscvision synth</AcquisitionSoftware>\r\n"
        f"<ImageType>{image_type}</ImageType>\r\n<Name>{name}</Name>\r\n"
        "</PerkinElmer-QPI-ImageDescription>"
    )


def write_qptiff(path: Path, data: np.ndarray, channel_names: list[str], mpp: float, *,
                 tile_px: int = 256, min_side: int = 512) -> Path:  # fmt: skip
    """``data`` (C, Y, X) laid out as a ``.qptiff``: the full-resolution channels (one page
    each, Software ``PerkinElmer-QPI``, a QPI XML description naming the channel), an RGB
    thumbnail, then each reduced level's channels (halving)."""
    import tifffile

    opts = {"compression": "zlib", "software": "PerkinElmer-QPI", "metadata": None}
    res = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    levels = [data]
    while max(levels[-1].shape[1:]) > min_side:
        h, w = levels[-1].shape[1:]
        levels.append(reduce2(levels[-1])[:, : h // 2, : w // 2])
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for plane, name in zip(data, channel_names, strict=True):
            tif.write(plane, tile=(tile_px, tile_px), description=qpi_description(name),
                      photometric="minisblack", **res, **opts)  # fmt: skip
        small = levels[-1][:3] if len(data) >= 3 else np.repeat(levels[-1][:1], 3, 0)
        thumb = (np.clip(small / max(1, small.max()), 0, 1) * 255).astype(np.uint8)
        tif.write(np.moveaxis(thumb, 0, -1), description=qpi_description("", "Thumbnail"),
                  photometric="rgb", **opts)  # fmt: skip
        for k, level in enumerate(levels[1:], start=1):
            r = {"resolution": (1e4 / (mpp * 2**k),) * 2, "resolutionunit": "CENTIMETER"}
            for plane, name in zip(level, channel_names, strict=True):
                text = qpi_description(name, "ReducedResolution")
                tif.write(plane, tile=(tile_px, tile_px), photometric="minisblack", **r,
                          description=text, **opts)  # fmt: skip
    return path

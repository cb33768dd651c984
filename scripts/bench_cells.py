"""Cell features at scale, on one core: synthetic 1M cells, a real whole slide, a 1 GB GeoJSON.

``synthetic``: a cell table of 1,000,000 cells (lymphocytes, macrophages, tumour, stroma,
dead; clustered so tiles differ) over a 50,000 × 50,000 px slide at 0.5 µm/px, tiles of
224 px; times and peak memory (ru_maxrss of a fresh process) of reading the table alone
and of reading it plus every tile feature (targets < 60 s, < 2 GB).

``histolytics``: the whole slide's cells of histolytics 0.3.0 (``hgsc_nuclei_wsi.parquet``,
592,349 nucleus polygons of high-grade serous ovarian carcinoma, classes from a model, not
a pathologist; ``macrophage_nucleus`` dropped as the nuclei of ``macrophage_cell``), tissue
from ``hgsc_tissue_wsi.parquet``, read from the wheel (``pip download --no-deps
histolytics==0.3.0 -d DIR``; pass ``--wheel``). The package states no µm/px; 0.5 is
assumed (the median nucleus area is then ~40-60 µm², the size of these nuclei at 20x).
Also draws the two 1500 px crops beside their inflammatory and tumour density maps.

``geojson``: writes a QuPath GeoJSON of about ``--gb`` GB (cells with 30 measurements) and
reads it in a fresh process: seconds and peak memory (target < 1 GB for 1 GB).

    .venv/bin/python scripts/bench_cells.py synthetic
    pip download --no-deps histolytics==0.3.0 -d /tmp/wheels
    .venv/bin/python scripts/bench_cells.py histolytics \
        --wheel /tmp/wheels/histolytics-0.3.0-py3-none-any.whl
    .venv/bin/python scripts/bench_cells.py geojson --gb 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

SLIDE_PX = 50_000
MPP = 0.5
TILE_PX = 224


def _one_core() -> None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})


def _in_child(code: str) -> dict:
    """Run ``code`` (which prints one JSON line) in a fresh one-core process; add its peak RSS."""
    prelude = "import os, json, time, resource, sys\nsys.path.insert(0, 'scripts')\n"
    prelude += "from bench_cells import _one_core\n_one_core()\n"
    out = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result


PEAK = "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024"  # MiB (Linux: KiB)


def make_synthetic(path: Path, n: int = 1_000_000, seed: int = 0) -> None:
    from cscvision.cells.table import make_table, write_cell_table

    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, SLIDE_PX, (400, 2))
    kinds = np.array(["lymphocyte", "macrophage", "tumour", "stroma", "dead"], dtype=object)
    which = rng.integers(0, len(centres), n)
    xy = centres[which] + rng.normal(0, 1500, (n, 2))
    xy = np.clip(xy, 0, SLIDE_PX - 1)
    kind = kinds[(which + rng.integers(0, 2, n)) % len(kinds)]
    table = make_table(
        xy[:, 0],
        xy[:, 1],
        kind,
        source="bench",
        mpp=MPP,
        prob=rng.uniform(0.5, 1, n).astype(np.float32),
    )
    write_cell_table(path, table)


def synthetic(args: argparse.Namespace) -> None:
    folder = Path(tempfile.mkdtemp(prefix="bench_cells_"))
    path = folder / "S.cells.parquet"
    make_synthetic(path, args.cells)
    read = _in_child(
        f"from cscvision.cells.table import read_cell_table\nt0 = time.perf_counter()\n"
        f"t = read_cell_table({str(path)!r})\n"
        f"print(json.dumps({{'s': time.perf_counter() - t0, 'n': len(t), 'mib': {PEAK}}}))"
    )
    feats = _in_child(
        "import numpy as np\nfrom cscvision.cells.table import read_cell_table\n"
        "from cscvision.cells.tiles import tile_cell_features\n"
        "from cscvision.slides.grid import grid_coords\n"
        f"t0 = time.perf_counter()\nt = read_cell_table({str(path)!r})\n"
        f"xy = grid_coords(({SLIDE_PX}, {SLIDE_PX}), {TILE_PX}, {TILE_PX})\n"
        "f = tile_cell_features(t, xy, np.ones(len(xy), np.float32), "
        f"{TILE_PX}, {MPP})\n"
        "print(json.dumps({'s': time.perf_counter() - t0, 'tiles': len(xy), "
        f"'columns': len(f.columns), 'inside': f.cells_in_tiles, 'mib': {PEAK}}}))"
    )
    print(
        f"{read['n']:,} synthetic cells, {feats['tiles']:,} tiles of {TILE_PX} px at {MPP} "
        f"µm/px, one core"
    )
    print(f"  read the table alone         {read['s']:6.2f} s   peak {read['mib']:7.0f} MiB")
    print(
        f"  read + every tile feature    {feats['s']:6.2f} s   peak {feats['mib']:7.0f} MiB"
        f"   ({feats['columns']} columns; targets < 60 s, < 2048 MiB)"
    )


def _extract(wheel: Path, names: list[str], folder: Path) -> list[Path]:
    with zipfile.ZipFile(wheel) as z:
        return [Path(z.extract(f"histolytics/data/{n}", folder)) for n in names]


def _tissue_mask(tissue_path: Path, shape_l0: tuple[int, int], step: int) -> np.ndarray:
    """Tissue polygons (every class but serum and haemorrhage) rasterised at 1/step."""
    import pyarrow.parquet as pq
    import shapely
    from PIL import Image, ImageDraw

    t = pq.read_table(tissue_path, columns=["geometry", "class_name"])
    geoms = shapely.from_wkb(t.column("geometry").to_numpy(zero_copy_only=False))
    names = np.array(t.column("class_name").to_pylist())
    img = Image.new("L", (shape_l0[0] // step + 1, shape_l0[1] // step + 1), 0)
    draw = ImageDraw.Draw(img)
    for g in geoms[~np.isin(names, ["serum", "hemorragia"])]:
        for part in shapely.get_parts(g):
            if part.geom_type == "Polygon" and not part.is_empty:
                draw.polygon([tuple(c) for c in np.asarray(part.exterior.coords) / step], fill=1)
    return np.asarray(img).astype(bool)


def histolytics(args: argparse.Namespace) -> None:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    nuclei, tissue = _extract(
        args.wheel, ["hgsc_nuclei_wsi.parquet", "hgsc_tissue_wsi.parquet"], out
    )
    run = _in_child(
        "import numpy as np\nfrom cscvision.cells.readers import read_cells\n"
        "from cscvision.cells.tiles import tile_cell_features\n"
        "from cscvision.slides.grid import grid_coords\n"
        "from cscvision.slides.tissue import tissue_fraction\n"
        "from bench_cells import _tissue_mask\nfrom pathlib import Path\n"
        f"t0 = time.perf_counter()\nt = read_cells({str(nuclei)!r}, 'histolytics', mpp={MPP})\n"
        "t1 = time.perf_counter()\nw, h = int(t.x.max()) + 1, int(t.y.max()) + 1\n"
        f"mask = _tissue_mask(Path({str(tissue)!r}), (w, h), 16)\n"
        f"xy = grid_coords((w, h), {TILE_PX}, {TILE_PX})\n"
        f"frac = tissue_fraction(mask, 1 / 16, xy, {TILE_PX})\nkeep = frac >= 0.5\n"
        "t2 = time.perf_counter()\n"
        f"f = tile_cell_features(t, xy[keep], frac[keep], {TILE_PX}, {MPP})\n"
        "t3 = time.perf_counter()\nc = f.columns\n"
        "print(json.dumps({'read_s': t1 - t0, 'tissue_s': t2 - t1, 'features_s': t3 - t2,"
        " 'n': len(t), 'counts': t.counts(), 'tiles': int(keep.sum()), 'inside': f.cells_in_tiles,"
        " 'dens_infl': float(np.nanmedian(c['density_inflammatory'])),"
        " 'dens_tum': float(np.nanmedian(c['density_tumour'])),"
        " 'nn': float(np.nanmedian(c['nn_inflammatory_to_tumour_um'])),"
        " 'mix': float(np.nanmedian(c['mixing_inflammatory_tumour'])),"
        f" 'extent': [w, h], 'mib': {PEAK}}}))"
    )
    print(
        f"histolytics hgsc_nuclei_wsi: {run['n']:,} cells kept of 592,349 "
        f"(macrophage_nucleus dropped), extent {run['extent'][0]} x {run['extent'][1]} px, "
        f"assumed {MPP} µm/px; {run['tiles']:,} tissue tiles of {TILE_PX} px; one core"
    )
    print(f"  types: {run['counts']}; cells in tissue tiles: {run['inside']:,}")
    print(
        f"  read (WKB -> centroids) {run['read_s']:.2f} s · tissue mask + grid "
        f"{run['tissue_s']:.2f} s · features {run['features_s']:.2f} s · peak {run['mib']:.0f} MiB"
    )
    print(
        f"  medians over tiles: inflammatory {run['dens_infl']:.0f} /mm², tumour "
        f"{run['dens_tum']:.0f} /mm², inflammatory→tumour NN {run['nn']:.1f} µm, "
        f"mixing {run['mix']:.2f}"
    )
    for name in ("hgsc_nest", "hgsc_stromal"):
        crop_figure(args.wheel, name, out)


def crop_figure(wheel: Path, name: str, out: Path, tile: int = 100) -> Path:
    """The crop's H&E beside its inflammatory and tumour density maps (tiles of ``tile`` px)."""
    from PIL import Image

    from cscvision.cells.readers import read_cells
    from cscvision.cells.tiles import tile_cell_features
    from cscvision.outputs.overlay import colormap
    from cscvision.slides.grid import grid_coords

    cells = "hgsc_nest.parquet" if name == "hgsc_nest" else "hgsc_stromal_cells.parquet"
    image = "hgsc_nest.jpg" if name == "hgsc_nest" else "hgsc_stromal_he.jpg"
    parquet, jpg = _extract(wheel, [cells, image], out)
    rgb = np.asarray(Image.open(jpg).convert("RGB"))
    t = read_cells(parquet, "histolytics", mpp=MPP)
    h, w = rgb.shape[:2]
    xy = grid_coords((w, h), tile, tile)
    f = tile_cell_features(t, xy, np.ones(len(xy), np.float32), tile, MPP).columns
    panels = [rgb]
    for kind in ("inflammatory", "tumour"):
        dens = f.get(f"density_{kind}", np.zeros(len(xy)))
        grid = dens.reshape(-(-h // tile), -(-w // tile))
        top = max(float(np.nanmax(grid)), 1.0)
        heat = colormap(grid / top)
        big = np.asarray(Image.fromarray(heat).resize((w, h), Image.Resampling.NEAREST))
        panels.append((0.35 * rgb + 0.65 * big).astype(np.uint8))
        print(
            f"  {name}: {kind} density up to {top:.0f} cells/mm² (tiles of {tile} px = "
            f"{tile * MPP:g} µm)"
        )
    figure = np.concatenate(panels, axis=1)
    path = out / f"{name}_density.png"
    Image.fromarray(figure).resize((figure.shape[1] // 3, figure.shape[0] // 3)).save(path)
    return path


def geojson(args: argparse.Namespace) -> None:
    folder = Path(tempfile.mkdtemp(prefix="bench_geojson_"))
    path = folder / "S.geojson"
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    n = 0
    with path.open("w") as f:
        f.write('{"type":"FeatureCollection","features":[\n')
        while True:
            x, y = rng.uniform(0, 80_000, 2)
            ring = [[x + 5 * np.cos(a), y + 5 * np.sin(a)] for a in np.linspace(0, 6.283, 13)]
            m = {f"Measurement {k}": round(float(v), 4) for k, v in enumerate(rng.random(30))}
            feature = {
                "type": "Feature",
                "id": f"{n:032x}",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "nucleusGeometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "cell",
                    "classification": {"name": ("Tumor", "Immune cells", "Stroma")[n % 3]},
                    "isLocked": False,
                    "measurements": m,
                },
            }
            f.write(("," if n else "") + json.dumps(feature, separators=(",", ":")) + "\n")
            n += 1
            if n % 10000 == 0 and f.tell() >= args.gb * 1e9:
                break
        f.write("]}\n")
    size = path.stat().st_size
    write_s = time.perf_counter() - t0
    run = _in_child(
        "from cscvision.cells.readers import read_cells\nt0 = time.perf_counter()\n"
        f"t = read_cells({str(path)!r}, 'qupath')\n"
        f"print(json.dumps({{'s': time.perf_counter() - t0, 'n': len(t), "
        f"'markers': len(t.markers), 'mib': {PEAK}}}))"
    )
    print(
        f"QuPath GeoJSON of {size / 1e9:.2f} GB ({n:,} cells, 30 measurements each; written "
        f"in {write_s:.0f} s): read in {run['s']:.0f} s, peak {run['mib']:.0f} MiB "
        f"({run['n']:,} cells, {run['markers']} measurement columns; target < 1 GB)"
    )
    path.unlink()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("synthetic")
    s.add_argument("--cells", type=int, default=1_000_000)
    h = sub.add_parser("histolytics")
    h.add_argument("--wheel", type=Path, required=True)
    h.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "bench_cells_hgsc")
    g = sub.add_parser("geojson")
    g.add_argument("--gb", type=float, default=1.0)
    args = p.parse_args()
    {"synthetic": synthetic, "histolytics": histolytics, "geojson": geojson}[args.what](args)


if __name__ == "__main__":
    main()

"""DICOM WSI against the TIFF it came from: pixel differences and output differences.

Writes a synthetic Aperio-layout SVS (H&E-like texture, 3 levels), converts it to DICOM with
``wsidicomizer`` (the ``dicom`` extra; JPEG frames copied from the TIFF, not re-encoded),
then prints, per pyramid level, the largest absolute pixel difference between OpenSlide's
reads of the two over a grid of regions, and which ``cscvision tile`` / ``cscvision infer``
outputs (demo model) differ between them (``summary.json`` and ``tiles.json`` hold the slide
path, so they are compared without it and the timings).

    .venv/bin/python scripts/dicom_roundtrip.py --size 2048
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from cscvision.cli import main
from cscvision.slides.slide import open_slide
from cscvision.testing import output_snapshot, texture_tile_fn, write_pyramid

DEMO_MODEL = Path(__file__).resolve().parents[1] / "models" / "demo-synthetic"
VOLATILE = ("slide_path", "seconds", "predict_seconds", "slide_size_bytes", "slide_mtime")


def max_pixel_difference(a_path: Path, b_path: Path, region_px: int = 300) -> list[int]:
    with open_slide(a_path) as a, open_slide(b_path) as b:
        worst = []
        for level, (w, h) in enumerate(a.info.level_dimensions):
            ds = a.info.level_downsamples[level]
            diff = 0
            for y in range(0, h, region_px):
                for x in range(0, w, region_px):
                    xy = (round(x * ds), round(y * ds))
                    ra = a.read_region(xy, level, (region_px, region_px)).astype(np.int16)
                    rb = b.read_region(xy, level, (region_px, region_px)).astype(np.int16)
                    diff = max(diff, int(np.abs(ra - rb).max()))
            worst.append(diff)
    return worst


def differing_outputs(a_out: Path, b_out: Path, slide_id: str) -> list[str]:
    a, b = output_snapshot(a_out / slide_id), output_snapshot(b_out / slide_id)
    names = sorted(set(a) | set(b))
    differ = []
    for name in names:
        if name.endswith(".json") and name in a and name in b:
            ja, jb = json.loads(a[name]), json.loads(b[name])
            for key in VOLATILE:
                ja.pop(key, None), jb.pop(key, None)
            if ja != jb:
                differ.append(name)
        elif a.get(name) != b.get(name):
            differ.append(name)
    return differ


def main_(size: int) -> None:
    from wsidicomizer import WsiDicomizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "tiff").mkdir()
        svs = root / "tiff" / "sample.svs"
        write_pyramid(svs, texture_tile_fn(3)(0, 0, 0, size, size), aperio=True, thumbnail_px=256)
        dicom = root / "dicom" / "sample"
        dicom.mkdir(parents=True)
        WsiDicomizer.convert(
            svs, dicom, tile_size=256, include_label=False, include_overview=False,
            include_thumbnail=False, workers=1,
        )  # fmt: skip
        print(f"{size} x {size} px slide, {len(list(dicom.glob('*.dcm')))} DICOM files")
        for level, diff in enumerate(max_pixel_difference(svs, dicom)):
            print(f"level {level}: max |DICOM - TIFF| = {diff}")
        for command, extra in (
            ("tile", ["--export-tiles"]),
            ("infer", ["--model", str(DEMO_MODEL)]),
        ):
            outs = {}
            for kind, path in (("tiff", svs), ("dicom", dicom)):
                outs[kind] = root / f"out_{command}_{kind}"
                argv = [command, str(path), "--out", str(outs[kind]), *extra]
                if command == "infer":
                    argv += ["--workers", "0", "--threads", "1"]
                assert main(argv) == 0
            files = len(output_snapshot(outs["tiff"] / "sample"))
            differ = differing_outputs(outs["tiff"], outs["dicom"], "sample")
            print(f"cscvision {command}: {files} files, differing: {differ or 'none'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048, help="level-0 side in pixels")
    main_(parser.parse_args().size)

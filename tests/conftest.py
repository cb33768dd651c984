"""Shared fixtures: the real slides in ../shared/data and small synthetic pyramids."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cscvision.slides.slide import SlideInfo

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CMU_SVS = DATA / "cmu_small_region.svs"
IHC_PNG = DATA / "ihc.png"


@pytest.fixture(scope="session")
def cmu_svs() -> Path:
    if not CMU_SVS.exists():
        pytest.skip(f"real test slide absent: {CMU_SVS} (../shared/data is not beside the project)")
    return CMU_SVS


@pytest.fixture(scope="session")
def ihc_png() -> Path:
    if not IHC_PNG.exists():
        pytest.skip(f"real test image absent: {IHC_PNG} (../shared/data is not beside the project)")
    return IHC_PNG


def tissue_like(width: int, height: int, seed: int = 0, box: tuple | None = None) -> np.ndarray:
    """White glass with one pink-purple textured rectangle of 'tissue' (x0, y0, x1, y1)."""
    rng = np.random.default_rng(seed)
    rgb = np.full((height, width, 3), 243, np.uint8)
    x0, y0, x1, y1 = box or (width // 4, height // 4, 3 * width // 4, 3 * height // 4)
    h, w = y1 - y0, x1 - x0
    base = np.array([200, 120, 175], np.float32)
    noise = rng.normal(0, 18, (h, w, 1)).astype(np.float32)
    rgb[y0:y1, x0:x1] = np.clip(base + noise * np.array([1, 1.2, 0.8]), 0, 255).astype(np.uint8)
    return rgb


@dataclasses.dataclass
class ArraySlide:
    """An in-memory array standing in for a slide (the SlideReader protocol)."""

    rgb: np.ndarray
    info: SlideInfo

    @classmethod
    def make(cls, rgb: np.ndarray, mpp: float = 0.5, bounds=None) -> ArraySlide:
        h, w = rgb.shape[:2]
        info = SlideInfo(
            path="array",
            vendor="array",
            dimensions=(w, h),
            level_dimensions=((w, h),),
            level_downsamples=(1.0,),
            mpp=mpp,
            mpp_source="override",
            objective_power=None,
            bounds=bounds or (0, 0, w, h),
        )
        return cls(rgb, info)

    def read_region(self, xy_l0, level, size):
        out = np.full((size[1], size[0], 3), 255, np.uint8)
        x, y = xy_l0
        part = self.rgb[max(y, 0) : y + size[1], max(x, 0) : x + size[0]]
        out[max(-y, 0) : max(-y, 0) + part.shape[0], max(-x, 0) : max(-x, 0) + part.shape[1]] = part
        return out

    def thumbnail(self, mpp: float) -> np.ndarray:
        h, w = self.rgb.shape[:2]
        scale = self.info.mpp / mpp
        size = (max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale)))
        return np.asarray(Image.fromarray(self.rgb).resize(size, Image.Resampling.BOX))


@pytest.fixture(scope="session")
def demo_batch(tmp_path_factory) -> dict:
    """A finished `cscvision infer` batch: 2 synthetic slides scored by the committed demo
    model, plus one broken slide recorded in errors.csv."""
    from cscvision.cli import main
    from cscvision.synth import write_cohort

    root = tmp_path_factory.mktemp("demo_batch")
    cohort = write_cohort(root / "cohort", n_slides=2, n_patients=2, size_px=2048, seed=5)
    slides = sorted(str(p) for p in cohort.parent.glob("*.tiff"))
    broken = root / "cohort_broken" / "broken.svs"
    broken.parent.mkdir()
    broken.write_bytes(b"not a slide at all")
    out = root / "infer"
    model = Path(__file__).resolve().parents[1] / "models" / "demo-synthetic"
    code = main(["infer", *slides, str(broken), "--model", str(model), "--out", str(out),
                 "--workers", "0", "--threads", "1"])  # fmt: skip
    assert code == 1  # the broken slide failed, the others finished
    return {"out": out, "cohort": cohort, "model": model, "slides": slides, "broken": broken}

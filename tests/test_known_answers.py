"""Known answers that a plausible wrong implementation fails (issue 11, item 5).

* blending: the exact Hann weights of two overlapping tiles (a flat window gives 0.5);
* resizing: antialiasing against a reference area-average resize on a 1-px checkerboard
  (nearest-neighbour keeps the full-contrast aliasing);
* thresholds: chosen on validation and left alone by the test set (changing the test
  labels must not change the card's thresholds).

Morisita–Horn against cosine similarity is in ``test_statistics.py``; training labels
shifted against their tiles is ``test_learning.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cscvision.inference.stitch import map_layout, stitch
from cscvision.slides.slide import resize_tile


def _hann(u: float) -> float:
    return float(np.sin(np.pi * u) ** 2)


def test_two_overlapping_tiles_blend_with_exact_hann_weights():
    """Tiles of 4 map pixels at half overlap (stride 2): tile A (p = 1) at column 0, tile
    B (p = 0) at column 1. Columns 2 and 3 are shared; at column 2 A's weight is the Hann
    window at u = 2.5/4 and B's at u = 0.5/4 (and the same in y for both, which cancels)."""
    cells = np.array([[0, 0], [1, 0]])
    probs = np.array([[1.0], [0.0]], np.float32)
    layout = map_layout((0, 0), (1, 2), tile_l0=64, stride_l0=32, sub=2)
    assert layout.foot_px == 4 and layout.shape == (4, 6)
    row = stitch(cells, probs, layout)[0, 1]
    col2 = _hann(2.5 / 4) / (_hann(2.5 / 4) + _hann(0.5 / 4))
    col3 = _hann(3.5 / 4) / (_hann(3.5 / 4) + _hann(1.5 / 4))
    np.testing.assert_allclose(row, [1, 1, col2, col3, 0, 0], atol=1e-6)
    assert col2 == pytest.approx(0.853553, abs=1e-6)  # cos²(π/8): a flat window gives 0.5


@pytest.mark.parametrize("source_px", [300, 500])  # Lanczos alone; reduce(2) then Lanczos
def test_resize_is_antialiased_on_a_high_frequency_pattern(source_px):
    """A 1-px checkerboard is above what a 224-px tile can show: the reference (ideal
    low-pass) resize is flat grey at its mean. An antialiased resize stays close to it;
    nearest-neighbour gives black and white (mean deviation ~127)."""
    checker = ((np.indices((source_px, source_px)).sum(0) % 2) * 255).astype(np.uint8)
    out = resize_tile(np.repeat(checker[..., None], 3, axis=2), 224).astype(np.float64)
    assert out.shape == (224, 224, 3)
    assert np.abs(out - 127.5)[8:-8, 8:-8].mean() < 12


@pytest.mark.parametrize("source_px", [300, 500])
def test_resize_keeps_a_low_frequency_pattern(source_px):
    """A sinusoid 40 output pixels long survives: the result matches it sampled at the
    output pixel centres (the reference resize of a band-limited pattern)."""
    period = 40 * source_px / 224
    x = np.arange(source_px) + 0.5
    wave = 127.5 + 100 * np.sin(2 * np.pi * x / period)
    rgb = np.repeat(np.tile(wave, (source_px, 1))[..., None], 3, axis=2).round().astype(np.uint8)
    out = resize_tile(rgb, 224).astype(np.float64)[..., 0]
    u = (np.arange(224) + 0.5) * source_px / 224
    reference = 127.5 + 100 * np.sin(2 * np.pi * u / period)
    assert np.abs(out - reference[None, :])[:, 8:-8].max() < 6


def _batches(labels: torch.Tensor, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    n = len(labels)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    images[:, 0] = torch.where(labels[:, 0, None, None] > 0, 200, 40).to(torch.uint8)
    xy = torch.stack([torch.arange(n) * 32, torch.zeros(n, dtype=torch.long)], 1)
    return DataLoader([
        {"image": images[i : i + 16], "target": labels[i : i + 16],
         "slide_idx": torch.zeros(len(labels[i : i + 16]), dtype=torch.long), "xy": xy[i : i + 16]}
        for i in range(0, n, 16)
    ], batch_size=None)  # fmt: skip


def test_test_labels_never_change_the_thresholds():
    import lightning as L

    from cscvision.training.lit import TileClassifier

    torch.manual_seed(0)
    torch.set_num_threads(1)
    module = TileClassifier(backbone="small_cnn", targets=("a", "b"), channels_last=False)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    labels = (torch.rand(64, 2, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    trainer.validate(module, _batches(labels, 0), verbose=False)
    chosen = module.thresholds.clone()
    f1 = []
    for flip in (False, True):
        test_labels = 1 - labels if flip else labels
        trainer.test(module, _batches(test_labels, 0), verbose=False)
        torch.testing.assert_close(module.thresholds, chosen)
        f1.append(module.last_metrics["test"]["f1_a"])
    assert f1[0] != f1[1]  # the test set was scored at the validation thresholds

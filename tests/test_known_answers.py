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


class _RedScore(torch.nn.Module):
    """A fixed "model": the logit of both targets rises with the tile's mean red value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = x[:, 0].mean((1, 2))
        return torch.stack([red, red], 1) * 4


def _batches(cutoff: int) -> DataLoader:
    """64 tiles of increasing redness; a tile is positive when its red value > ``cutoff``."""
    red = torch.linspace(0, 255, 64)
    images = torch.zeros(64, 3, 32, 32, dtype=torch.uint8)
    images[:, 0] = red.round().to(torch.uint8)[:, None, None]
    labels = (red > cutoff).float()[:, None].repeat(1, 2)
    xy = torch.stack([torch.arange(64) * 32, torch.zeros(64, dtype=torch.long)], 1)
    batches = [
        {"image": images[i : i + 16], "target": labels[i : i + 16],
         "slide_idx": torch.zeros(16, dtype=torch.long), "xy": xy[i : i + 16]}
        for i in range(0, 64, 16)
    ]  # fmt: skip
    return DataLoader(batches, batch_size=None)


def test_test_labels_never_change_the_thresholds():
    """Thresholds are chosen on validation (positives above red 128); scoring test sets
    whose positives start at red 200 or at red 60 leaves them as they are (choosing on the
    test set would move them to each test set's own best F1)."""
    import lightning as L

    from cscvision.training.lit import TileClassifier

    torch.set_num_threads(1)
    module = TileClassifier(net=_RedScore(), targets=("a", "b"), channels_last=False)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.validate(module, _batches(128), verbose=False)
    chosen = module.thresholds.clone()
    f1 = []
    for cutoff in (200, 60):
        trainer.test(module, _batches(cutoff), verbose=False)
        torch.testing.assert_close(module.thresholds, chosen)
        f1.append(module.last_metrics["test"]["f1_a"])
    assert max(f1) < 1.0 and f1[0] != f1[1]  # scored at the validation threshold

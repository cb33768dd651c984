"""The small CPU CNN (``small_cnn``), defined here so that a trained one can also serve as a
tile encoder (``demo-cnn``: the feature layers of ``models/demo-synthetic``)."""

from __future__ import annotations

import torch
from torch import nn

SMALL_CNN_DIM = 128


def small_cnn_layers() -> list[nn.Module]:
    """The feature layers: [B, 3, H, W] → [B, 128, H/32, W/32]."""

    def block(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )

    return [
        nn.Conv2d(3, 24, 5, stride=2, padding=2, bias=False),
        nn.BatchNorm2d(24),
        nn.ReLU(inplace=True),
        block(24, 32),
        block(32, 64),
        block(64, 96),
        block(96, SMALL_CNN_DIM),
    ]


def small_cnn(num_outputs: int) -> nn.Module:
    """A ~0.4 M-parameter CNN for CPU runs and the demo."""
    return nn.Sequential(
        *small_cnn_layers(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(SMALL_CNN_DIM, num_outputs),
    )


class SmallCnnTrunk(nn.Sequential):
    """``small_cnn`` without its head, with timm's ``forward_features``; its keys are those
    of a trained ``small_cnn`` (whose classifier, ``10.*``, is dropped on loading)."""

    def __init__(self) -> None:
        super().__init__(*small_cnn_layers())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)

"""scripts/eval_ood_input.py's grey input: the OOD features no longer see hue."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

from cscvision.models.backbones import get_model
from cscvision.models.ood import feature_tap

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
MEAN, STD = (0.7, 0.5, 0.7), (0.15, 0.2, 0.15)


def _block_features(net: torch.nn.Module, rgb: torch.Tensor) -> torch.Tensor:
    x = (rgb - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad(), feature_tap(net) as seen:
        net(x)
    return seen[0]


def test_grey_input_gives_equal_features_to_tiles_differing_only_in_hue():
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    grey_forward = importlib.import_module("eval_ood_input").grey_forward
    torch.manual_seed(0)
    net = get_model("small_cnn", 2).eval()
    texture = torch.rand(1, 1, 64, 64) * 0.3 + 0.3
    pink = torch.cat([texture * 1.2, texture * 0.8, texture * 1.1], 1)
    w = torch.tensor([0.299, 0.587, 0.114])
    # a bluer tile with the same grey level at every pixel: G and B set, R solved for
    grey = (pink * w.view(1, 3, 1, 1)).sum(1, keepdim=True)
    g, b = texture * 0.7, texture * 1.6
    blue = torch.cat([(grey - 0.587 * g - 0.114 * b) / 0.299, g, b], 1)
    assert not torch.allclose(pink, blue)
    colour = _block_features(net, pink), _block_features(net, blue)
    assert (colour[0] - colour[1]).abs().max() > 1e-2  # the colour path sees the hue
    grey_forward(net, MEAN, STD)
    seen = _block_features(net, pink), _block_features(net, blue)
    torch.testing.assert_close(seen[0], seen[1], atol=1e-5, rtol=1e-5)

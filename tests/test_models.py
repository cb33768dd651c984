"""The model stage: kinds behind one interface, cards of 0.1.0, loading without Lightning,
and a fifth kind that plugs in with no other edit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cscvision.models.card import ModelCard, read_card
from cscvision.models.export import load_model
from cscvision.models.kinds import KINDS, ModelKind, get_kind, register_kind
from cscvision.testing import write_toy_cohort

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "cscvision" / "resources" / "models" / "demo-synthetic"
OLD = Path(__file__).resolve().parent / "data" / "cards_0_1_0"  # written by cscvision 0.1.0


# --- cards and models of 0.1.0 ---------------------------------------------------------------


@pytest.mark.parametrize(
    "folder, kind, target_type",
    [
        (DEMO, "tile", "classification"),
        (OLD / "head", "head", "classification"),
        (OLD / "finetune", "finetune", "classification"),
        (OLD / "mil", "mil", "rank"),
    ],
)
def test_cards_of_0_1_0_load_with_their_kind_and_target_type(folder, kind, target_type):
    raw = json.loads((folder / "model.json").read_text())
    assert "task" in raw and "kind" not in raw  # written before the rename
    card = read_card(folder)
    assert (card.kind, card.target_type) == (kind, target_type)
    assert "task" not in card.to_json() and ModelCard.from_json(card.to_json()) == card
    legacy = get_kind(card.kind).legacy_task(card)
    assert legacy == raw["task"]  # output digests keep 0.1.0's value


def _finetune_weights(folder: Path, out: Path) -> Path:
    """The 0.1.0 fine-tuned card with weights of the right names and shapes (the real file
    is 1 MB): the demo encoder's own last block and a zero head."""
    card = read_card(folder)
    encoder = load_file(str(DEMO / "model.safetensors"))
    blocks = [p.removeprefix("trunk.") for p in card.encoder["tuned"]]  # trunk.6 → 6
    tuned = {f"encoder.trunk.{k}": v for k, v in encoder.items() if k.split(".")[0] in blocks}
    head = {"0.weight": torch.zeros(2, card.encoder["dim"]), "0.bias": torch.zeros(2)}
    out.mkdir()
    (out / "model.json").write_text((folder / "model.json").read_text())
    save_file({**tuned, **head}, str(out / "model.safetensors"))
    return out


def test_models_of_0_1_0_load_and_score_tiles(tmp_path):
    from cscvision.inference.predict import TileScorer

    weights = DEMO / "model.safetensors"
    folders = {"head": OLD / "head", "mil": OLD / "mil"}
    folders["finetune"] = _finetune_weights(OLD / "finetune", tmp_path / "finetune")
    tiles = torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8)
    for name, folder in folders.items():
        model = load_model(folder, encoder_weights=weights)
        assert model.kind.name == name
        out = TileScorer(model)(tiles)
        assert out.shape == (3, model.kind.output_width(model.card)) and np.isfinite(out).all()


def test_head_and_mil_models_load_and_run_without_lightning():
    """In a fresh process: load a head and a MIL model, score tiles, aggregate a slide;
    neither Lightning nor torchmetrics (training only) is imported."""
    code = f"""
import sys, torch
from cscvision.models.export import load_model
from cscvision.inference.predict import TileScorer
tiles = torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8)
for folder in ({str(OLD / "head")!r}, {str(OLD / "mil")!r}):
    model = load_model(folder, encoder_weights={str(DEMO / "model.safetensors")!r})
    rows = TileScorer(model)(tiles)
    maps, extra = model.kind.slide_outputs(model.net, model.card, rows)
    assert maps.shape[0] == 4
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning",
                                                            "torchmetrics"))
print("LOADED", bad)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "LOADED []" in done.stdout, done.stdout


def test_an_unknown_kind_is_named_with_the_known_ones(tmp_path):
    from cscvision.models.card import ModelError

    folder = tmp_path / "m"
    folder.mkdir()
    card = json.loads((DEMO / "model.json").read_text())
    card.pop("task")
    card["kind"] = "transmil"
    (folder / "model.json").write_text(json.dumps(card))
    (folder / "model.safetensors").write_bytes((DEMO / "model.safetensors").read_bytes())
    with pytest.raises(ModelError, match=r"model kind 'transmil' is not registered.*mil, tile"):
        load_model(folder)


# --- a fifth kind -----------------------------------------------------------------------------


class MeanColour(nn.Module):
    """A tile's mean normalised colour → one logit per target."""

    def __init__(self, n_targets: int) -> None:
        super().__init__()
        self.linear = nn.Linear(3, n_targets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.float().mean(dim=(2, 3)))


def mean_colour_pieces(cfg, targets, by_split, run_dir, progress=True):
    from cscvision.training.lit import TileClassifier
    from cscvision.training.train import tile_datamodule

    dm = tile_datamodule(cfg, by_split)
    module = TileClassifier(
        net=MeanColour(len(targets)), backbone="mean_colour", targets=tuple(targets),
        lr=cfg.optim.lr, augment="none", channels_last=False,
    )  # fmt: skip
    return dm, module, {}


class MeanColourKind(ModelKind):
    name = "mean_colour"
    pieces = f"{__name__}:mean_colour_pieces"

    def build(self, card, state, encoder_weights=None):
        net = MeanColour(len(card.targets))
        net.load_state_dict(state, strict=True)
        return net


@pytest.fixture
def mean_colour_kind():
    kind = register_kind(MeanColourKind())
    yield kind
    KINDS.pop(kind.name)


def test_a_fifth_kind_trains_exports_loads_and_infers(mean_colour_kind, tmp_path):
    """One class and one registry entry: `cscvision train kind=mean_colour` trains it one
    epoch and exports it, `load_model` rebuilds it and `cscvision infer` writes its maps."""
    from cscvision.cli import main
    from cscvision.inference.predict import TileScorer

    csv = write_toy_cohort(tmp_path / "toy", n_slides=6, n_patients=6, seed=1)
    run, model_dir = tmp_path / "run", tmp_path / "model"
    args = ["train", f"cohort.csv={csv}", "kind=mean_colour", "name=mc", f"run_dir={run}",
            f"export_dir={model_dir}", "cohort.split_fractions=[0.5, 0.25, 0.25]",
            "grid.mpp=2.0", "grid.tile_px=32", "grid.mask_mpp=4.0", "data.batch_size=16",
            "data.num_workers=0", "trainer.max_epochs=1", "trainer.accelerator=cpu",
            "metrics.calibration=none", "threads=1", "--quiet"]  # fmt: skip
    assert main(args) == 0
    card = json.loads((model_dir / "model.json").read_text())
    assert card["kind"] == "mean_colour" and card["backbone"] == "mean_colour"
    model = load_model(model_dir)
    assert isinstance(model.net, MeanColour) and model.kind is mean_colour_kind
    # known answer: a tile of one colour scores sigmoid(W · normalised colour + b)
    rgb = torch.tensor([200, 120, 180], dtype=torch.uint8)
    tiles = rgb.view(1, 3, 1, 1).expand(2, 3, 32, 32).contiguous()
    x = (rgb.float() - torch.tensor(model.card.mean) * 255) / (torch.tensor(model.card.std) * 255)
    want = torch.sigmoid(model.net.linear(x)).detach().numpy()
    np.testing.assert_allclose(TileScorer(model)(tiles), np.stack([want, want]), rtol=1e-5)
    slides = sorted(str(p) for p in csv.parent.glob("*.tif*"))[:1]
    out = tmp_path / "infer"
    assert main(["infer", *slides, "--model", str(model_dir), "--out", str(out),
                 "--workers", "0", "--threads", "1", "--permutations", "0"]) == 0  # fmt: skip
    slide_id = Path(slides[0]).stem
    maps = np.load(out / slide_id / "maps.npz")
    assert set(card["targets"]) <= set(maps.files)
    assert np.nanmax(maps["stemness"]) <= 1 and (out / "results.csv").is_file()


# --- the network registry ---------------------------------------------------------------------


def test_every_backbone_has_a_registry_record_with_the_width_its_head_reads():
    from cscvision.models.backbones import BACKBONES, get_model
    from cscvision.models.registry import BACKBONE_SPECS, NETWORKS, get_network_spec

    assert set(BACKBONES) == set(BACKBONE_SPECS) == set(NETWORKS["backbone"])
    for name, spec in BACKBONE_SPECS.items():
        with torch.device("meta"):
            net = get_model(name, 3)
        head = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
        assert (head.in_features, head.out_features) == (spec.dim, 3), name
        assert get_network_spec(name, "backbone") is spec and spec.role == "backbone"
    assert get_network_spec("resnet18").role == "encoder"  # the frozen ImageNet encoder
    with pytest.raises(ValueError, match="unknown backbone 'vgg'"):
        get_network_spec("vgg", "backbone")

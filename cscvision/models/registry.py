"""The network registry: one frozen :class:`NetworkSpec` per network that turns tiles into
numbers (foundation-model and test encoders; tile backbones), no torch here.

Each entry says how to build the architecture with ``timm`` (model name + keyword
arguments, always ``pretrained=False``: weights come only from a local file the user
names), the tile geometry the encoder was trained at, its normalisation, its embedding
size and how that embedding is pooled from the network's output tokens.

The keyword arguments are copied from each model's official card or config (``source``);
``params`` is the count timm builds from them (checked by ``tests/test_encoders.py`` on the
meta device) and ``published_params`` the figure the authors publish. A user's real
weights file is the final check: it must load into the architecture key by key.

Pooling (``pool``): ``cls`` the class token after the final norm; ``mean_patch`` the mean
of the patch tokens (register tokens excluded); ``cls+mean_patch`` both concatenated
(Virchow2's embedding); ``avg`` global average pooling of a CNN's last feature map.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cscvision.core.errors import CscvisionError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURES_INSTALL = 'pip install "cscvision[features]"'
POOLS = ("cls", "mean_patch", "cls+mean_patch", "avg")
# timm layer classes named in kwargs as strings, resolved by features.encoders at build time
SWIGLU = "timm.layers.SwiGLUPacked"
SILU = "torch.nn.SiLU"


class EncoderError(CscvisionError, ValueError):
    """An unknown encoder, or a weights file that does not fit it (the message says which)."""


@dataclass(frozen=True)
class NetworkSpec:
    """One network that turns tiles into numbers, as timm's pretrained config records one:
    architecture (``timm_name``, or ``torchvision.<name>`` for a tile backbone), input
    (``tile_px`` at ``mpp`` µm/px, normalised with ``mean``/``std``), output width
    (``dim``: the embedding, or the features a backbone's head reads) and provenance.
    ``role``: an ``encoder`` (frozen features from a local weights file) or a ``backbone``
    (a tile CNN whose head is replaced by one logit per target)."""

    name: str
    timm_name: str
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    tile_px: int = 224
    mpp: float = 0.5  # µm/px the encoder was trained at (20x)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    dim: int = 0  # embedding size after pooling
    pool: str = "cls"
    params: int = 0  # parameter count of the timm architecture (checked on the meta device)
    published_params: float = 0.0  # the authors' figure, in parameters
    key_map: str | None = None  # checkpoint key convention to translate ("dinov2_hf")
    drop_keys: tuple[str, ...] = ()  # key prefixes of a classifier in the file, not used
    weights_file: str = ""  # the file to point --weights at, as published
    weights_url: str = ""  # where the weights are published
    licence: str = ""
    source: str = ""  # where the kwargs come from
    kind: str = "foundation"  # foundation | imagenet | test | scratch
    role: str = "encoder"  # encoder | backbone

    @property
    def is_cnn(self) -> bool:
        return self.pool == "avg"


def _vit(**kwargs: Any) -> dict[str, Any]:
    return {"num_classes": 0, **kwargs}


_HF = "https://huggingface.co/"
ENCODERS: dict[str, EncoderSpec] = {
    spec.name: spec
    for spec in (
        NetworkSpec(
            name="uni",
            timm_name="vit_large_patch16_224",
            timm_kwargs=_vit(img_size=224, patch_size=16, init_values=1e-5, dynamic_img_size=True),
            dim=1024,
            pool="cls",
            params=303_350_784,
            published_params=303e6,  # "ViT-L/16 ... 0.3B" (UNI card, Chen et al. 2024)
            weights_file="pytorch_model.bin",
            weights_url=_HF + "MahmoodLab/UNI",
            licence="CC-BY-NC-ND 4.0, gated: academic research only, agree on the Hub",
            source=_HF + "MahmoodLab/UNI (model card: timm.create_model kwargs)",
        ),
        NetworkSpec(
            name="uni2-h",
            timm_name="vit_giant_patch14_224",
            timm_kwargs=_vit(
                img_size=224,
                patch_size=14,
                depth=24,
                num_heads=24,
                init_values=1e-5,
                embed_dim=1536,
                mlp_ratio=2.66667 * 2,
                no_embed_class=True,
                mlp_layer=SWIGLU,
                act_layer=SILU,
                reg_tokens=8,
                dynamic_img_size=True,
            ),
            dim=1536,
            pool="cls",
            params=681_394_176,
            published_params=681e6,  # "ViT-H/14 ... 681M" (UNI2-h card)
            weights_file="pytorch_model.bin",
            weights_url=_HF + "MahmoodLab/UNI2-h",
            licence="CC-BY-NC-ND 4.0, gated: academic research only, agree on the Hub",
            source=_HF + "MahmoodLab/UNI2-h (model card: timm_kwargs)",
        ),
        NetworkSpec(
            name="virchow2",
            timm_name="vit_huge_patch14_224",
            timm_kwargs=_vit(
                img_size=224,
                init_values=1e-5,
                mlp_ratio=5.3375,
                global_pool="",
                reg_tokens=4,
                dynamic_img_size=True,
                mlp_layer=SWIGLU,
                act_layer=SILU,
            ),
            dim=2560,
            pool="cls+mean_patch",
            params=631_239_424,
            published_params=632e6,  # "a 632 million parameter ViT" (arXiv 2408.00738)
            weights_file="pytorch_model.bin",
            weights_url=_HF + "paige-ai/Virchow2",
            licence="CC-BY-NC-ND 4.0, gated: non-commercial research, agree on the Hub",
            source=_HF + "paige-ai/Virchow2 (config.json model_args; card: class token + "
            "mean of patch tokens 5: = 2560)",
        ),
        NetworkSpec(
            name="h-optimus-0",
            timm_name="vit_giant_patch14_reg4_dinov2",
            timm_kwargs=_vit(img_size=224, init_values=1e-5, dynamic_img_size=False),
            mean=(0.707223, 0.578729, 0.703617),
            std=(0.211883, 0.230117, 0.177517),
            dim=1536,
            pool="cls",
            params=1_134_774_272,
            published_params=1.1e9,  # "a 1.1B parameter vision transformer" (H-optimus-0 card)
            weights_file="pytorch_model.bin",
            weights_url=_HF + "bioptimus/H-optimus-0",
            licence="Apache-2.0",
            source=_HF + "bioptimus/H-optimus-0 (config.json; github.com/bioptimus/releases "
            "params: ViT-g/14, 4 registers, SwiGLU, init_values 1e-5)",
        ),
        NetworkSpec(
            name="h-optimus-1",
            timm_name="vit_giant_patch14_reg4_dinov2",
            timm_kwargs=_vit(img_size=224, init_values=1e-5, dynamic_img_size=False),
            mean=(0.707223, 0.578729, 0.703617),
            std=(0.211883, 0.230117, 0.177517),
            dim=1536,
            pool="cls",
            params=1_134_774_272,
            published_params=1.1e9,  # H-optimus-1 card: same ViT-g/14 as H-optimus-0
            weights_file="pytorch_model.bin",
            weights_url=_HF + "bioptimus/H-optimus-1",
            licence="non-commercial, gated: agree to Bioptimus' terms on the Hub",
            source=_HF + "bioptimus/H-optimus-1 (config.json, as H-optimus-0)",
        ),
        NetworkSpec(
            name="prov-gigapath",
            timm_name="vit_giant_patch14_dinov2",
            timm_kwargs=_vit(
                img_size=224,
                in_chans=3,
                patch_size=16,
                embed_dim=1536,
                depth=40,
                num_heads=24,
                init_values=1e-5,
                mlp_ratio=5.33334,
            ),
            dim=1536,
            pool="cls",
            params=1_134_953_984,
            published_params=1.13e9,  # demo/3_load_tile_encoder.py prints "param #"
            weights_file="pytorch_model.bin",
            weights_url=_HF + "prov-gigapath/prov-gigapath",
            licence="Prov-GigaPath licence, gated: research only, agree on the Hub",
            source=_HF + "prov-gigapath/prov-gigapath (config.json model_args; tile encoder "
            "only, the slide encoder is not used)",
        ),
        NetworkSpec(
            name="phikon-v2",
            timm_name="vit_large_patch16_224",
            timm_kwargs=_vit(img_size=224, init_values=1e-5),
            dim=1024,
            pool="cls",
            params=303_350_784,
            published_params=307e6,  # Filiot et al. 2024 count transformers' Dinov2 extras
            key_map="dinov2_hf",
            weights_file="model.safetensors",
            weights_url=_HF + "owkin/phikon-v2",
            licence="Owkin non-commercial licence (see the card)",
            source=_HF + "owkin/phikon-v2 (config.json: Dinov2Model, hidden 1024, 24 layers, "
            "patch 16, layerscale 1e-5; CLS of last_hidden_state)",
        ),
        NetworkSpec(
            name="resnet18",
            timm_name="resnet18",
            timm_kwargs={"num_classes": 0},
            dim=512,
            pool="avg",
            params=11_176_512,
            published_params=11.7e6,  # torchvision's 11.7 M include the 1000-class fc
            weights_file="resnet18.safetensors (torchvision or timm ImageNet weights)",
            weights_url=_HF + "timm/resnet18.a1_in1k; download.pytorch.org/models",
            licence="Apache-2.0 (timm) / BSD-3 (torchvision)",
            source="timm resnet18; torchvision key names are the same",
            kind="imagenet",
        ),
        NetworkSpec(
            name="resnet50",
            timm_name="resnet50",
            timm_kwargs={"num_classes": 0},
            dim=2048,
            pool="avg",
            params=23_508_032,
            published_params=25.6e6,  # torchvision's 25.6 M include the 1000-class fc
            weights_file="resnet50.safetensors (torchvision or timm ImageNet weights)",
            weights_url=_HF + "timm/resnet50.a1_in1k; download.pytorch.org/models",
            licence="Apache-2.0 (timm) / BSD-3 (torchvision)",
            source="timm resnet50; torchvision key names are the same",
            kind="imagenet",
        ),
        NetworkSpec(
            name="test-vit-tiny",
            timm_name="vit_tiny_patch16_224",
            timm_kwargs=_vit(img_size=224),
            dim=192,
            pool="mean_patch",
            params=5_524_416,
            weights_file="(none published: random weights from save_random_weights)",
            source="timm vit_tiny_patch16_224; stands in for the real encoders in tests",
            kind="test",
        ),
        NetworkSpec(
            name="demo-cnn",
            timm_name="cscvision.small_cnn",
            dim=128,
            pool="avg",
            params=470_840,
            drop_keys=("10.",),
            weights_file="models/demo-synthetic/model.safetensors",
            source="the feature layers of cscvision's small_cnn, trained by `make demo-model` "
            "on synthetic slides only; stands in for a pretrained encoder in tests",
            kind="test",
        ),
    )
}

EncoderSpec = NetworkSpec  # the name of 0.1.0

_TV = "torchvision.models (weights=None: from scratch, or model.pretrained, a local file)"
# Tile backbones: trained on the tile targets (cscvision.models.backbones builds them); any
# tile size works, tile_px/mpp are the config's defaults; dim = the width the head reads.
BACKBONE_SPECS: dict[str, NetworkSpec] = {
    spec.name: spec
    for spec in (
        NetworkSpec(name="small_cnn", timm_name="cscvision.small_cnn", dim=128, pool="avg",
                    params=470_840, source="cscvision.models.cnn (0.4 M parameters, CPUs)",
                    kind="scratch", role="backbone"),
        NetworkSpec(name="resnet18", timm_name="torchvision.resnet18", dim=512, pool="avg",
                    source=_TV, kind="scratch", role="backbone"),
        NetworkSpec(name="resnet34", timm_name="torchvision.resnet34", dim=512, pool="avg",
                    source=_TV, kind="scratch", role="backbone"),
        NetworkSpec(name="resnet50", timm_name="torchvision.resnet50", dim=2048, pool="avg",
                    source=_TV, kind="scratch", role="backbone"),
        NetworkSpec(name="efficientnet_b0", timm_name="torchvision.efficientnet_b0",
                    dim=1280, pool="avg", source=_TV, kind="scratch", role="backbone"),
        NetworkSpec(name="convnext_tiny", timm_name="torchvision.convnext_tiny", dim=768,
                    pool="avg", source=_TV, kind="scratch", role="backbone"),
        NetworkSpec(name="mobilenet_v3_large", timm_name="torchvision.mobilenet_v3_large",
                    dim=1280, pool="avg", source=_TV, kind="scratch", role="backbone"),
    )
}  # fmt: skip
# The one registry: every network by role, then name (resnet18 is both a frozen ImageNet
# encoder read from a weights file and a tile backbone trained on the targets).
NETWORKS: dict[str, dict[str, NetworkSpec]] = {"encoder": ENCODERS, "backbone": BACKBONE_SPECS}


def get_network_spec(name: str, role: str = "encoder") -> NetworkSpec:
    """The registered network ``name`` of ``role``; a ``ValueError`` lists the known ones."""
    if role == "encoder":
        return get_encoder_spec(name)
    known = NETWORKS.get(role)
    if known is None:
        raise ValueError(f"network role {role!r}: choose one of {', '.join(NETWORKS)}")
    if name not in known:
        raise ValueError(f"unknown {role} {name!r}; choose one of {', '.join(sorted(known))}")
    return known[name]


# CONCH is not registered: its image embedding comes from CoCa's attentional pooler and
# projection defined in the `conch` package (GitHub only, not on PyPI) and absent from
# open_clip's built-in configs, so it cannot be built offline through timm or open_clip.
NOT_REGISTERED = {"conch": "needs the GitHub-only `conch` package (CoCa attentional pooler)"}


def get_encoder_spec(name: str) -> EncoderSpec:
    """The registered encoder ``name``; :class:`EncoderError` lists the known ones."""
    spec = ENCODERS.get(name)
    if spec is None:
        why = NOT_REGISTERED.get(name.lower())
        hint = f" ({name} is not supported: {why})" if why else ""
        raise EncoderError(
            f"unknown encoder {name!r}{hint}; choose one of {', '.join(sorted(ENCODERS))}"
        )
    return spec


def configured_weights(spec: EncoderSpec, weights_dir: str | Path | None) -> Path | None:
    """The weights file of ``spec`` found in ``weights_dir``, if any: ``DIR/<name>/<file as
    published>``, ``DIR/<name>.safetensors|.bin|.pth``, or ``DIR/<name>/model.safetensors``
    or ``pytorch_model.bin``."""
    if not weights_dir:
        return None
    root = Path(weights_dir).expanduser()
    published = spec.weights_file.split(" ")[0]
    candidates = [root / spec.name / published] if published else []
    candidates += [root / f"{spec.name}{ext}" for ext in (".safetensors", ".bin", ".pth")]
    candidates += [root / spec.name / f for f in ("model.safetensors", "pytorch_model.bin")]
    return next((p for p in candidates if p.is_file()), None)

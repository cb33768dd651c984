"""The model card (``model.json``) and its human form (``README.md``).

The card is one validated schema (pydantic v2) with a ``schema_version``: a card whose field
has the wrong type or an impossible value is refused on load with a message naming the
field (``ModelError``), before any slide is read. Cards without ``schema_version`` (written
before it existed) load as version 1. Cards of cscvision 0.1.0 name no ``kind`` and keep
the model kind and the target type in one field, ``task`` (classification, regression or
mil): they load with ``kind`` and ``target_type`` read from it (``_from_task``). A new
field with a default is one line below; bump :data:`CARD_SCHEMA_VERSION` only when a field
changes meaning or becomes required. No torch here: writers and tools that only read a card
import this module alone.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
    with_config,
)
from pydantic.dataclasses import dataclass
from typing_extensions import Required, TypedDict

from cscvision import __version__
from cscvision.core.errors import CscvisionError
from cscvision.core.names import check_distinct, check_name
from cscvision.core.resources import packaged_dir, packaged_names
from cscvision.core.validate import describe_error
from cscvision.models.registry import IMAGENET_MEAN, IMAGENET_STD
from cscvision.slides.info import MPP_RANGE

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"
CARD_SCHEMA_VERSION = 1
SCORE_SPAN_SD = 2.5  # regression maps span mean ± this many training standard deviations
TARGET_TYPES = ("classification", "regression", "rank")
DEFAULT_UNITS = {
    "classification": "probability",
    "regression": "score",
    "rank": "within-slide percentile",  # MIL maps: a tile's rank among the slide's tiles, 0-1
}
# Short names for packaged models: ``--model demo``.
MODEL_ALIASES = {"demo": "demo-synthetic"}

Channel = Annotated[int, Field(ge=0, le=255)]
Unit = Annotated[float, Field(ge=0, le=1)]
Positive = Annotated[float, Field(gt=0)]
Name = Annotated[str, Field(min_length=1, max_length=200)]


class ModelError(CscvisionError):
    """A model folder is missing, malformed, or does not match what is asked of it."""


@with_config(ConfigDict(extra="allow"))
class EncoderRecord(TypedDict, total=False):
    """The card's ``encoder`` part (kinds head, finetune, mil; ``heads.encoder_reference``):
    the registered encoder and the weights file it was trained with, by sha256."""

    name: Required[Name]
    weights_sha256: Required[Annotated[str, Field(min_length=1)]]
    weights_file: str | None
    expected_file: str | None  # the file as published
    timm_name: str | None
    dim: Annotated[int, Field(ge=1)]  # embedding width
    pool: str | None
    features_dir: str | None  # kind head: the feature stores it was trained on
    finetune_blocks: Annotated[int, Field(ge=0)]  # kind finetune: the encoder blocks tuned


@with_config(ConfigDict(extra="allow"))
class MILRecord(TypedDict, total=False):
    """The card's ``mil`` part (kind mil; ``models.mil``): the network's shape and the slide
    targets (regression: name, mean, sd, units; classification: name, classes)."""

    architecture: Required[Literal["gated_attention", "clam_sb", "mean", "instance_linear"]]
    in_dim: Required[Annotated[int, Field(ge=1)]]
    hidden: Required[Annotated[int, Field(ge=1)]]
    attention: Required[Annotated[int, Field(ge=1)]]
    dropout: Annotated[float, Field(ge=0, lt=1)]
    regression: list[dict[str, Any]]
    classification: list[dict[str, Any]]
    covariates: list[str]


CARD_RECORDS: dict[str, Any] = {"encoder": EncoderRecord, "mil": MILRecord}
NEEDS = {
    "encoder": "name, weights_sha256, ...",
    "mil": "architecture, in_dim, hidden, attention, ...",
}


def _typed(record: type) -> Any:
    """A card part checked as ``record`` when it is there (``{}``: the kind has none)."""
    adapter = TypeAdapter(record)
    return AfterValidator(lambda value: dict(adapter.validate_python(value)) if value else value)


@dataclass(frozen=True, config=ConfigDict(extra="ignore", allow_inf_nan=False))
class ModelCard:
    """Everything inference needs to use a model, and what a reader needs to trust it.

    A dataclass checked by pydantic when made (``dataclasses.replace`` checks again)."""

    name: Name
    backbone: Name
    schema_version: int = Field(CARD_SCHEMA_VERSION, ge=1, le=CARD_SCHEMA_VERSION)
    targets: tuple[Name, ...] = Field(("stemness", "immunosuppressive"), min_length=1)
    # the model kind (cscvision.models.kinds: tile, head, finetune, mil, or one registered)
    kind: Name = "tile"
    # what a target's values are: classification a sigmoid per target; regression a score
    # per target; rank a within-slide rank percentile (the tile maps of a slide-level model)
    target_type: Literal["classification", "regression", "rank"] = "classification"
    units: dict[str, str] = Field(default_factory=dict)  # target → unit; see unit()
    # regression: the net predicts standardised scores; score = output * std + mean; "min"
    # and "max": the training tiles' range (a target never negative there is floored at 0)
    output_scale: dict[str, list[float]] = Field(default_factory=dict)
    colors: dict[str, tuple[Channel, Channel, Channel]] = Field(default_factory=dict)
    # probabilities (classification, 0-1) or scores in the target's units (regression)
    thresholds: dict[str, float] = Field(default_factory=dict)
    # per-target temperature or isotonic map fitted on validation (models.calibration)
    calibration: dict[str, Any] = Field(default_factory=dict)
    tile_px: int = Field(224, ge=8, le=8192)
    mpp: float = Field(0.5, ge=MPP_RANGE[0], le=MPP_RANGE[1])
    mean: tuple[Unit, Unit, Unit] = IMAGENET_MEAN
    std: tuple[Positive, Positive, Positive] = IMAGENET_STD
    cscvision_version: str = __version__
    trained_on: str = ""  # a human summary of the training cohort
    training: dict[str, Any] = Field(default_factory=dict)  # cohort counts, seed, config
    metrics: dict[str, Any] = Field(default_factory=dict)  # validation / held-out metrics
    intended_use: str = "Research use only; not for diagnosis."
    # a head on a frozen encoder: name, weights_sha256, weights_file, expected_file, dim
    encoder: Annotated[dict[str, Any], _typed(EncoderRecord)] = Field(default_factory=dict)
    # kind mil: architecture, sizes, slide targets (regression: name, mean, sd, units;
    # classification: name, classes), covariates, map scale (models.mil)
    mil: Annotated[dict[str, Any], _typed(MILRecord)] = Field(default_factory=dict)
    # out-of-distribution record (models.ood): method, features, thresholds, rule, file digest
    ood: dict[str, Any] = Field(default_factory=dict)
    # stain normalisation template (slides.stain.StainReference.to_dict), applied to every
    # tile before the model by inference; empty: tiles as read
    stain: dict[str, Any] = Field(default_factory=dict)
    # tile CNNs: rate of the dropout before the last linear layer (0: none), for mc
    head_dropout: float = Field(0.0, ge=0, lt=1)
    # per uncertainty method (models.uncertainty: tta, mc), per target: the standard
    # deviation above which validation tiles were much less accurate (training.confidence)
    confidence: dict[str, Any] = Field(default_factory=dict)

    @field_validator("targets")
    @classmethod
    def _unique_targets(cls, targets: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(targets)) != len(targets):
            raise ValueError(f"target names must be unique, got {list(targets)}")
        for target in targets:  # they name files and folders of every slide's outputs
            check_name(target, "target", "targets")
        check_distinct(targets, "target", "targets")
        return targets

    @field_validator("thresholds")
    @classmethod
    def _probability_thresholds(cls, thresholds: dict[str, float], info: ValidationInfo):
        if info.data.get("target_type", "classification") == "classification":
            bad = [f"{t} {v:g}" for t, v in thresholds.items() if not 0 <= v <= 1]
            if bad:
                raise ValueError(
                    f"thresholds of a classification model are probabilities in [0, 1], "
                    f"got {', '.join(bad)}"
                )
        return thresholds

    @model_validator(mode="before")
    @classmethod
    def _from_task(cls, data: Any) -> Any:
        """A 0.1.0 card: ``task`` gives the kind (mil; else head or finetune when it names
        an encoder, else tile) and the target type (mil maps are ranks)."""
        if not isinstance(data, dict) or ("kind" in data and "task" not in data):
            return data
        data = dict(data)
        task = data.pop("task", "classification")
        encoder = data.get("encoder") or {}
        blocks = encoder.get("finetune_blocks") if isinstance(encoder, dict) else 0
        data.setdefault("kind", legacy_kind(task, encoder, blocks))
        data.setdefault("target_type", "rank" if task == "mil" else task)
        return data

    def threshold(self, target: str) -> float:
        return float(self.thresholds.get(target, 0.5))

    @property
    def is_regression(self) -> bool:
        return self.target_type == "regression"

    @property
    def thresholded(self) -> bool:
        """Maps are probabilities with thresholds (regions, outlines, niche statistics);
        regression scores and MIL maps are shown as values only."""
        return self.target_type == "classification"

    def value_range(self, target: str) -> tuple[float, float]:
        """The values colour maps and uint8 likelihood maps span: (0, 1) for probabilities;
        for regression the training scores' mean ± 2.5 standard deviations, from the
        target's floor up where it has one."""
        if not self.is_regression or not self.output_scale:
            return 0.0, 1.0
        i = self.targets.index(target)
        mean, std = self.output_scale["mean"][i], self.output_scale["std"][i]
        low, floor = float(mean - SCORE_SPAN_SD * std), self.floors()[i]
        return (low if floor is None else max(low, floor)), float(mean + SCORE_SPAN_SD * std)

    def floors(self) -> tuple[float | None, ...]:
        """Per target, the least value a regression output may take: 0 for a target no
        training tile had below 0 (a density, a fraction: a negative one means nothing),
        else None (no floor; also for cards written before the range was recorded)."""
        low = self.output_scale.get("min") if self.is_regression else None
        if low is None:
            return (None,) * len(self.targets)
        return tuple(0.0 if v >= 0 else None for v in low)

    def unit(self, target: str) -> str:
        """What ``target``'s values measure: the card's unit, else its target type's default."""
        return self.units.get(target) or DEFAULT_UNITS.get(self.target_type, "")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, source: str = "model.json") -> ModelCard:
        """A card from parsed JSON; ``ModelError`` naming ``source`` and the field if the
        data does not fit the schema (version 1 when ``schema_version`` is absent)."""
        if not isinstance(data, dict):
            raise ModelError(f"{source}: a model card is a JSON object, got {type(data).__name__}")
        missing = {"name", "backbone"} - set(data)
        if missing:
            raise ModelError(f"{source}: missing fields {sorted(missing)}")
        version = data.get("schema_version", 1)
        if isinstance(version, int) and version > CARD_SCHEMA_VERSION:
            raise ModelError(
                f"{source}: card schema_version {version} is newer than this cscvision reads "
                f"({CARD_SCHEMA_VERSION}); upgrade cscvision"
            )
        try:
            return _CARD.validate_python(data)
        except ValidationError as e:
            raise ModelError(f"{source}: {describe_error(e, cls, flag=False)}") from None


_CARD = TypeAdapter(ModelCard)


def split_task(task: Any) -> dict[str, Any]:
    """0.1.0's ``task`` of a training config as the keys that replace it: ``mil`` is a model
    kind, ``classification`` and ``regression`` are target types."""
    return {"kind": "mil"} if task == "mil" else {"target_type": task}


def legacy_kind(task: str | None, encoder: Any, blocks: Any = 0) -> str:
    """The kind of a 0.1.0 config or card, which named none: ``task: mil``, else a head on
    an encoder (fine-tuned when it tunes blocks), else a tile CNN."""
    if task == "mil":
        return "mil"
    if encoder:
        return "finetune" if blocks else "head"
    return "tile"


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A model folder: an existing folder as given, else a packaged model by name or alias.

    A folder wins over a packaged name, so ``./demo`` in the working directory is used
    as a folder; name a packaged model with no path separator (``demo``, ``demo-synthetic``).
    """
    path = Path(name_or_path)
    name = str(name_or_path)
    if path.is_dir() or path.name != name:  # a path is never read as a name
        return path
    packaged = packaged_dir("models") / MODEL_ALIASES.get(name, name)
    if packaged.is_dir():
        return packaged
    names = sorted({*MODEL_ALIASES, *packaged_names("models")})
    raise ModelError(
        f"{name_or_path}: no such model folder and no packaged model of that name; "
        f"pass an exported model folder or one of: {', '.join(names)}"
    )


def read_card(model_dir: str | Path) -> ModelCard:
    """The model card of an exported model.

    Parameters
    ----------
    model_dir
        An exported model folder, or a packaged model name such as ``"demo"``.

    Returns
    -------
    ModelCard
        The checked card.

    Raises
    ------
    ModelError
        No such folder or name, no card, a card that is not JSON or does not fit the schema,
        or a schema newer than this cscvision.

    Examples
    --------
    >>> card = cscvision.read_card("demo")
    >>> card.targets, card.tile_px, card.mpp
    """
    model_dir = resolve_model_dir(model_dir)
    path = model_dir / CARD_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(
            f"{path}: no model card; is {model_dir} an exported cscvision model?"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot read the model card ({e.strerror or e})") from None
    return ModelCard.from_json(data, source=str(path))

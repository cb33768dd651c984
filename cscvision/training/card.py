"""The model card (``model.json``) and its human form (``README.md``).

The card is one validated schema (pydantic v2) with a ``schema_version``: a card whose field
has the wrong type or an impossible value is refused on load with a message naming the
field (``ModelError``), before any slide is read. Cards without ``schema_version`` (written
before it existed) load as version 1. A new field with a default is one line below; bump
:data:`CARD_SCHEMA_VERSION` only when a field changes meaning or becomes required.
No torch here: writers and tools that only read a card import this module alone.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.dataclasses import dataclass

from cscvision import __version__
from cscvision.core.io import write_text
from cscvision.core.resources import packaged_dir, packaged_names
from cscvision.core.validate import describe_error
from cscvision.slides.info import MPP_RANGE

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"
CARD_SCHEMA_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCORE_SPAN_SD = 2.5  # regression maps span mean ± this many training standard deviations
DEFAULT_UNITS = {
    "classification": "probability",
    "regression": "score",
    "mil": "within-slide percentile",  # MIL maps: a tile's rank among the slide's tiles, 0-1
}
# Short names for packaged models: ``--model demo``.
MODEL_ALIASES = {"demo": "demo-synthetic"}

Channel = Annotated[int, Field(ge=0, le=255)]
Unit = Annotated[float, Field(ge=0, le=1)]
Positive = Annotated[float, Field(gt=0)]
Name = Annotated[str, Field(min_length=1, max_length=200)]


class ModelError(Exception):
    """A model folder is missing, malformed, or does not match what is asked of it."""


@dataclass(frozen=True, config=ConfigDict(extra="ignore", allow_inf_nan=False))
class ModelCard:
    """Everything inference needs to use a model, and what a reader needs to trust it.

    A dataclass checked by pydantic when made (``dataclasses.replace`` checks again)."""

    name: Name
    backbone: Name
    schema_version: int = Field(CARD_SCHEMA_VERSION, ge=1, le=CARD_SCHEMA_VERSION)
    targets: tuple[Name, ...] = Field(("stemness", "immunosuppressive"), min_length=1)
    # classification: a sigmoid per target; regression: a score per target; mil: a slide-level
    # model whose targets are its tile maps (attention, contributions; see the mil field)
    task: Literal["classification", "regression", "mil"] = "classification"
    units: dict[str, str] = Field(default_factory=dict)  # target → unit; see unit()
    # regression: the net predicts standardised scores; score = output * std + mean
    output_scale: dict[str, list[float]] = Field(default_factory=dict)
    colors: dict[str, tuple[Channel, Channel, Channel]] = Field(default_factory=dict)
    # probabilities (classification, 0-1) or scores in the target's units (regression)
    thresholds: dict[str, float] = Field(default_factory=dict)
    # per-target temperature or isotonic map fitted on validation (training.calibration)
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
    encoder: dict[str, Any] = Field(default_factory=dict)
    # task mil: architecture, sizes, slide targets (regression: name, mean, sd, units;
    # classification: name, classes), covariates, map scale (training.mil_model)
    mil: dict[str, Any] = Field(default_factory=dict)

    @field_validator("targets")
    @classmethod
    def _unique_targets(cls, targets: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(targets)) != len(targets):
            raise ValueError(f"target names must be unique, got {list(targets)}")
        return targets

    @field_validator("thresholds")
    @classmethod
    def _probability_thresholds(cls, thresholds: dict[str, float], info: ValidationInfo):
        if info.data.get("task", "classification") == "classification":
            bad = [f"{t} {v:g}" for t, v in thresholds.items() if not 0 <= v <= 1]
            if bad:
                raise ValueError(
                    f"thresholds of a classification model are probabilities in [0, 1], "
                    f"got {', '.join(bad)}"
                )
        return thresholds

    def threshold(self, target: str) -> float:
        return float(self.thresholds.get(target, 0.5))

    @property
    def is_regression(self) -> bool:
        return self.task == "regression"

    @property
    def thresholded(self) -> bool:
        """Maps are probabilities with thresholds (regions, outlines, niche statistics);
        regression scores and MIL maps are shown as values only."""
        return self.task == "classification"

    def value_range(self, target: str) -> tuple[float, float]:
        """The values colour maps and uint8 likelihood maps span: (0, 1) for probabilities;
        for regression the training scores' mean ± 2.5 standard deviations."""
        if not self.is_regression or not self.output_scale:
            return 0.0, 1.0
        i = self.targets.index(target)
        mean, std = self.output_scale["mean"][i], self.output_scale["std"][i]
        return float(mean - SCORE_SPAN_SD * std), float(mean + SCORE_SPAN_SD * std)

    def unit(self, target: str) -> str:
        """What ``target``'s values measure: the card's unit, else the task's default."""
        return self.units.get(target) or DEFAULT_UNITS.get(self.task, "")

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


README_FILE = "README.md"


def _is_synthetic(card: ModelCard) -> bool:
    return bool(card.training.get("synthetic")) or "synthetic" in card.trained_on.lower()


def _cell(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    return f"{value:.3f}" if isinstance(value, (int, float)) else "–"


def _regression_rows(card: ModelCard) -> list[str]:
    val, test = card.metrics.get("val", {}), card.metrics.get("test", {})
    rows = [
        "| target | unit | val Pearson | test Pearson (95 % CI over patients) | test Spearman |",
        "|---|---|---|---|---|",
    ]
    for t in card.targets:
        ci = f"{_cell(test, f'pearson_{t}_ci_low')}–{_cell(test, f'pearson_{t}_ci_high')}"
        rows.append(
            f"| {t} | {card.unit(t)} | {_cell(val, f'pearson_{t}')} | "
            f"{_cell(test, f'pearson_{t}')} ({ci}) | {_cell(test, f'spearman_{t}')} |"
        )
    return rows


def _mil_rows(card: ModelCard) -> list[str]:
    cv = card.metrics.get("cv", {})
    if not cv:
        return ["No cross-validation was run (cv.folds < 2): there is no held-out estimate."]
    rows = [
        f"Pooled {cv.get('folds')}-fold cross-validation over patients (held-out slides of "
        "every fold; 95 % bootstrap CI over patients). Slide level:",
        "",
        "| metric | value | 95 % CI |",
        "|---|---|---|",
    ]
    for name, rec in cv.get("pooled", {}).items():
        lo, hi = (rec.get("ci95") or [None, None])[:2]
        rows.append(f"| {name} | {_cell(rec, 'value')} | {_cell({'v': lo}, 'v')}–"
                    f"{_cell({'v': hi}, 'v')} |")  # fmt: skip
    return rows


def _metric_rows(card: ModelCard) -> list[str]:
    if card.task == "mil":
        return _mil_rows(card)
    if card.is_regression:
        return _regression_rows(card)
    val, test = card.metrics.get("val", {}), card.metrics.get("test", {})
    cell = _cell
    rows = [
        "| target | threshold | val AUROC | val AP | val F1 | test AUROC | test AP | test F1 "
        "| test slide AUROC |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in card.targets:
        keys = [(val, f"auroc_{t}"), (val, f"ap_{t}"), (val, f"f1_{t}"), (test, f"auroc_{t}")]
        keys += [(test, f"ap_{t}"), (test, f"f1_{t}"), (test, f"slide_auroc_{t}")]
        cells = " | ".join(cell(m, k) for m, k in keys)
        rows.append(f"| {t} | {card.threshold(t):.3f} | {cells} |")
    return rows


def _what_it_does(card: ModelCard) -> str:
    tiles = f"Scores every tissue tile of {card.tile_px} × {card.tile_px} px at {card.mpp} µm/px"
    if card.task == "mil":
        mil = card.mil
        names = [r["name"] for r in mil.get("regression", [])]
        names += [c["name"] for c in mil.get("classification", [])]
        return (
            f"Predicts slide-level labels ({', '.join(names)}) with {card.backbone} multiple-"
            f"instance learning over the features of encoder `{card.encoder.get('name')}` "
            f"(tiles of {card.tile_px} px at {card.mpp} µm/px). Maps ({', '.join(card.targets)})"
            f" show which tiles drove the prediction, as a {mil.get('map_scale')}."
        )
    if card.is_regression:
        return (
            f"{tiles} with a continuous score for {len(card.targets)} targets "
            f"({', '.join(card.targets)}), in the units of its training labels (e.g. a "
            "gene-programme score from spatial transcriptomics); no threshold."
        )
    return (
        f"{tiles} for {len(card.targets)} targets, one sigmoid each (a tile can be several at "
        f"once): {', '.join(card.targets)}. A tile counts as positive at the threshold below "
        "(chosen to maximise F1 on validation)."
    )


def model_readme(card: ModelCard) -> str:
    """A human model card (Markdown) for ``card``."""
    kind = "slide-level MIL model" if card.task == "mil" else "tile model"
    lines = [f"# {card.name}: cscvision {kind}", ""]
    if _is_synthetic(card):
        lines += [
            "> **Trained on synthetic data only.** This model has never seen a real slide; "
            "its scores on real tissue mean nothing. It exists to test the pipeline.",
            "",
        ]
    lines += [
        f"**{card.intended_use}**",
        "",
        "## What it does",
        _what_it_does(card),
        "",
        "## Model",
        f"- backbone: `{card.backbone}`; pretrained: {card.training.get('pretrained', 'unknown')}",
        f"- input: RGB uint8 → `(x / 255 − mean) / std`, mean {list(card.mean)}, "
        f"std {list(card.std)}",
        f"- cscvision {card.cscvision_version}; load with `cscvision.load_model(DIR)`",
        "",
        "## Training data",
        card.trained_on or "(not described)",
        "",
        "| split | slides | patients | tiles |",
        "|---|---|---|---|",
    ]
    cohort = card.training.get("cohort") or {}
    if card.task == "mil":
        cohort = {"all (cross-validated)": cohort}
    for split, counts in cohort.items():
        lines.append(
            f"| {split} | {counts.get('slides', '–')} | {counts.get('patients', '–')} "
            f"| {counts.get('tiles', '–')} |"
        )
    level = "slide level" if card.task == "mil" else "tile level unless stated"
    lines += ["", f"## Metrics ({level})", *_metric_rows(card), ""]
    lines += [
        "## To train a model for real use",
        "Bring whole-slide images with either annotations or stains:",
        "- QuPath GeoJSON or ASAP XML annotations of **stemness-rich** and "
        "**immunosuppressive** regions (classes named in the config's class map), or",
        "- IHC on serial or restained sections for stemness markers (e.g. SOX2, CD44, ALDH1) "
        "and immunosuppression (e.g. FOXP3, CD163, PD-L1), turned into region labels;",
        "- spatial transcriptomics of the same sections (Visium `outs/`, HEST samples) turned "
        "into panel scores per spot with `cscvision labels st`;",
        "- a cohort CSV (`slide_path,patient_id[,annotation_path]`) with enough patients for "
        "patient-level train / validation / test splits; then `cscvision train --config ...`.",
        "",
        "Not a medical device. Not validated for diagnosis, prognosis or treatment decisions.",
        "",
    ]
    return "\n".join(lines)


def write_model_readme(card: ModelCard, out_dir: str | Path) -> Path:
    """Write ``README.md`` (the human model card) into ``out_dir``, atomically."""
    return write_text(Path(out_dir) / README_FILE, model_readme(card))

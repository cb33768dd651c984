"""The human model card (``README.md`` beside ``model.json``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cscvision.core.io import write_text
from cscvision.models.card import ModelCard
from cscvision.models.kinds import get_kind
from cscvision.models.thresholds import threshold_rule, threshold_text, threshold_warnings

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
    if get_kind(card.kind).slide_level:
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
        rows.append(f"| {t} | {threshold_text(card.threshold(t))} | {cells} |")
    rows += ["", f"Thresholds: {threshold_rule(card)}."]
    rows += [f"- **Warning**: {w}" for w in threshold_warnings(card)]
    return rows


def _what_it_does(card: ModelCard) -> str:
    tiles = f"Scores every tissue tile of {card.tile_px} × {card.tile_px} px at {card.mpp} µm/px"
    if get_kind(card.kind).slide_level:
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
    kind = "slide-level MIL model" if get_kind(card.kind).slide_level else "tile model"
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
        _stain_line(card),
        "",
        "## Training data",
        card.trained_on or "(not described)",
        "",
        "| split | slides | patients | tiles |",
        "|---|---|---|---|",
    ]
    cohort = card.training.get("cohort") or {}
    if get_kind(card.kind).slide_level:
        cohort = {"all (cross-validated)": cohort}
    for split, counts in cohort.items():
        lines.append(
            f"| {split} | {counts.get('slides', '–')} | {counts.get('patients', '–')} "
            f"| {counts.get('tiles', '–')} |"
        )
    level = "slide level" if get_kind(card.kind).slide_level else "tile level unless stated"
    lines += ["", f"## Metrics ({level})", *_metric_rows(card), ""]
    lines += _ood_lines(card)
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


def _stain_line(card: ModelCard) -> str:
    from cscvision.slides.stain import FIT_VERSIONS, StainReference

    if not card.stain:
        return "- stain normalisation: none (tiles are read as scanned)"
    ref = StainReference.from_dict(card.stain)
    text = (
        f"- stain normalisation: {ref.method}, fitted on {ref.source or 'an unnamed source'}; "
        "`infer` applies it to every tile without being asked (`model.json` → `stain`)"
    )
    if ref.stain_matrix is not None:
        fit = int(ref.details.get("fit", 1))
        rows = zip("HE", ref.stain_matrix, ref.max_concentration, strict=True)
        vectors = "; ".join(
            f"{n} OD ({', '.join(f'{c:.3f}' for c in v)}), 99th-percentile concentration {m:.3f}"
            for n, v, m in rows
        )
        return f"{text}. {vectors}; fit version {fit} ({FIT_VERSIONS.get(fit, 'unknown')})"
    lab = ", ".join(f"{m:.2f} ± {s:.2f}" for m, s in zip(ref.lab_mean, ref.lab_std, strict=True))
    return f"{text}. L*a*b* mean ± sd {lab}"


def _ood_lines(card: ModelCard) -> list[str]:
    ood = card.ood
    if not ood:
        return []
    return [
        "## Out-of-distribution record",
        f"Each tile's {ood.get('features')} features are compared with the training tiles' "
        f"({ood.get('method')}, {ood.get('groups')} group(s), {ood.get('dim')} dimensions); "
        f"the tile threshold is the {ood.get('tile_quantile'):.0%} quantile of "
        f"{ood.get('val_tiles')} validation tiles' scores"
        f"{' (' + ood['calibrated_on'] + ')' if ood.get('calibrated_on') else ''}. "
        f"Verdict: {ood.get('rule')}; here "
        f"{ood.get('slide_share_threshold'):.0%}. {ood.get('note', '')}".rstrip(),
        "",
    ]


def write_model_readme(card: ModelCard, out_dir: str | Path) -> Path:
    """Write ``README.md`` (the human model card) into ``out_dir``, atomically."""
    return write_text(Path(out_dir) / README_FILE, model_readme(card))

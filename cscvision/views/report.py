"""``OUT/report/``: a static, offline page over a batch's outputs (and a training run).

The page is plain HTML with its plots as SVG files (matplotlib) and its images copied into
``report/assets/``, so the folder still works when copied elsewhere or opened from disk.
The one script (``report.js``, sorting the cohort table) ships with cscvision.
"""

from __future__ import annotations

import csv
import html
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cscvision.core.errors import CscvisionError
from cscvision.core.io import atomic_path, write_text
from cscvision.outputs.read import OutputsError, check_one_model, read_summary_files
from cscvision.outputs.trust import card_warnings, ood_banner_text, threshold_rows
from cscvision.views.plots import (
    calibration_svg,
    colocalisation_svg,
    distribution_svg,
    learning_curves_svg,
    patient_svg,
    scatter_svg,
)

STATIC = Path(__file__).parent / "static"
REPORT_DIR = "report"
ASSETS = "assets"


class ReportError(CscvisionError, ValueError):
    """The folder given is not a cscvision output folder, or a run folder is malformed."""


@dataclass(frozen=True)
class SlideRecord:
    slide_id: str
    folder: Path
    summary: dict[str, Any]
    patient_id: str | None = None


@dataclass
class Batch:
    """What ``cscvision infer`` left in ``out_dir``."""

    out_dir: Path
    slides: list[SlideRecord]
    results: list[dict[str, str]]
    errors: list[dict[str, str]]
    targets: tuple[str, ...] = ()
    model: dict[str, Any] = field(default_factory=dict)


def _read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def _merge_tables(out_dir: Path, pattern: str) -> list[dict[str, str]]:
    """Rows of every ``results*.csv`` / ``errors*.csv`` (shards too), last one per slide wins."""
    rows: dict[str, dict[str, str]] = {}
    for path in sorted(out_dir.glob(pattern)):
        for row in _read_rows(path):
            rows[row.get("slide_id", "")] = row
    return list(rows.values())


def read_batch(
    out_dir: str | Path,
    patients: dict[str, str] | None = None,
    skipped: list[str] | None = None,
) -> Batch:
    """The batch under ``out_dir``; unreadable summaries are left out with a line in
    ``skipped``."""
    out = Path(out_dir)
    if not out.is_dir():
        raise ReportError(f"{out}: not a folder; pass the --out folder of cscvision infer")
    found, unread = read_summary_files(out)
    if skipped is not None:
        skipped.extend(unread)
    try:
        check_one_model(found)
    except OutputsError as e:
        raise ReportError(str(e)) from None
    slides = [SlideRecord(f.slide_id, f.path.parent, f.summary, (patients or {}).get(f.slide_id))
              for f in found]  # fmt: skip
    results = _merge_tables(out, "results*.csv")
    errors = [r for r in _merge_tables(out, "errors*.csv") if r.get("slide_id")]
    if not slides and not errors:
        raise ReportError(
            f"{out}: no <slide_id>/summary.json and no errors.csv; is this the "
            "--out folder of cscvision infer?"
        )
    targets = tuple(slides[0].summary.get("targets", {})) if slides else ()
    model = slides[0].summary.get("model", {}) if slides else {}
    return Batch(out, slides, results, errors, targets, model)


def read_patients(cohort_csv: str | Path) -> dict[str, str]:
    """slide_id → patient_id from a cohort manifest (the CSV ``train`` reads)."""
    from cscvision.labels.cohort import read_cohort

    return {e.slide_id: e.patient_id for e in read_cohort(cohort_csv)}


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """Metrics, per-epoch logs and calibration of a ``cscvision train`` run folder."""
    run = Path(run_dir)
    metrics_path = run / "metrics.json"
    if not metrics_path.is_file():
        raise ReportError(f"{run}: no metrics.json; pass a finished cscvision train run folder")
    epochs: list[dict[str, str]] = []
    for path in sorted(run.glob("logs/csv/version_*/metrics.csv")):
        epochs.extend(_read_rows(path))
    calibration = run / "calibration.json"
    return {
        "dir": run,
        "metrics": json.loads(metrics_path.read_text(encoding="utf-8")),
        "epochs": epochs,
        "calibration": json.loads(calibration.read_text()) if calibration.is_file() else None,
    }


# --- page -----------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return _e(value)


def _card_section(model: dict[str, Any], card: dict[str, Any] | None, settings: dict) -> str:
    rows = {**model}
    if card:
        keys = ("backbone", "tile_px", "mpp", "trained_on")
        rows.update({k: card[k] for k in keys if k in card})
        rows.update(threshold_rows(card))
    synthetic = "synthetic" in json.dumps(card or model).lower()
    warn = (
        (
            '<p class="warn">This model was trained on synthetic slides only: its scores on real '
            "tissue mean nothing.</p>"
        )
        if synthetic
        else ""
    ) + "".join(f'<p class="warn">{_e(w)}</p>' for w in card_warnings(card))
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in rows.items())
    sets = "".join(f"<tr><th>{_e(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in settings.items())
    return (
        f"<section id='model'><h2>Model</h2>{warn}<table class='kv'>{body}</table>"
        f"<h3>Settings</h3><table class='kv'>{sets}</table></section>"
    )


def _cohort_table(batch: Batch) -> str:
    rows = [r for r in batch.results if r.get("status") != "failed"]
    if not rows:
        return "<section id='cohort'><h2>Cohort</h2><p>No finished slides.</p></section>"
    skip = {"slide_path", "error", "status"}
    columns = [c for c in rows[0] if c not in skip]
    patients = {s.slide_id: s.patient_id for s in batch.slides}
    has_patients = any(patients.values())
    head = (["patient_id"] if has_patients else []) + columns
    out = ["<div class='scroll'><table id='cohort-table' class='sortable'><thead><tr>"]
    out += [f"<th data-col='{i}'>{_e(c)}</th>" for i, c in enumerate(head)]
    out.append("</tr></thead><tbody>")
    for r in rows:
        cells = [patients.get(r.get("slide_id", "")) or ""] if has_patients else []
        cells += [r.get(c, "") for c in columns]
        link = [f"<a href='#slide-{_e(cells[len(head) - len(columns)])}'>", "</a>"]
        tds = []
        for i, v in enumerate(cells):
            text = _e(v)
            if head[i] == "slide_id":
                text = f"{link[0]}{text}{link[1]}"
            tds.append(f"<td>{text}</td>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    out.append("</tbody></table></div>")
    return (
        "<section id='cohort'><h2>Cohort</h2><p>Click a column to sort.</p>"
        + "".join(out)
        + "</section>"
    )


def _slide_figures(summary: dict[str, Any]) -> str:
    """The slide's headline figures: a MIL model's slide predictions, else each target's
    share of tissue."""
    pred = summary.get("slide_prediction")
    if pred:
        items = [f"<li>predicted {_e(t)}: {_fmt(v)}</li>" for t, v in pred["regression"].items()]
        for t, c in pred["classification"].items():
            p = _fmt(c["probabilities"][c["predicted"]])
            items.append(f"<li>predicted {_e(t)}: {_e(c['predicted'])} (p {p})</li>")
        return "".join(items)
    return "".join(
        f"<li>{_e(t)}: {_fmt(v.get('fraction_of_tissue', ''))} of tissue, "
        f"{_fmt(v.get('area_mm2', ''))} mm²</li>"
        for t, v in summary.get("targets", {}).items()
        if isinstance(v, dict)
    )


def _slide_card(record: SlideRecord, assets: Path, out_dir: Path) -> str:
    sid = record.slide_id
    images = []
    for png in sorted(record.folder.glob("overlay_*.png")):
        name = f"{sid}__{png.name}"
        shutil.copyfile(png, assets / name)
        images.append(
            f"<figure><img src='{ASSETS}/{_e(name)}' alt='{_e(png.stem)} of {_e(sid)}'>"
            f"<figcaption>{_e(png.stem)}</figcaption></figure>"
        )
    thumb = _thumbnail(record, assets)
    if thumb:
        images.insert(
            0,
            f"<figure><img src='{ASSETS}/{_e(thumb)}' alt='thumbnail of {_e(sid)}'>"
            "<figcaption>slide</figcaption></figure>",
        )
    rel = Path("..") / record.folder.relative_to(out_dir)
    files = " · ".join(
        f"<a href='{_e(rel / f)}'>{_e(f)}</a>"
        for f in ["summary.json", *record.summary.get("outputs", [])]
    )
    figures = _slide_figures(record.summary)
    patient = f" · patient {_e(record.patient_id)}" if record.patient_id else ""
    banner = ood_banner_text(record.summary)
    banner = f"<p class='warn ood-banner'>{_e(banner)}</p>" if banner else ""
    return (
        f"<article class='slide-card' id='slide-{_e(sid)}'><h3>{_e(sid)}{patient}</h3>{banner}"
        f"<div class='figs'>{''.join(images)}</div><ul>{figures}</ul>"
        f"<p class='files'>{files}</p></article>"
    )


def _thumbnail(record: SlideRecord, assets: Path) -> str | None:
    """A thumbnail of the slide itself when its file is still where the summary says."""
    path = Path(record.summary.get("slide_path", ""))
    if not path.is_file() and not path.is_dir():
        return None
    try:
        from PIL import Image

        from cscvision.slides.slide import open_slide

        with open_slide(path, mpp=record.summary.get("resolution", {}).get("slide_mpp")) as slide:
            mpp = max(slide.info.dimensions) * slide.info.mpp / 480  # about 480 px on the long side
            rgb = slide.thumbnail(mpp)
    except Exception:  # a report never fails on one slide's picture
        return None
    name = f"{record.slide_id}__thumbnail.png"
    with atomic_path(assets / name) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
    return name


def _errors_section(errors: list[dict[str, str]]) -> str:
    if not errors:
        return "<section id='failed'><h2>Failed slides</h2><p>None.</p></section>"
    rows = "".join(
        f"<tr><td>{_e(r.get('slide_id'))}</td><td>{_e(r.get('slide_path'))}</td>"
        f"<td>{_e(r.get('error'))}</td></tr>"
        for r in errors
    )
    return (
        "<section id='failed'><h2>Failed slides</h2><table class='errors'><thead><tr>"
        "<th>slide</th><th>path</th><th>reason</th></tr></thead>"
        f"<tbody>{rows}</tbody></table></section>"
    )


def _figure(assets: Path, name: str, svg: str | None, caption: str) -> str:
    if svg is None:
        return ""
    write_text(assets / name, svg)
    return (
        f"<figure class='plot'><img src='{ASSETS}/{name}' alt='{_e(caption)}'>"
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _plots_section(batch: Batch, assets: Path) -> str:
    summaries = [s.summary for s in batch.slides]
    patients = [s.patient_id for s in batch.slides]
    figs = [
        _figure(
            assets,
            "scatter.svg",
            scatter_svg(summaries, batch.targets, patients),
            "one point per slide for the first two targets: the share of tissue above the "
            "threshold, or for maps without one the slide prediction or the mean score",
        ),
        _figure(
            assets,
            "distributions.svg",
            distribution_svg(summaries, batch.targets),
            "distribution across slides of each target's per-slide value (as above)",
        ),
        _figure(
            assets,
            "colocalisation.svg",
            colocalisation_svg(summaries),
            "co-localisation figures (dots) against their permutation nulls (bars: null "
            "mean ± 2 sd)",
        ),
        _figure(
            assets,
            "patients.svg",
            patient_svg(summaries, batch.targets, patients),
            "per-slide values grouped by patient",
        ),
    ]
    return "<section id='plots'><h2>Plots</h2>" + "".join(f for f in figs if f) + "</section>"


def _run_section(run: dict[str, Any], assets: Path) -> str:
    metrics = run["metrics"]
    parts = ["<section id='training'><h2>Training run</h2>", f"<p>{_e(run['dir'])}</p>"]
    for split in ("val", "test"):
        values = metrics.get(split) or {}
        if values:
            body = "".join(
                f"<tr><th>{_e(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in sorted(values.items())
            )
            parts.append(f"<h3>{split} metrics</h3><table class='kv metrics'>{body}</table>")
    parts.append(
        _figure(
            assets,
            "learning_curves.svg",
            learning_curves_svg(run["epochs"]),
            "learning curves (per epoch)",
        )
    )
    if run["calibration"]:
        parts.append(
            _figure(
                assets,
                "calibration.svg",
                calibration_svg(run["calibration"]),
                "reliability diagrams on the test split, before and after calibration",
            )
        )
    parts.append("</section>")
    return "".join(parts)


def write_report(
    out_dir: str | Path,
    *,
    run_dir: str | Path | None = None,
    cohort_csv: str | Path | None = None,
    model_dir: str | Path | None = None,
    skipped: list[str] | None = None,
) -> Path:
    """Write ``out_dir/report/index.html`` and its assets; returns the page's path.
    Unreadable summaries are left out with a line in ``skipped``."""
    patients = read_patients(cohort_csv) if cohort_csv else None
    batch = read_batch(out_dir, patients, skipped)
    run = read_run(run_dir) if run_dir else None
    card = None
    if model_dir:
        from cscvision.models.card import CARD_FILE, resolve_model_dir

        card = json.loads((resolve_model_dir(model_dir) / CARD_FILE).read_text(encoding="utf-8"))
    report = Path(out_dir) / REPORT_DIR
    assets = report / ASSETS
    assets.mkdir(parents=True, exist_ok=True)
    for name in ("report.js", "report.css"):
        shutil.copyfile(STATIC / name, assets / name)
    settings = batch.slides[0].summary.get("settings", {}) if batch.slides else {}
    body = [
        f"<h1>cscvision report: {_e(Path(out_dir).resolve().name)}</h1>",
        f"<p>{len(batch.slides)} slides finished, {len(batch.errors)} failed. Research use "
        "only; not for diagnosis.</p>",
        _card_section(batch.model, card, settings),
        _cohort_table(batch),
        _plots_section(batch, assets),
        "<section id='slides'><h2>Slides</h2>",
        *(_slide_card(s, assets, Path(out_dir)) for s in batch.slides),
        "</section>",
        _errors_section(batch.errors),
        _run_section(run, assets) if run else "",
    ]
    page = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<title>cscvision report</title><link rel='icon' href='data:,'>"
        f"<link rel='stylesheet' href='{ASSETS}/report.css'></head><body>"
        + "\n".join(body)
        + f"<script src='{ASSETS}/report.js'></script></body></html>\n"
    )
    return write_text(report / "index.html", page)

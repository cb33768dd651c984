"""The report's plots: matplotlib figures rendered to SVG text (no display needed)."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from typing import Any

from cscvision.core.palette import target_colors


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def slide_value(summary: dict, target: str) -> tuple[float, str]:
    """What a slide's point shows for ``target``, and its axis label: the share of tissue
    above the threshold when the map has one; else a slide-level model's prediction; else
    the tissue-weighted mean score in the map's unit (a regression map). NaN when none."""
    value = summary.get("targets", {}).get(target, {})
    value = value if isinstance(value, dict) else {}
    if not math.isnan(_number(value.get("fraction_of_tissue"))):
        return float(value["fraction_of_tissue"]), "fraction of tissue"
    predicted = (summary.get("slide_prediction") or {}).get("regression", {})
    if not math.isnan(_number(predicted.get(target))):
        return float(predicted[target]), "slide prediction"
    if not math.isnan(_number(value.get("mean"))):
        return float(value["mean"]), f"mean over tissue ({value.get('unit') or 'score'})"
    return math.nan, ""


def _fraction(summary: dict, target: str) -> float:
    return slide_value(summary, target)[0]


def _label(summaries: Sequence[dict], target: str) -> str:
    return next((lab for s in summaries if (lab := slide_value(s, target)[1])), "")


def _axis_limits(values: Sequence[float], label: str) -> tuple[float, float] | None:
    """0 to a little over the largest fraction; matplotlib's own limits for other values."""
    finite = [v for v in values if not math.isnan(v)]
    if label != "fraction of tissue" or not finite:
        return None
    return 0.0, min(1.0, max(finite) * 1.15 + 0.01)


def _hex(rgb: Sequence[int]) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in rgb)


def scatter_svg(
    summaries: Sequence[dict], targets: Sequence[str], patients: Sequence[str | None]
) -> str | None:
    """Per-slide fraction of tissue of target 0 against target 1, one colour per patient."""
    if len(targets) < 2 or not summaries or not all(_label(summaries, t) for t in targets[:2]):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.2))
    xs = [_fraction(s, targets[0]) for s in summaries]
    ys = [_fraction(s, targets[1]) for s in summaries]
    groups = sorted({p for p in patients if p}) or [None]
    cmap = plt.get_cmap("tab20")
    for i, group in enumerate(groups):
        idx = [k for k, p in enumerate(patients) if p == group or group is None]
        ax.scatter(
            [xs[k] for k in idx],
            [ys[k] for k in idx],
            s=28,
            color=cmap(i % 20),
            label=group,
            edgecolor="black",
            linewidth=0.4,
        )
    labels = _label(summaries, targets[0]), _label(summaries, targets[1])
    for values, label, limit in ((xs, labels[0], ax.set_xlim), (ys, labels[1], ax.set_ylim)):
        if (lims := _axis_limits(values, label)) is not None:
            limit(*lims)
    ax.set_xlabel(f"{targets[0]}: {labels[0]}")
    ax.set_ylabel(f"{targets[1]}: {labels[1]}")
    ax.set_title("one point per slide")
    if groups != [None] and len(groups) <= 12:
        ax.legend(title="patient", fontsize=7, title_fontsize=8, loc="best")
    return _svg(fig)


def distribution_svg(summaries: Sequence[dict], targets: Sequence[str]) -> str | None:
    targets = [t for t in targets if _label(summaries, t)]
    if not summaries or not targets:
        return None
    plt = _pyplot()
    colors = target_colors(targets)
    fig, axes = plt.subplots(1, len(targets), figsize=(4 * len(targets), 3.2), squeeze=False)
    for ax, t in zip(axes[0], targets, strict=True):
        values = [v for v in (_fraction(s, t) for s in summaries) if not math.isnan(v)]
        label = _label(summaries, t)
        span = (0, 1) if label == "fraction of tissue" else None
        ax.hist(values, bins=min(20, max(5, len(values))), range=span, color=_hex(colors[t]))
        ax.set_xlabel(f"{t}: {label}")
        ax.set_ylabel("slides")
    return _svg(fig)


def null_figures(summary: Any, prefix: str = "") -> Iterator[tuple[str, dict]]:
    """Every ``{observed, null_mean, ...}`` record in a summary, by its dotted name."""
    if isinstance(summary, dict):
        if "observed" in summary and "null_mean" in summary:
            yield prefix, summary
            return
        for key, value in summary.items():
            yield from null_figures(value, f"{prefix}.{key}" if prefix else str(key))


def colocalisation_svg(summaries: Sequence[dict]) -> str | None:
    """Each co-localisation figure per slide against its null (mean ± 2 sd)."""
    names: dict[str, list[tuple[float, float, float]]] = {}
    for s in summaries:
        for name, rec in null_figures(s):
            obs, mean = rec.get("observed"), rec.get("null_mean")
            if not isinstance(obs, (int, float)) or not isinstance(mean, (int, float)):
                continue
            sd = rec.get("null_sd") if isinstance(rec.get("null_sd"), (int, float)) else 0.0
            names.setdefault(name, []).append((float(obs), float(mean), float(sd)))
    if not names:
        return None
    plt = _pyplot()
    height = len(names) * (0.9 + 0.2 * len(summaries)) + 0.4
    fig, axes = plt.subplots(len(names), 1, figsize=(6, height), squeeze=False)
    for ax, (name, rows) in zip(axes[:, 0], sorted(names.items()), strict=True):
        y = list(range(len(rows)))
        ax.errorbar(
            [m for _, m, _ in rows],
            y,
            xerr=[2 * sd for *_, sd in rows],
            fmt="|",
            color="grey",
            label="null mean ± 2 sd",
        )
        ax.scatter([o for o, _, _ in rows], y, color="black", s=14, zorder=3, label="observed")
        ax.set_title(name, fontsize=9)
        ax.set_yticks([])
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _svg(fig)


def patient_svg(
    summaries: Sequence[dict], targets: Sequence[str], patients: Sequence[str | None]
) -> str | None:
    groups = sorted({p for p in patients if p})
    targets = [t for t in targets if _label(summaries, t)]
    if not groups or not targets:
        return None
    plt = _pyplot()
    colors = target_colors(targets)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(groups) * len(targets)), 3.4))
    width = 0.8 / len(targets)
    for j, t in enumerate(targets):
        for i, g in enumerate(groups):
            vals = [_fraction(s, t) for s, p in zip(summaries, patients, strict=True) if p == g]
            ax.scatter(
                [i + j * width] * len(vals),
                vals,
                color=_hex(colors[t]),
                s=16,
                label=t if i == 0 else None,
            )
    ax.set_xticks(
        [i + 0.4 - width / 2 for i in range(len(groups))],
        groups,
        rotation=45,
        ha="right",
        fontsize=7,
    )
    ax.set_ylabel("; ".join(dict.fromkeys(_label(summaries, t) for t in targets)))
    ax.legend(fontsize=7)
    return _svg(fig)


def _float(row: dict, key: str) -> float | None:
    try:
        return float(row[key])
    except (KeyError, TypeError, ValueError):
        return None


def learning_curves_svg(epochs: Sequence[dict[str, str]]) -> str | None:
    """Training and validation loss, and every validation AUROC, per epoch (Lightning's CSV)."""
    if not epochs:
        return None
    keys = sorted({k for row in epochs for k in row if k.startswith(("val_", "train_loss"))})
    loss_keys = [k for k in keys if "loss" in k]
    score_keys = [k for k in keys if "auroc" in k and "slide" not in k]
    if not loss_keys and not score_keys:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, group, label in ((axes[0], loss_keys, "loss"), (axes[1], score_keys, "AUROC")):
        for k in group:
            pts = [(_float(r, "epoch"), _float(r, k)) for r in epochs]
            pts = [(e, v) for e, v in pts if e is not None and v is not None]
            if pts:
                ax.plot([e for e, _ in pts], [v for _, v in pts], marker="o", ms=3, label=k)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if group:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _svg(fig)


def calibration_svg(calibration: dict[str, Any]) -> str | None:
    """Reliability diagrams per target: mean predicted vs observed frequency per bin."""
    targets = calibration.get("targets") or {}
    if not targets:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(targets), figsize=(4 * len(targets), 3.8), squeeze=False)
    for ax, (t, rec) in zip(axes[0], targets.items(), strict=True):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        for stage, style in (("before", "o-"), ("after", "s-")):
            bins = rec.get(f"bins_{stage}") or []
            pts = [(b["mean_prob"], b["frac_pos"]) for b in bins if b.get("count")]
            if pts:
                ece = rec.get(f"ece_{stage}")
                ax.plot(
                    [p for p, _ in pts],
                    [f for _, f in pts],
                    style,
                    ms=3,
                    label=f"{stage} (ECE {ece:.3f})" if ece is not None else stage,
                )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("mean predicted probability")
        ax.set_ylabel("fraction positive")
        ax.set_title(t)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return _svg(fig)

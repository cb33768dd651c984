"""How far to trust the packaged demo model's maps: stain shift, uncertainty, OOD, cost.

A cohort built for it (synthetic only; truth from the generator, never from the model):
- ``id``: held-out synthetic slides of the demo generator (new seeds, new patients);
- ``shift``: the same slides after a scanner/stain shift the training slides never had:
  optical densities re-mixed towards blue-purple and 40 % stronger (a site's haematoxylin
  and staining time), a gamma of 0.8 (another scanner's tone curve), then a Gaussian blur
  of σ = 1.5 px = 0.75 µm (optics of a 20× scanner resampled to 0.5 µm/px, or slight
  defocus) and JPEG quality 60 (scanners' lossy presets go down to about that);
- ``unseen``: adipose-like tissue (:mod:`cscvision.synth.unseen`), stained like the rest.

Prints (a) tile AUROC and ECE on ``id`` and ``shift`` without and with each normaliser
(reference fitted on tiles of the demo model's training slides); (b) the selective-
prediction curve (TTA std) at coverages 100/90/80/60 %; (c) the OOD AUROC of ``unseen``
tiles against ``id`` tiles and the slides flagged; (d) tiles/s of each option.

    nice -n 5 .venv/bin/python scripts/eval_trust.py --work trust_eval

How it could fool you: the shift is one hand-made transform, the unseen tissue one texture,
and three slides per group give wide intervals; the truth is tile coverage ≥ 0.5 of the
generator's label mask.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from cscvision.inference.predict import TileScorer, prepare_slide
from cscvision.models.export import LoadedModel, load_model
from cscvision.outputs.trust import OOD
from cscvision.slides.slide import open_slide
from cscvision.slides.stain import METHODS, fit_stain, normalise_batch, sample_tissue_tiles
from cscvision.synth import write_cohort
from cscvision.synth.unseen import adipose_rgb
from cscvision.testing import write_pyramid

TARGETS = ("stemness", "immunosuppressive")
BITS = {"stemness": 8, "immunosuppressive": 16}
SHIFT = np.array([[1.0, 0.15, -0.1], [0.1, 0.85, 0.1], [-0.05, 0.2, 1.1]])  # OD mixing
SHIFT_BLUR_PX, SHIFT_JPEG = 1.5, 60  # the scanner's optics and compression


def build(
    work: Path, n: int, size: int, blur: float = SHIFT_BLUR_PX, jpeg: int = SHIFT_JPEG
) -> dict[str, list[tuple[str, Path, Path | None]]]:
    """The three groups: (slide id, slide path, label mask path or None)."""
    csv = work / "id" / "cohort.csv"
    if not csv.exists():
        write_cohort(work / "id", n_slides=n, n_patients=n, size_px=size, seed=101)
    ids = sorted(p for p in (work / "id").glob("*.tiff"))
    groups = {"id": [(p.stem, p, work / "id" / f"{p.stem}_labels.png") for p in ids]}
    groups["shift"] = []
    for p in ids:
        out = work / f"shift-b{blur:g}-q{jpeg}" / f"{p.stem}-shift.tiff"
        if not out.exists():
            with open_slide(p) as s:
                rgb = s.read_region((0, 0), 0, s.info.dimensions)
            od = -np.log(np.maximum(rgb.astype(np.float32), 1) / 255) @ SHIFT.T * 1.4
            shifted = np.clip(255 * np.exp(-od) ** 0.8, 0, 255)
            shifted = ndimage.gaussian_filter(shifted, (blur, blur, 0))
            out.parent.mkdir(parents=True, exist_ok=True)
            write_pyramid(out, shifted.round().astype(np.uint8), mpp=0.5, quality=jpeg)
        groups["shift"].append((out.stem, out, work / "id" / f"{p.stem}_labels.png"))
    groups["unseen"] = []
    for i in range(max(2, n - 1)):
        out = work / "unseen" / f"ADIPOSE-{i}.tiff"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            write_pyramid(out, adipose_rgb(size, 500 + i)[0], mpp=0.5)
        groups["unseen"].append((out.stem, out, None))
    return groups


def train_slides(cohort: Path) -> list[Path]:
    """The demo model's training slides (its config's patient split of the demo cohort)."""
    from cscvision.labels.annotations import ClassMap
    from cscvision.labels.cohort import read_cohort
    from cscvision.training.train import _splits, load_config

    cfg = load_config("cpu_demo", [f"cohort.csv={cohort / 'cohort.csv'}"])
    entries = read_cohort(cfg.cohort.csv)
    class_map = ClassMap.from_dict(cfg.classes)
    splits = _splits(Path("/nonexistent/splits.csv"), entries, cfg, class_map)
    return sorted(cohort / f"{e.slide_id}.tiff" for e in entries if splits[e.slide_id] == "train")


def tile_truth(labels: Path, grid, slide_mpp: float) -> np.ndarray:
    """Per tile and target: share of the tile under the generator's mask ≥ 0.5."""
    truth_json = labels.with_name(labels.name.replace("_labels.png", "_truth.json"))
    truth = json.loads(truth_json.read_text())
    mask = np.asarray(Image.open(labels))
    scale = slide_mpp / truth["label_mask"]["mpp"]
    side = max(1, round(grid.plan.tile_l0 * scale))
    out = np.zeros((len(grid), len(TARGETS)), bool)
    for i, (x, y) in enumerate(grid.xy_l0):
        x0, y0 = round(x * scale), round(y * scale)
        patch = mask[y0 : y0 + side, x0 : x0 + side]
        for t, name in enumerate(TARGETS):
            out[i, t] = patch.size and ((patch & BITS[name]) > 0).mean() >= 0.5
    return out


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(probs, edges) - 1, 0, bins - 1)
    return float(sum(abs(probs[which == b].mean() - labels[which == b].mean()) * (which == b).mean()
                     for b in range(bins) if (which == b).any()))  # fmt: skip


def score_slide(model: LoadedModel, path: Path, *, uncertainty=None, norm=None, ref=None):
    """Per-tile rows (outputs + trust columns), the grid, and seconds spent scoring."""
    prepared = prepare_slide(path, model.card, batch_size=64)
    scorer = TileScorer(model, uncertainty=uncertainty)
    source = None
    if norm in ("macenko", "vahadane"):
        with open_slide(path) as s:
            source = fit_stain(sample_tissue_tiles(s, n_tiles=8), norm)
    batches = [prepared.batches.read(i) for i in range(len(prepared.batches))]
    rows, t0 = [], time.perf_counter()
    for batch in batches:
        image = batch["image"]
        if norm is not None:
            image = normalise_batch(image, ref, source=source).round().clamp(0, 255)
            image = image.to(torch.uint8)
        rows.append(scorer.scored(image))
    return np.concatenate(rows), prepared.grid, time.perf_counter() - t0, scorer.trust


def metrics(probs: np.ndarray, truth: np.ndarray) -> str:
    parts = []
    for t, name in enumerate(TARGETS):
        both = 0 < truth[:, t].sum() < len(truth)
        auc = roc_auc_score(truth[:, t], probs[:, t]) if both else np.nan
        parts.append(f"{name} AUROC {auc:.3f} ECE {ece(probs[:, t], truth[:, t]):.3f}")
    return "; ".join(parts)


def ood_section(model: LoadedModel, groups: dict) -> None:
    print(f"(c) OOD ({model.card.ood['features']} features): unseen tissue vs in-distribution "
          "tiles, and the slides flagged")  # fmt: skip
    scores, labels = [], []
    limit = float(model.card.ood["slide_share_threshold"])
    for group in ("id", "shift", "unseen"):
        for sid, path, _ in groups[group]:
            rows, _, _, names = score_slide(model, path)
            ratio = rows[:, 2 + names.index(OOD)]
            share = float((ratio > 1).mean())
            print(
                f"  {group:6s} {sid:22s} share beyond p99 {share:6.1%} -> "
                f"{'FLAGGED' if share > limit else 'not flagged'} (limit {limit:.0%})"
            )
            if group != "shift":
                scores.append(ratio)
                labels.append(np.full(len(ratio), group == "unseen"))
    print(
        f"  OOD AUROC unseen vs id tiles: "
        f"{roc_auc_score(np.concatenate(labels), np.concatenate(scores)):.3f}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("trust_eval"))
    p.add_argument("--slides", type=int, default=3)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument(
        "--train-cohort",
        type=Path,
        default=Path("demo_out/cohort"),
        help="the demo model's training cohort (scripts/refit_ood.py makes it)",
    )
    p.add_argument("--model", default="demo", help="the model (default: the packaged demo)")
    p.add_argument("--only-ood", action="store_true", help="print (c) only")
    p.add_argument("--only-stain", action="store_true", help="print (a) only")
    p.add_argument("--shift-blur", type=float, default=SHIFT_BLUR_PX, help="σ in px")
    p.add_argument("--shift-jpeg", type=int, default=SHIFT_JPEG, help="JPEG quality")
    args = p.parse_args()
    torch.manual_seed(0)
    model = load_model(args.model)
    groups = build(args.work, args.slides, args.size, args.shift_blur, args.shift_jpeg)
    if args.only_ood:
        return ood_section(model, groups)
    train = train_slides(args.train_cohort)[:3]
    pixels = []
    for path in train:
        with open_slide(path) as s:
            pixels.append(sample_tissue_tiles(s, n_tiles=6, mpp=0.5, tile_px=224))
    refs = {m: fit_stain(np.concatenate(pixels), m, source="demo training tiles") for m in METHODS}
    speed: dict[str, float] = {}

    print("(a) tile AUROC / ECE, without and with each normaliser (truth: generator masks)")
    for norm in (None, *METHODS):
        for group in ("id", "shift"):
            probs, truth, seconds, n = [], [], 0.0, 0
            for _, path, labels in groups[group]:
                rows, grid, sec, _ = score_slide(model, path, norm=norm, ref=refs.get(norm))
                probs.append(rows[:, : len(TARGETS)])
                truth.append(tile_truth(labels, grid, grid.slide_mpp))
                seconds, n = seconds + sec, n + len(rows)
            speed[norm or "plain"] = n / seconds
            print(f"  {norm or 'none':9s} {group:6s} {n:4d} tiles: "
                  f"{metrics(np.concatenate(probs), np.concatenate(truth))}")  # fmt: skip

    if args.only_stain:
        return None
    print("(b) selective prediction (tta std of the target; most uncertain tiles dropped)")
    for group in ("id", "shift"):
        rows, truth, seconds, n = [], [], 0.0, 0
        for _, path, labels in groups[group]:
            r, grid, sec, names = score_slide(model, path, uncertainty="tta")
            rows.append(r)
            truth.append(tile_truth(labels, grid, grid.slide_mpp))
            seconds, n = seconds + sec, n + len(r)
        speed["tta"] = n / seconds
        rows, truth = np.concatenate(rows), np.concatenate(truth)
        for t, name in enumerate(TARGETS):
            std = rows[:, 2 + names.index(f"std_{name}")]
            order = np.argsort(std)
            for cover in (1.0, 0.9, 0.8, 0.6):
                keep = order[: round(cover * len(order))]
                y, pr = truth[keep, t], rows[keep, t]
                auc = roc_auc_score(y, pr) if 0 < y.sum() < len(y) else np.nan
                print(f"  {group:6s} {name:17s} coverage {cover:4.0%}: AUROC {auc:.3f} "
                      f"ECE {ece(pr, y):.3f} ({len(keep)} tiles)")  # fmt: skip

    ood_section(model, groups)
    plain = load_model(args.model)
    plain = LoadedModel(plain.net, dataclasses.replace(plain.card, ood={}), plain.path)
    _, path, _ = groups["id"][0]
    rows, _, sec, _ = score_slide(plain, path)
    speed["no ood"] = len(rows) / sec
    rows, _, sec, _ = score_slide(model, path, uncertainty="mc:10")
    speed["mc:10"] = len(rows) / sec
    print(
        "(d) tiles/s of the model alone (tiles read beforehand; this machine, "
        f"{torch.get_num_threads()} threads)"
    )
    for name in ("no ood", "plain", *METHODS, "mc:10", "tta"):
        label = "with ood" if name == "plain" else name
        print(f"  {label:9s} {speed[name]:7.1f} tiles/s")


if __name__ == "__main__":
    main()

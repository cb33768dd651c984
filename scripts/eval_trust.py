"""How far to trust the packaged demo model's maps: stain shift, uncertainty, OOD, cost.

A cohort built for it (synthetic only; truth from the generator, never from the model):
- ``id``: held-out synthetic slides of the demo generator (seed 101: new stain draws, new
  tissue; 4 slides of 3072 px by default);
- ``s=…``: the same slides after the site shift of :mod:`cscvision.synth.stain_shift` at each
  strength of ``STRENGTHS`` (stain vectors rotated 10° per unit, haematoxylin × 1.3 and
  eosin × 0.75 per unit, tone curve 0.9 ** s, blur 0.75 · s px, JPEG 90 − 10 · s);
  ``s=0`` is ``id`` itself (the shift of strength 0 is the identity);
- ``unseen``: adipose-like tissue (:mod:`cscvision.synth.unseen`), stained like the rest.

Prints (a) tile AUROC [95 % interval] and ECE at every strength without and with each
normaliser (references fitted on tiles of the demo model's training slides, applied with
``normalise_batch``: with each slide's own stains, and as ``infer`` applies a card's template,
``@card``); (b) the selective-prediction
curve under ``tta`` and ``mc:10`` on ``id`` and ``s=1``: AUROC [interval] and ECE of the tiles
kept as the most uncertain (the target's std) are dropped, at coverages 100/90/80/60 %, the
change at 80 % with its paired interval, and where the errors are; (c) the OOD AUROC of
``unseen`` tiles against ``id`` tiles and the slides flagged; (d) tiles/s of each option.

Decided before the shifted slides were scored (a first run had scored the unshifted slides and
one shifted row with a first shift whose rotation turned nuclei cyan-green; after it the
rotation's direction changed, every strength scores the unshifted slides' tiles, the ``@card``
rows were added and strength 0.5 was dropped for time; after the second run only the
printed diagnostics changed; after ``infer`` learnt to unmix each slide with its own stains,
only the ``@card`` rows were scored again):
- strengths 0, 1, 2, 3, all printed; ``s = 1`` is the realistic site (10° is the
  upper part of the spread between sites' Macenko vectors), 2 the edge, 3 beyond it;
- the cost of a shift is, per target, the un-normalised AUROC at ``s = 0`` minus that at
  ``s``; the best normaliser at ``s`` is the one with the highest mean AUROC over both
  targets there; its recovered share is (its AUROC − un-normalised AUROC) / cost;
- bar (1) is judged per target at the smallest strength whose cost is ≥ 0.05 (none: the
  model is robust over the whole family, reported as such), and also printed at ``s = 1``;
- bar (2) is the change in AUROC from coverage 100 % to 80 % (most uncertain 20 % dropped),
  judged met when positive, and reported with its 95 % paired bootstrap interval;
- intervals: 1,000 bootstrap resamples of tiles (percentile). Tiles of one slide are
  correlated, so these are narrower than intervals over slides would be; 4 slides are too
  few to resample.

    nice -n 5 .venv/bin/python scripts/eval_trust.py --work trust_eval \\
        --train-cohort demo_out/cohort

Scores are cached under ``--work`` per model weights; ``--fresh`` scores again.
How it could fool you: the shift family is one parametrisation of a site, the unseen
tissue one texture, the truth is tile coverage ≥ 0.5 of the generator's label mask, and
the generator's stain spread (which the demo model was trained on) sets how far a shift
must go before it costs anything, and the normalisers are applied at test time to a model
trained without them.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.stats import rankdata

from cscvision.core.errors import CscvisionError
from cscvision.inference.predict import TileScorer, prepare_slide
from cscvision.inference.settings import InferSettings
from cscvision.models.card import WEIGHTS_FILE
from cscvision.models.export import LoadedModel, load_model
from cscvision.outputs.trust import OOD
from cscvision.slides.slide import open_slide
from cscvision.slides.slide_stains import path_stains
from cscvision.slides.stain import (
    METHODS,
    StainError,
    fit_stain,
    normalise_batch,
    sample_tissue_tiles,
)
from cscvision.slides.tilebatches import TileBatches
from cscvision.synth import write_cohort
from cscvision.synth.stain_shift import SiteShift
from cscvision.synth.unseen import adipose_rgb
from cscvision.testing import write_pyramid

sys.path.insert(0, str(Path(__file__).parent))
import trust_shift_eval as tse  # beside this script

TARGETS = ("stemness", "immunosuppressive")
BITS = {"stemness": 8, "immunosuppressive": 16}
STRENGTHS = (0.0, 1.0, 2.0, 3.0)
PRIMARY = 1.0
COVERAGES = (1.0, 0.9, 0.8, 0.6)
UNCERTAINTIES = ("tta", "mc:10")
NORMS = (*METHODS, "macenko@card", "vahadane@card")
BOOT = 1000


def group_name(strength: float) -> str:
    return "id" if strength == 0 else f"s={strength:g}"


def build(work: Path, n: int, size: int) -> dict[str, list[tuple[str, Path, Path | None]]]:
    """The groups: (slide id, slide path, label mask path or None)."""
    if not (work / "id" / "cohort.csv").exists():
        write_cohort(work / "id", n_slides=n, n_patients=n, size_px=size, seed=101)
    ids = sorted((work / "id").glob("*.tiff"))
    groups = {"id": [(p.stem, p, work / "id" / f"{p.stem}_labels.png") for p in ids]}
    for s in STRENGTHS[1:]:
        shift, name = SiteShift.at(s), group_name(s)
        groups[name] = []
        for p in ids:
            out = tse.write_shifted(p, work / name / f"{p.stem}-{name}.tiff", shift)
            groups[name].append((out.stem, out, work / "id" / f"{p.stem}_labels.png"))
    groups["unseen"] = []
    for i in range(2):
        out = work / "unseen" / f"ADIPOSE-{i}.tiff"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            write_pyramid(out, adipose_rgb(2048, 500 + i)[0], mpp=0.5)
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


def tile_cover(labels: Path, grid, slide_mpp: float) -> np.ndarray:
    """Per tile and target: the share of the tile under the generator's mask."""
    truth_json = labels.with_name(labels.name.replace("_labels.png", "_truth.json"))
    truth = json.loads(truth_json.read_text())
    mask = np.asarray(Image.open(labels))
    scale = slide_mpp / truth["label_mask"]["mpp"]
    side = max(1, round(grid.plan.tile_l0 * scale))
    out = np.zeros((len(grid), len(TARGETS)))
    for i, (x, y) in enumerate(grid.xy_l0):
        x0, y0 = round(x * scale), round(y * scale)
        patch = mask[y0 : y0 + side, x0 : x0 + side]
        for t, name in enumerate(TARGETS):
            out[i, t] = ((patch & BITS[name]) > 0).mean() if patch.size else 0.0
    return out


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Rank AUROC (ties count half); nan when one class is missing."""
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    return float((rankdata(p)[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(probs, edges) - 1, 0, bins - 1)
    return float(sum(abs(probs[which == b].mean() - labels[which == b].mean()) * (which == b).mean()
                     for b in range(bins) if (which == b).any()))  # fmt: skip


def boot_idx(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, (BOOT, n))


def auroc_ci(y: np.ndarray, p: np.ndarray) -> str:
    boots = [auroc(y[i], p[i]) for i in boot_idx(len(y))]
    lo, hi = np.nanpercentile(boots, (2.5, 97.5))
    return f"{auroc(y, p):.3f} [{lo:.3f}, {hi:.3f}]"


def kept(std: np.ndarray, cover: float) -> np.ndarray:
    """Indices of the ``cover`` share of tiles with the lowest std (stable order)."""
    return np.argsort(std, kind="stable")[: round(cover * len(std))]


@dataclasses.dataclass
class Scored:
    rows: np.ndarray  # outputs, then the trust columns `names`
    cover: np.ndarray  # [n, targets] mask coverage (nan for unseen tissue)
    slide: np.ndarray  # index of the slide in its group
    seconds: float
    names: list[str]

    @property
    def truth(self) -> np.ndarray:
        return self.cover >= 0.5

    def column(self, name: str) -> np.ndarray:
        return self.rows[:, len(TARGETS) + self.names.index(name)]


def score_slide(model: LoadedModel, path: Path, *, uncertainty=None, norm=None, ref=None,
                grid_of: Path | None = None):  # fmt: skip
    """Per-tile rows (outputs + trust columns), the grid, and seconds spent scoring.

    ``grid_of``: score the tiles of that slide's grid (a shifted slide is scored on its
    unshifted original's tissue tiles, so every strength scores the same tiles). ``norm``
    ``macenko``/``vahadane`` unmix each slide with its own stains, fitted on 8 of its tiles;
    ``macenko@card``/``vahadane@card`` as ``infer`` applies a card's template (each slide's
    own stains fitted as infer fits them: :func:`~cscvision.slides.slide_stains.path_stains`;
    before that fix, the reference's stains)."""
    prepared = prepare_slide(grid_of or path, model.card, InferSettings(batch_size=64))
    grid = prepared.grid
    tiles = TileBatches.of_tiles(str(path), grid.slide_mpp, grid.plan, grid.xy_l0, 64)
    scorer = TileScorer(model, uncertainty=uncertainty)
    if scorer.stain is not None:  # a card's template, as infer applies it: the slide's stains
        scorer.source = path_stains(path, scorer.stain)
    batches = [tiles.read(i)["image"] for i in range(len(tiles))]
    source = None
    if norm in ("macenko", "vahadane"):
        every = torch.cat(batches)
        pick = np.random.default_rng(0).permutation(len(every))[:8]
        try:
            source = fit_stain(every[pick].permute(0, 2, 3, 1).numpy(), norm)
        except StainError as e:  # as infer does (slide_stains): the reference's own stains
            print(f"  ({path.name}: {norm} fit on 8 tiles failed, {e}; reference stains used)")
            source = ref
    elif norm in ("macenko@card", "vahadane@card"):
        source = path_stains(path, ref)
    rows, t0 = [], time.perf_counter()
    for image in batches:
        if norm is not None:
            image = normalise_batch(image, ref, source=source).round().clamp(0, 255)
            image = image.to(torch.uint8)
        rows.append(scorer.scored(image))
    return np.concatenate(rows), grid, time.perf_counter() - t0, scorer.trust


class Scorer:
    """Scores whole groups, cached in ``cache`` (one file per group/normaliser/uncertainty)."""

    def __init__(self, model: LoadedModel, groups: dict, refs: dict, cache: Path) -> None:
        self.model, self.groups, self.refs, self.cache = model, groups, refs, cache
        cache.mkdir(parents=True, exist_ok=True)

    def __call__(
        self, group: str, norm: str | None = None, unc: str | None = None, key: str = ""
    ) -> Scored:
        """``key``: appended to the cache file's name (the OOD thresholds the rows hold)."""
        tag = f"{group}-{(norm or 'none').replace('@', '_')}-{(unc or 'plain').replace(':', '')}"
        tag += key
        file = self.cache / f"{tag}.npz"
        if file.exists():
            z = np.load(file)
            return Scored(z["rows"], z["cover"], z["slide"], float(z["seconds"]),
                          z["names"].tolist())  # fmt: skip
        rows, cover, slide, seconds = [], [], [], 0.0
        for i, (_, path, labels) in enumerate(self.groups[group]):
            original = self.groups["id"][i][1] if labels else None
            ref = self.refs.get(norm)
            r, grid, sec, names = score_slide(
                self.model, path, uncertainty=unc, norm=norm, ref=ref, grid_of=original
            )
            rows.append(r)
            cover.append(
                tile_cover(labels, grid, grid.slide_mpp) if labels else np.full((len(r), 2), np.nan)
            )
            slide.append(np.full(len(r), i))
            seconds += sec
        out = Scored(np.concatenate(rows), np.concatenate(cover), np.concatenate(slide),
                     seconds, list(names))  # fmt: skip
        np.savez(file, rows=out.rows, cover=out.cover, slide=out.slide, seconds=seconds,
                 names=np.array(out.names))  # fmt: skip
        return out


def detected(model: LoadedModel, path: Path) -> int:
    """How many tissue tiles ``infer``'s tissue detection finds on ``path``."""
    try:
        return len(prepare_slide(path, model.card, InferSettings(batch_size=64)).grid)
    except CscvisionError:
        return 0


def stain_section(score: Scorer) -> dict[str, float]:
    print("(a) site shift of strength s: tile AUROC [95% interval] and ECE, without and with "
          "each normaliser (truth: generator masks)")  # fmt: skip
    auc: dict[tuple[float, str], np.ndarray] = {}
    speed = {}
    for s in STRENGTHS:
        for norm in (None, *NORMS):
            r = score(group_name(s), norm)
            speed[norm or "plain"] = len(r.rows) / r.seconds
            probs, truth = r.rows[:, : len(TARGETS)], r.truth
            auc[s, norm or "none"] = np.array(
                [auroc(truth[:, t], probs[:, t]) for t in range(len(TARGETS))]
            )
            y, pr = truth.T, probs.T
            cells = [
                f"{name} {auroc_ci(y[t], pr[t])} ECE {ece(pr[t], y[t]):.3f}"
                for t, name in enumerate(TARGETS)
            ]
            print(f"  s={s:<3g} {norm or 'none':13s} {len(r.rows):4d} tiles: {'; '.join(cells)}")
    if not NORMS:  # --no-normalisers: the model as infer runs it, nothing to compare
        return speed
    print("  summary (rule fixed beforehand: cost = AUROC none at s=0 minus at s; best = "
          "highest mean AUROC over targets; recovered = (best - none) / cost)")  # fmt: skip
    for s in STRENGTHS[1:]:
        cost = auc[0.0, "none"] - auc[s, "none"]
        best = max(NORMS, key=lambda m: float(np.mean(auc[s, m])))
        gain = auc[s, best] - auc[s, "none"]
        parts = []
        for t, name in enumerate(TARGETS):
            share = f" = {gain[t] / cost[t]:.0%} of it" if cost[t] >= 0.02 else ""
            parts.append(f"{name} cost {cost[t]:+.3f}, {best} gains {gain[t]:+.3f}{share}")
        print(f"  s={s:<3g} best normaliser {best}: {'; '.join(parts)}")
    for s in STRENGTHS[1:]:
        found = [detected(score.model, path) for _, path, _ in score.groups[group_name(s)]]
        print(f"  s={s:<3g} tissue tiles infer's own detection finds on the shifted slides: "
              f"{sum(found)} of the {len(score('id').rows)} scored")  # fmt: skip
    for t, name in enumerate(TARGETS):
        hit = [s for s in STRENGTHS[1:] if auc[0.0, "none"][t] - auc[s, "none"][t] >= 0.05]
        if not hit:
            print(f"  bar (1) {name}: no strength up to {STRENGTHS[-1]:g} costs >= 0.05: NOT MET")
            continue
        s = hit[0]
        best = max(NORMS, key=lambda m: float(np.mean(auc[s, m])))
        cost = auc[0.0, "none"][t] - auc[s, "none"][t]
        rec = (auc[s, best][t] - auc[s, "none"][t]) / cost
        alone = max(NORMS, key=lambda m: float(auc[s, m][t]))
        alone_rec = (auc[s, alone][t] - auc[s, "none"][t]) / cost
        print(f"  bar (1) {name}: first costs >= 0.05 at s={s:g} ({cost:.3f}); {best} recovers "
              f"{rec:.0%}: {'MET' if rec >= 0.5 else 'NOT MET'} (the best for {name} alone, "
              f"{alone}, {alone_rec:.0%})")  # fmt: skip
    return speed


def selective_section(score: Scorer, speed: dict[str, float]) -> None:
    print("(b) selective prediction: the most uncertain tiles (std of the target) dropped; "
          "AUROC [95% interval], ECE")  # fmt: skip
    for unc in UNCERTAINTIES:
        for group in ("id", group_name(PRIMARY)):
            r = score(group, None, unc)
            speed[unc] = len(r.rows) / r.seconds
            for t, name in enumerate(TARGETS):
                std, y, p = r.column(f"std_{name}"), r.truth[:, t], r.rows[:, t]
                for cover in COVERAGES:
                    k = kept(std, cover)
                    head = f"  {unc:5s} {group:5s} {name:17s} coverage {cover:4.0%}"
                    print(f"{head}: AUROC {auroc_ci(y[k], p[k])} ECE {ece(p[k], y[k]):.3f} "
                          f"({len(k)} tiles)")  # fmt: skip
                delta = []
                for i in boot_idx(len(y), seed=1):
                    k = i[kept(std[i], 0.8)]
                    delta.append(auroc(y[k], p[k]) - auroc(y[i], p[i]))
                k = kept(std, 0.8)
                d = auroc(y[k], p[k]) - auroc(y, p)
                lo, hi = np.nanpercentile(delta, (2.5, 97.5))
                verdict = "MET" if d > 0 else "NOT MET"
                verdict += ", interval above 0" if lo > 0 else ", interval includes 0"
                print(f"  {unc:5s} {group:5s} {name:17s} AUROC at 80% minus 100%: {d:+.4f} "
                      f"[{lo:+.4f}, {hi:+.4f}]: bar (2) {verdict}")  # fmt: skip
                errors(r, t, std)


def errors(r: Scored, t: int, std: np.ndarray) -> None:
    """Where the errors (p >= 0.5 against truth) are: their std and their mask coverage."""
    y, p, cover = r.truth[:, t], r.rows[:, t], r.cover[:, t]
    wrong = (p >= 0.5) != y
    rank = rankdata(std) / len(std)
    edge = (cover > 0.2) & (cover < 0.8)
    n_edge = int(edge.sum())
    inner = auroc(y[~edge], p[~edge])
    dropped = int((wrong & ~np.isin(np.arange(len(y)), kept(std, 0.8))).sum())
    confident = int((wrong & (np.abs(p - 0.5) > 0.3)).sum())
    print(f"      errors at 0.5: {wrong.sum()} of {len(y)} (positives {y.sum()}); their std "
          f"percentile median {np.median(rank[wrong]) if wrong.any() else np.nan:.2f}, "
          f"{dropped} dropped at 80%, {confident} with p < 0.2 or > 0.8; "
          f"{(wrong & edge).sum()} of them at coverage 0.2-0.8 ({n_edge} tiles there, "
          f"{n_edge / len(y):.0%}); AUROC without those tiles {inner:.3f}")  # fmt: skip


def ood_section(score: Scorer) -> None:
    model = score.model
    print(f"(c) OOD ({model.card.ood['features']} features): unseen tissue vs in-distribution "
          "tiles, and the slides flagged")  # fmt: skip
    limit = float(model.card.ood["slide_share_threshold"])
    ood_key = json.dumps(model.card.ood, sort_keys=True).encode()
    key = "-ood" + hashlib.sha256(ood_key).hexdigest()[:8]  # rows hold ratios to its threshold
    ratios = {}
    for group in ("id", group_name(PRIMARY), "unseen"):
        r = score(group, key=key)
        ratios[group] = ratio = r.column(OOD)
        for i, (sid, _, _) in enumerate(score.groups[group]):
            share = float((ratio[r.slide == i] > 1).mean())
            flag = "FLAGGED" if share > limit else "not flagged"
            print(f"  {group:6s} {sid:22s} share beyond p99 {share:6.1%} -> {flag} "
                  f"(limit {limit:.0%})")  # fmt: skip
    y = np.r_[np.zeros(len(ratios["id"]), bool), np.ones(len(ratios["unseen"]), bool)]
    print(f"  OOD AUROC unseen vs id tiles: {auroc(y, np.r_[ratios['id'], ratios['unseen']]):.3f}")


def speed_section(args, model: LoadedModel, groups: dict, speed: dict[str, float]) -> None:
    plain = LoadedModel(model.net, dataclasses.replace(model.card, ood={}), model.path)
    _, path, _ = groups["id"][0]
    rows, _, sec, _ = score_slide(plain, path)
    speed["no ood"] = len(rows) / sec
    print("(d) tiles/s of the model alone (tiles read beforehand; this machine, "
          f"{torch.get_num_threads()} threads; from the runs above, or cached ones)")  # fmt: skip
    for name in ("no ood", "plain", *METHODS, *UNCERTAINTIES):
        label = "with ood" if name == "plain" else name
        print(f"  {label:9s} {speed[name]:7.1f} tiles/s")


def cache_of(work: Path, model: LoadedModel) -> Path:
    digest = hashlib.sha256((model.path / WEIGHTS_FILE).read_bytes()).hexdigest()[:12]
    return work / f"scores-{digest}"


def main() -> None:
    global NORMS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("trust_eval"))
    p.add_argument("--slides", type=int, default=4)
    p.add_argument("--size", type=int, default=3072)
    p.add_argument(
        "--train-cohort",
        type=Path,
        default=Path("demo_out/cohort"),
        help="the demo model's training cohort (scripts/refit_ood.py makes it)",
    )
    p.add_argument("--model", default="demo", help="the model (default: the packaged demo)")
    p.add_argument("--only", choices=("stain", "selective", "ood"), help="print one part")
    p.add_argument("--fresh", action="store_true", help="score again, not from the cache")
    p.add_argument(
        "--no-normalisers",
        action="store_true",
        help="stain part: only the model as infer runs it (a model trained with data.stain)",
    )
    tse.add_arguments(p)
    p.add_argument("--norms", help="only these normalisers, comma-separated (for time; "
                   f"default all: {','.join(NORMS)})")  # fmt: skip
    args = p.parse_args()
    if args.no_normalisers:
        NORMS = ()
    elif args.norms:
        NORMS = tuple(n for n in NORMS if n in args.norms.split(","))
    torch.manual_seed(0)
    model = load_model(args.model)
    groups = build(args.work, args.slides, args.size)
    cache = cache_of(args.work, model)
    if args.fresh:
        for f in cache.glob("*.npz"):
            f.unlink()
    pixels = []
    for path in train_slides(args.train_cohort)[:3]:
        with open_slide(path) as s:
            pixels.append(sample_tissue_tiles(s, n_tiles=6, mpp=0.5, tile_px=224))
    refs = {m: fit_stain(np.concatenate(pixels), m, source="demo training tiles") for m in METHODS}
    refs.update({f"{m}@card": refs[m] for m in ("macenko", "vahadane")})
    score = Scorer(model, groups, refs, cache)
    if args.parts:
        return tse.parts_main(sys.modules[__name__], args, score)
    if args.only == "ood":
        return ood_section(score)
    speed = stain_section(score) if args.only in (None, "stain") else {}
    if args.only in (None, "selective"):
        selective_section(score, speed)
    if args.only is None:
        ood_section(score)
        speed_section(args, model, groups, speed)


if __name__ == "__main__":
    main()

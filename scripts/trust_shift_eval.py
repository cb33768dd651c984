"""The site shift of ``eval_trust.py`` taken apart: its stain part, its optics part, a twin.

Decided before any of these rows was scored (the full shift's rows had been seen; see
``docs/how-to/trust.md``):
- the same strengths 1, 2, 3 and the same 4 held-out slides and 333 tiles, for
  ``parts`` ``stain`` (stain vectors rotated, haematoxylin and eosin amounts scaled) and
  ``optics`` (tone curve, blur, JPEG) of :func:`cscvision.synth.stain_shift.SiteShift.at`,
  beside the full shift, each with no normaliser and every normaliser of ``eval_trust``;
- the issue's bar is about a *stain* shift: it is judged on the ``stain`` rows, by the same
  rule as the full shift's (smallest strength whose cost is >= 0.05, best by mean AUROC over
  both targets, recovered = (best - none) / cost); the full and optics rows are printed and
  summarised beside it whatever they say;
- ``--template-model``: a model trained with a stain template, scored as ``infer`` runs it,
  joins the candidates as ``trained@template`` (the fair pair: ``--model`` is then its twin,
  trained on the same cohort with the same config and seed but no template);
- the Macenko fits on each slide (the 8-tile fit of the ``macenko`` rows and ``infer``'s
  16-tile fit) are compared with the true shifted stains: the generator's stain vectors,
  and the vectors the shift itself rotated (Macenko on the whole unshifted slide), each
  turned by the set angle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cscvision.core.io import atomic_path
from cscvision.slides.slide import open_slide
from cscvision.slides.slide_stains import path_stains
from cscvision.slides.stain import angle_deg, fit_stain
from cscvision.synth.stain_shift import SiteShift, apply_site_shift, rotate_stains
from cscvision.testing import write_pyramid

ALL_PARTS = ("all", "stain", "optics")
PARTS = ALL_PARTS  # the parts scored: --part-list
TEMPLATE = "trained@template"


def add_arguments(p) -> None:
    """eval_trust's options for this part."""
    p.add_argument("--parts", action="store_true",
                   help="stain part only, taken apart: stain and optics parts alone "
                   "(scripts/trust_shift_eval.py)")  # fmt: skip
    p.add_argument("--template-model", help="with --parts: a model trained with a stain "
                   "template, scored beside --model (its twin trained without one)")  # fmt: skip
    p.add_argument("--angles", action="store_true",
                   help="with --parts: Macenko fits against the true shifted stains")  # fmt: skip
    p.add_argument("--part-list", default=",".join(ALL_PARTS),
                   help=f"with --parts: only these parts, comma-separated (for time; default "
                   f"{','.join(ALL_PARTS)})")  # fmt: skip


def parts_main(et, args, score) -> None:
    """``--parts``: the shift's stain and optics parts beside it (``et``: eval_trust)."""
    global PARTS
    PARTS = chosen_parts(args.part_list)
    build_parts(args.work, score.groups, et.STRENGTHS[1:])
    template = None
    if args.template_model:
        other = et.load_model(args.template_model)
        template = et.Scorer(other, score.groups, score.refs, et.cache_of(args.work, other))
    part_section(et, score, template)
    if args.angles:
        angle_section(et, score, args.work)


def chosen_parts(part_list: str) -> tuple[str, ...]:
    """The parts named in ``--part-list`` (comma-separated), in :data:`ALL_PARTS` order."""
    wanted = part_list.split(",")
    unknown = [p for p in wanted if p not in ALL_PARTS]
    if unknown:
        raise SystemExit(f"--part-list {part_list!r}: no part {', '.join(unknown)}; "
                         f"choose among {','.join(ALL_PARTS)}")  # fmt: skip
    return tuple(p for p in ALL_PARTS if p in wanted)


def part_group(strength: float, part: str) -> str:
    """The group of the shift of ``strength`` restricted to ``part`` (``all``: eval_trust's)."""
    if strength == 0:
        return "id"
    return f"s={strength:g}" + ("" if part == "all" else f"-{part}")


def build_parts(work: Path, groups: dict, strengths) -> None:
    """Adds the ``stain`` and ``optics`` groups to ``groups`` (slides written under ``work``)."""
    for s in strengths:
        for part in (p for p in PARTS if p != "all"):  # "all" is eval_trust's own groups
            shift, name = SiteShift.at(s, part), part_group(s, part)
            groups[name] = []
            for sid, path, labels in groups["id"]:
                out = write_shifted(path, work / name / f"{sid}-{name}.tiff", shift)
                groups[name].append((out.stem, out, labels))


def write_shifted(path: Path, out: Path, shift: SiteShift) -> Path:
    """``out``: the slide ``path`` after ``shift``, written unless it exists (a cache; written
    atomically, so a stopped run leaves no truncated slide for the next one to reuse)."""
    if not out.exists():
        with open_slide(path) as sl:
            rgb = sl.read_region((0, 0), 0, sl.info.dimensions)
        shifted = apply_site_shift(rgb, shift)
        with atomic_path(out) as tmp:
            write_pyramid(tmp, shifted, mpp=0.5, quality=shift.jpeg_quality)
    return out


def part_aurocs(et, score, template, strengths, norms) -> dict:
    """AUROC per (part, strength, normaliser): [stemness, immunosuppressive]; prints rows."""
    auc = {}
    for part in PARTS:
        for s in strengths:
            group = part_group(s, part)
            rows = [(n, score(group, n)) for n in (None, *norms)]
            if template is not None:
                rows.append((TEMPLATE, template(group)))
            for norm, r in rows:
                probs, truth = r.rows[:, : len(et.TARGETS)], r.truth
                name = norm or "none"
                auc[part, s, name] = a = np.array(
                    [et.auroc(truth[:, t], probs[:, t]) for t in range(len(et.TARGETS))]
                )
                eces = [et.ece(probs[:, t], truth[:, t]) for t in range(len(et.TARGETS))]
                print(f"  {part:6s} s={s:<3g} {name:16s} {len(r.rows):4d} tiles: AUROC "
                      f"{a[0]:.3f} / {a[1]:.3f}  ECE {eces[0]:.3f} / {eces[1]:.3f}")  # fmt: skip
    return auc


def part_section(et, score, template=None) -> None:
    """The decomposition table, its summary by the fixed rule, and bar (1) on the stain rows."""
    strengths = et.STRENGTHS
    norms = tuple(et.NORMS)
    cands = (*norms, TEMPLATE) if template is not None else norms
    print("(a') the shift taken apart at the same strengths (all = eval_trust's full shift; "
          "stain = rotation + amounts; optics = tone, blur, JPEG): tile AUROC and ECE, "
          "stemness / immunosuppressive")  # fmt: skip
    auc = part_aurocs(et, score, template, strengths, norms)
    if not cands:
        return
    print(
        "  summary (cost = none at s=0 minus none at s; best = highest mean AUROC over "
        "targets; recovered = (best - none) / cost, printed when the cost is >= 0.02)"
    )
    for part in PARTS:
        for s in strengths[1:]:
            cost = auc[part, 0.0, "none"] - auc[part, s, "none"]
            best = max(cands, key=lambda m: float(np.mean(auc[part, s, m])))
            gain = auc[part, s, best] - auc[part, s, "none"]
            cells = [f"{n} cost {cost[t]:+.3f}, gain {gain[t]:+.3f}"
                     + (f" = {gain[t] / cost[t]:.0%}" if cost[t] >= 0.02 else "")
                     for t, n in enumerate(et.TARGETS)]  # fmt: skip
            print(f"  {part:6s} s={s:<3g} best {best}: {'; '.join(cells)}")
    for part in PARTS:
        tag = "bar (1)" if part == "stain" else "beside it"
        for t, name in enumerate(et.TARGETS):
            print(f"  {tag} [{part}] {name}: {bar_verdict(auc, part, t, strengths, cands)}")


def bar_verdict(auc: dict, part: str, t: int, strengths, cands) -> str:
    none0 = auc[part, 0.0, "none"][t]
    hit = [s for s in strengths[1:] if none0 - auc[part, s, "none"][t] >= 0.05]
    if not hit:
        worst = max(none0 - auc[part, s, "none"][t] for s in strengths[1:])
        return f"no strength costs >= 0.05 (largest cost {worst:.3f}): NOT MET"
    s = hit[0]
    cost = none0 - auc[part, s, "none"][t]
    best = max(cands, key=lambda m: float(np.mean(auc[part, s, m])))
    rec = (auc[part, s, best][t] - auc[part, s, "none"][t]) / cost
    alone = max(cands, key=lambda m: float(auc[part, s, m][t]))
    alone_rec = (auc[part, s, alone][t] - auc[part, s, "none"][t]) / cost
    short = "" if rec >= 0.5 else f", {0.5 * cost - rec * cost:.3f} AUROC short of half"
    return (f"first costs >= 0.05 at s={s:g} ({cost:.3f}); {best} recovers {rec:.0%}: "
            f"{'MET' if rec >= 0.5 else 'NOT MET'}{short} (best for this target alone: "
            f"{alone}, {alone_rec:.0%})")  # fmt: skip


def true_stains(et, work: Path, sid: str) -> tuple[np.ndarray, np.ndarray]:
    """The generator's stain vectors of slide ``sid`` (rows H, E) and the Macenko vectors of
    the whole unshifted slide, which :func:`apply_site_shift` unmixes with and rotates."""
    truth = et.json.loads((work / "id" / f"{sid}_truth.json").read_text())["stain"]
    gen = np.array([truth["haematoxylin_od"], truth["eosin_od"]], float)
    with open_slide(work / "id" / f"{sid}.tiff") as sl:
        rgb = sl.read_region((0, 0), 0, sl.info.dimensions)
    return gen, np.asarray(fit_stain(rgb, "macenko").stain_matrix)


def eight_tile_fit(et, model, path: Path, grid_of: Path) -> np.ndarray:
    """The fit of eval_trust's ``macenko`` rows: 8 of the scored tiles, seed 0."""
    prepared = et.prepare_slide(grid_of, model.card, et.InferSettings(batch_size=64))
    grid = prepared.grid
    tiles = et.TileBatches.of_tiles(str(path), grid.slide_mpp, grid.plan, grid.xy_l0, 64)
    every = torch.cat([tiles.read(i)["image"] for i in range(len(tiles))])
    pick = np.random.default_rng(0).permutation(len(every))[:8]
    return np.asarray(fit_stain(every[pick].permute(0, 2, 3, 1).numpy(), "macenko").stain_matrix)


def angle_section(et, score, work: Path) -> None:
    """Per slide, strength and part: angles (H, E) of the two Macenko fits to the true
    shifted stains (the generator's and the shift's own basis, each rotated), and the
    99th-percentile amounts of infer's fit (what the template rescales to its own)."""
    ref = score.refs["macenko"]
    print("(a'') Macenko fits against the true shifted stains, degrees H / E: 8-tile fit "
          "(eval_trust's macenko rows) and infer's 16-tile fit, each to the generator's "
          "vectors rotated by the set angle [to the shift's own basis rotated]")  # fmt: skip
    basis = {sid: true_stains(et, work, sid) for sid, _, _ in score.groups["id"]}
    for part in PARTS:
        for s in et.STRENGTHS:
            if s == 0 and part != "all":
                continue
            deg = SiteShift.at(s, part).rotation_deg
            for i, (_, path, _) in enumerate(score.groups[part_group(s, part)]):
                sid, original = score.groups["id"][i][0], score.groups["id"][i][1]
                gen, own = (rotate_stains(b, deg) for b in basis[sid])
                own_fit = path_stains(path, ref)
                fits = {"8-tile": eight_tile_fit(et, score.model, path, original),
                        "infer": np.asarray(own_fit.stain_matrix)}  # fmt: skip
                cells = []
                for label, fit in fits.items():
                    g = [angle_deg(f, v) for f, v in zip(fit, gen, strict=True)]
                    o = [angle_deg(f, v) for f, v in zip(fit, own, strict=True)]
                    cells.append(f"{label} {g[0]:5.1f} / {g[1]:5.1f} [{o[0]:4.1f} / {o[1]:4.1f}]")
                amounts = "/".join(f"{c:.2f}" for c in own_fit.max_concentration)
                print(f"  {part:6s} s={s:<3g} {sid:14s} rot {deg:4.1f}: {'; '.join(cells)}; "
                      f"infer's max H/E amounts {amounts}")  # fmt: skip

"""Learn Treg density from H&E with labels from multiplex IF; score it on held-out slides.

synth --mif (phenotype infiltration, seed 606: no test uses it) → ``cscvision labels mif
--feature density_treg`` (the tool's own cells, gating, phenotypes and registration; tiles
of 112 px at 1 µm/px) → ``cscvision stain fit`` on the training slides (Macenko;
``--stain none`` skips it) → ``cscvision train`` (the cpu_demo config as regression:
small_cnn, lr 0.0005, tiles normalised to that template with each slide's own stains) →
``cscvision infer`` on the held-out test slides. Prints Pearson r over the test slides'
tissue tiles between the model's predicted Treg density and (a) the mIF labels, (b) the
TRUE Treg density of the tile (the generator's cells over the tile's true tissue area), and
beside them the negative control: the same labels remade with FOXP3 given at random within
the tool's T cells, against the true Treg density, next to the T-cell (parent) density's.

Splits by patient (one slide each): the last ``--test`` slides are test, the ``--val``
before them validation. What could fool you: synthetic data only; Tregs live mostly in the
generator's immunosuppressive regions, whose H&E look differs, so the model may learn the
region rather than the cells; few test tiles give a wide interval.

    nice -n 5 .venv/bin/python scripts/eval_mif_train.py --out W --slides 12 --size 4096 \
        --val 2 --test 3 --epochs 40
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_cell_labels import _split_cohort, _tiles


def sh(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cscvision", *args], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/eval_mif_train"))
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--val", type=int, default=1)
    ap.add_argument("--test", type=int, default=2)
    ap.add_argument("--seed", type=int, default=606)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--stain", choices=("macenko", "none"), default="macenko",
                    help="normalise tiles to a reference fitted on training slides")  # fmt: skip
    ap.add_argument("--lr", type=float, default=0.0005)
    ap.add_argument("--report-only", action="store_true",
                    help="only print the figures of an earlier run in --out")  # fmt: skip
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a further training override, e.g. optim.lr=0.001")  # fmt: skip
    args = ap.parse_args()
    t0 = time.perf_counter()
    cohort, labels, model = args.out / "cohort", args.out / "labels", args.out / "model"
    if not (cohort / "mif_manifest.csv").exists():
        sh("synth", "--out", str(cohort), "--slides", str(args.slides), "--patients",
           str(args.slides), "--size", str(args.size), "--seed", str(args.seed), "--mif",
           "--infiltration", "phenotype", "--workers", str(args.workers))  # fmt: skip
    if not (labels / "cohort.csv").exists():
        sh("labels", "mif", str(cohort / "mif_manifest.csv"), "--panel",
           str(cohort / "mif_panel.yaml"), "--out", str(labels), "--feature", "density_treg",
           "--mpp", "1.0", "--tile-px", "112", "--overwrite")  # fmt: skip
    test = _split_cohort(labels / "cohort.csv", args.val, args.test)
    t1 = time.perf_counter()
    if args.report_only:
        _report(args, cohort, labels, test, [t0, t1, t1, t1])
        return 0
    stain = []
    if args.stain != "none":
        train = [r["slide_path"] for r in csv.DictReader((labels / "cohort.csv").open())
                 if r["split"] == "train"]  # fmt: skip
        ref = args.out / "stain_reference.json"
        sh("stain", "fit", *(str((labels / p).resolve()) for p in train), "--out", str(ref),
           "--method", args.stain, "--overwrite")  # fmt: skip
        stain = [f"data.stain={ref}"]
    sh("train", "--config", "cpu_demo", f"cohort.csv={labels / 'cohort.csv'}",
       "task=regression", "name=eval_mif_train", f"run_dir={args.out / 'run'}",
       f"export_dir={model}", f"trainer.max_epochs={args.epochs}", "grid.mpp=1.0",
       "grid.tile_px=112", "regression.units=Tregs / mm² of tissue",
       "card.trained_on=synthetic slides with Treg-density labels from cscvision labels mif",
       f"optim.lr={args.lr}", *stain, *args.set, "--no-resume")  # fmt: skip
    t2 = time.perf_counter()
    sh("infer", *(str(cohort / f"{s}.tiff") for s in test), "--model", str(model), "--out",
       str(args.out / "infer"), "--threads", "1", "--workers", "1", "--overwrite")  # fmt: skip
    _report(args, cohort, labels, test, [t0, t1, t2, time.perf_counter()])
    return 0


def _report(args, cohort: Path, labels: Path, test: list[str], times: list[float]) -> None:
    from eval_mif import tile_truth

    from cscvision.cells.table import read_cell_table

    label, pred, true, slide, parent, region = [], [], [], [], [], []
    for sid in test:
        lab = _tiles(labels / f"{sid}.labels.csv")
        out = _tiles(args.out / "infer" / sid / "tiles.csv")
        truth = read_cell_table(cohort / f"{sid}_mif_truth.cells.parquet")
        xy = np.array([k for k in lab if k in out and lab[k]["density_treg"]])
        tile_l0 = 112 * 1.0 / 0.5
        t = tile_truth(cohort, sid, truth, "treg", xy, tile_l0)
        parent += list(tile_truth(cohort, sid, truth, "t_cell", xy, tile_l0))
        region += list(_region_share(cohort / f"{sid}_labels.png", xy, tile_l0))
        slide += [sid] * len(xy)
        for (x, y), tv in zip(xy, t, strict=True):
            label.append(float(lab[(x, y)]["density_treg"]))
            pred.append(float(out[(x, y)]["prob_density_treg"]))
            true.append(tv)
    label, pred, true = np.array(label), np.array(pred), np.array(true)
    ok = np.isfinite(true)
    _print_diagnosis(label, pred, true, np.array(parent), np.array(region), np.array(slide))
    t0, t1, t2, t3 = times
    print(
        f"\n{args.slides} synthetic slides of {args.size}² px (seed {args.seed}); test "
        f"{', '.join(test)}; {len(label)} test tiles of 112 px at 1 µm/px"
        f"\nPearson r, model's predicted Treg density vs the mIF labels:        "
        f"{np.corrcoef(pred, label)[0, 1]:.3f}"
        f"\nPearson r, model's predicted Treg density vs the TRUE Treg density: "
        f"{np.corrcoef(pred[ok], true[ok])[0, 1]:.3f} ({ok.sum()} tiles with true tissue area)"
        f"\nPearson r, the mIF labels vs the TRUE Treg density:                 "
        f"{np.corrcoef(label[ok], true[ok])[0, 1]:.3f}"
        f"\ntimes: synth + labels {t1 - t0:.0f} s, train {t2 - t1:.0f} s, infer {t3 - t2:.0f} s"
        f"\nnegative control (random FOXP3 within T cells) and the parent density: "
        f"python scripts/eval_mif.py {cohort} {labels}"
    )
    with (args.out / "test_tiles.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "pred", "true"])
        w.writerows(zip(label, pred, true, strict=True))


def _region_share(mask_png: Path, xy: np.ndarray, tile_l0: float) -> np.ndarray:
    """Share of each tile under the generator's immunosuppressive region (label bit 16)."""
    from PIL import Image

    from cscvision.slides.slide import open_slide

    mask = np.asarray(Image.open(mask_png)) & 16 > 0
    with open_slide(mask_png.with_name(mask_png.name.replace("_labels.png", ".tiff"))) as s:
        scale = mask.shape[1] / s.info.dimensions[0]
    span = max(1, round(tile_l0 * scale))
    return np.array([mask[round(y * scale) :][:span, round(x * scale) :][:, :span].mean()
                     for x, y in xy])  # fmt: skip


def _print_diagnosis(label, pred, true, parent, region, slide) -> None:
    """What limits the figure: per test slide, Pearson and the mean label vs prediction (a
    slide-level offset lowers the pooled r), and the ceiling of what H&E can show, the true
    Treg density's Pearson with its least-squares fit on the true T-cell (parent) density,
    the region share and their product (in sample: an optimistic bound)."""
    for sid in dict.fromkeys(slide):
        m = slide == sid
        r = np.corrcoef(pred[m], label[m])[0, 1]
        print(f"  {sid}: {m.sum()} tiles, Pearson vs labels {r:.3f}, mean label "
              f"{label[m].mean():.0f}, mean prediction {pred[m].mean():.0f}")  # fmt: skip
    ok = np.isfinite(true) & np.isfinite(parent)
    x = np.c_[np.ones(ok.sum()), parent[ok], region[ok], parent[ok] * region[ok]]
    fit = x @ np.linalg.lstsq(x, true[ok], rcond=None)[0]
    print(f"  ceiling: true Treg density vs T-cell density alone r = "
          f"{np.corrcoef(true[ok], parent[ok])[0, 1]:.3f}; vs a fit on T-cell density and the "
          f"immunosuppressive region r = {np.corrcoef(true[ok], fit)[0, 1]:.3f}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())

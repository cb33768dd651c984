"""The IHC road scored against an independent truth, on any cohort in the documented layout.

    cscvision synth --out C --slides 4 --patients 4 --size 6144 --seed 2024 --ihc realistic
    python scripts/eval_ihc.py C [--out eval_ihc] [--markers configs/ihc_markers.yaml]

The cohort folder needs ``ihc_manifest.csv`` (slide_id,patient_id,slide_path,ihc_path,marker)
and, beside every IHC slide ``X.tiff``, its point map ``X_pointmap.npz`` (the true H&E -> IHC
map, H&E and IHC tissue flags and the region truth: layout in
:mod:`cscvision.synth.ihc_truth`), so a cohort made by other code can be scored.

Runs ``cscvision labels ihc`` with every setting at its default, then prints per pair the true
registration error over H&E tissue that the IHC section holds (median, p90, µm), the tool's
own estimate and their ratio; per target the AUROC of the tile targets against the region
truth (a tile is positive when ≥ half of its tissue points are in the target); excluded
tiles against the truth (a tile should be excluded when under ``min_ihc_tissue`` of its
tissue lies on IHC tissue); and, for each H&E slide given another slide's IHC of the same
marker, whether that unrelated pair is refused. Synthetic data only, unless you bring yours.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from cscvision.cli import main as cli
from cscvision.cli.labels_ihc import read_manifest
from cscvision.labels.registration import Registration, register_slides
from cscvision.labels.table import read_label_table, read_sidecar, table_path
from cscvision.slides.slide import open_slide
from cscvision.synth.ihc_truth import read_point_map

ROOT = Path(__file__).resolve().parents[1]
BITS = {"stemness": 8, "immunosuppressive": 16}


def pointmap_path(ihc_path: Path) -> Path:
    return ihc_path.with_name(ihc_path.stem + "_pointmap.npz")


def true_error_um(reg: Registration, pm: dict) -> np.ndarray:
    """|reg(p) - truth(p)| (IHC µm) over H&E tissue points that the IHC section holds."""
    return true_error_map(reg, pm)[(pm["he_tissue"] > 0) & (pm["ihc_tissue"] > 0)]


def true_error_map(reg: Registration, pm: dict) -> np.ndarray:
    """The true error (µm) at every point of the point map; NaN off H&E or IHC tissue."""
    keep = (pm["he_tissue"] > 0) & (pm["ihc_tissue"] > 0)
    rr, cc = np.nonzero(keep)
    p = (np.stack([cc, rr], 1) + 0.5) * float(pm["step_um"])
    out = np.full(keep.shape, np.nan)
    out[rr, cc] = np.linalg.norm(reg.map_um(p) - pm["ihc_xy_um"][:, rr, cc].T, axis=1)
    return out


def tile_points(pm: dict, xy_l0: np.ndarray, tile_um: float, he_mpp: float):
    """Per tile, the point-map cells it covers: (rows, cols) slices."""
    step = float(pm["step_um"])
    for x, y in xy_l0:
        c0, r0 = int(x * he_mpp / step), int(y * he_mpp / step)
        n = max(1, round(tile_um / step))
        yield slice(r0, r0 + n), slice(c0, c0 + n)


def tile_truth(pm: dict, table, min_ihc: float) -> dict[str, np.ndarray]:
    """Per tile of ``table``: region truth per target, and whether it should be excluded."""
    he_mpp = float(pm["he_mpp"])
    out = {t: np.zeros(len(table), bool) for t in BITS}
    out["exclude"] = np.zeros(len(table), bool)
    tile_um = table.tile_px * table.mpp
    for i, (rs, cs) in enumerate(tile_points(pm, table.xy_l0, tile_um, he_mpp)):
        tissue = pm["he_tissue"][rs, cs] > 0
        if not tissue.any():
            out["exclude"][i] = True
            continue
        for t, bit in BITS.items():
            out[t][i] = ((pm["region"][rs, cs] & bit) > 0)[tissue].mean() >= 0.5
        out["exclude"][i] = (pm["ihc_tissue"][rs, cs] > 0)[tissue].mean() < min_ihc
    return out


def score_pairs(manifest: dict, labels: Path) -> list[dict]:
    rows = []
    for slide_id, entry in manifest.items():
        for marker, ihc in entry["pairs"]:
            reg_path = labels / "registration" / f"{slide_id}_{marker}.json"
            reg = Registration.from_dict(json.loads(reg_path.read_text()))
            err = true_error_um(reg, read_point_map(pointmap_path(ihc)))
            est = reg.error_um.get("median")
            med = float(np.median(err))
            rows.append({"pair": f"{slide_id} {marker}", "ok": reg.ok, "reason": reg.reason,
                         "true_median": med, "true_p90": float(np.percentile(err, 90)),
                         "estimate": est, "estimate_p90": reg.error_um.get("p90"),
                         "ratio": (est / med) if est else float("nan"),
                         "agreement": reg.agreement, "qc": reg.qc or "-",
                         "deformation": reg.deformation_um,
                         "nonrigid": reg.flow_um is not None})  # fmt: skip
    return rows


def labelled_slides(manifest: dict, labels: Path):
    """(slide id, manifest entry, label table path, table) of every slide ``labels`` holds a
    table of."""
    for slide_id, entry in manifest.items():
        path = table_path(labels, slide_id)
        if path.exists():
            yield slide_id, entry, path, read_label_table(path)


def score_labels(manifest: dict, labels: Path, min_ihc: float) -> dict:
    ys = {t: [] for t in BITS}
    ss = {t: [] for t in BITS}
    excl = {"tool": 0, "truth": 0, "both": 0, "tiles": 0}
    for _, entry, _, table in labelled_slides(manifest, labels):
        pm = read_point_map(pointmap_path(entry["pairs"][0][1]))
        truth = tile_truth(pm, table, min_ihc)
        for _, ihc in entry["pairs"][1:]:  # a tile is excluded when any marker misses it
            truth["exclude"] |= tile_truth(read_point_map(pointmap_path(ihc)), table,
                                           min_ihc)["exclude"]  # fmt: skip
        tool = ~table.valid
        excl["tiles"] += len(table)
        excl["tool"] += int(tool.sum())
        excl["truth"] += int(truth["exclude"].sum())
        excl["both"] += int((tool & truth["exclude"]).sum())
        for t in BITS:
            if t in table.targets:
                j = table.targets.index(t)
                keep = table.valid & np.isfinite(table.values[:, j])
                ys[t].append(truth[t][keep])
                ss[t].append(table.values[keep, j])
    auroc = {}
    for t in BITS:
        if ys[t]:
            y, s = np.concatenate(ys[t]), np.concatenate(ss[t])
            auroc[t] = (roc_auc_score(y, s) if 0 < y.sum() < len(y) else float("nan"),
                        int(y.sum()), len(y))  # fmt: skip
    return {"auroc": auroc, "excluded": excl}


def score_qc(manifest: dict, labels: Path, bad_um: float = 10.0) -> dict:
    """Tiles excluded for the registration (the sidecar's ``excluded_for_registration``)
    against tiles whose TRUE local error (median over the tile's points, worst accepted
    marker) exceeds ``bad_um``, among tiles valid or excluded for the registration only."""
    out = {"tiles": 0, "bad": 0, "caught": 0, "lost": 0}
    for slide_id, entry, path, table in labelled_slides(manifest, labels):
        record = read_sidecar(path)["provenance"].get("excluded_for_registration", {})
        done = {tuple(xy) for xy in record.get("xy_l0", [])}
        by_reg = np.array([tuple(xy) in done for xy in table.xy_l0.tolist()], bool)
        worst = np.zeros(len(table))
        for marker, ihc in entry["pairs"]:
            reg_path = labels / "registration" / f"{slide_id}_{marker}.json"
            reg = Registration.from_dict(json.loads(reg_path.read_text()))
            if not reg.ok:
                continue
            pm = read_point_map(pointmap_path(ihc))
            err = true_error_map(reg, pm)
            tile_um = table.tile_px * table.mpp
            for i, (rs, cs) in enumerate(tile_points(pm, table.xy_l0, tile_um,
                                                     float(pm["he_mpp"]))):  # fmt: skip
                cell = err[rs, cs]
                if np.isfinite(cell).any():
                    worst[i] = max(worst[i], float(np.nanmedian(cell)))
        scored = table.valid | by_reg
        bad = worst > bad_um
        out["tiles"] += int(scored.sum())
        out["bad"] += int((bad & scored).sum())
        out["caught"] += int((bad & by_reg).sum())
        out["lost"] += int((~bad & by_reg).sum())
    return out


def unrelated(manifest: dict) -> list[tuple[str, bool, float, str]]:
    """Each H&E slide with the next slide's IHC of the same marker."""
    ids = list(manifest)
    out = []
    for i, sid in enumerate(ids):
        other = manifest[ids[(i + 1) % len(ids)]]
        _marker, ihc = other["pairs"][0]
        with open_slide(manifest[sid]["slide_path"]) as he, open_slide(ihc) as moving:
            reg, _ = register_slides(he, moving)
        out.append((f"{sid} + {ihc.name}", reg.ok, reg.agreement, reg.reason))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cohort", type=Path, help="folder with ihc_manifest.csv and point maps")
    ap.add_argument("--out", type=Path, default=Path("eval_ihc"))
    ap.add_argument("--markers", type=Path, default=ROOT / "configs" / "ihc_markers.yaml")
    ap.add_argument("--no-unrelated", action="store_true", help="skip the unrelated pairs")
    ap.add_argument("labels_args", nargs="*", help="extra `cscvision labels ihc` flags after --")
    args = ap.parse_args()
    manifest = read_manifest(args.cohort / "ihc_manifest.csv")
    labels = args.out / "labels"
    cli(["labels", "ihc", str(args.cohort / "ihc_manifest.csv"), "--markers", str(args.markers),
         "--out", str(labels), "--overwrite", *args.labels_args])  # fmt: skip
    rows = score_pairs(manifest, labels)
    print("\npair | accepted | true error median / p90 (µm) | estimate median / p90 | "
          "estimate / true median | patch agreement | non-rigid | QC | deformation median / "
          "p90 (µm; the field's size, not an error)")  # fmt: skip
    for r in rows:
        bend = r["deformation"]
        print(f"{r['pair']} | {r['ok']} | {r['true_median']:.1f} / {r['true_p90']:.1f} | "
              f"{r['estimate']} / {r['estimate_p90']} | {r['ratio']:.2f} | {r['agreement']:.3f}"
              f" | {r['nonrigid']} | {r['qc']} | {bend.get('median', '-')} / "
              f"{bend.get('p90', '-')}{'' if r['ok'] else ' | ' + r['reason']}")  # fmt: skip
    ratios = np.array([r["ratio"] for r in rows], float)
    on_target = sum(r["true_median"] <= 5 and r["true_p90"] <= 10 for r in rows)
    within = int(((ratios >= 0.5) & (ratios <= 2)).sum())
    print(f"true pairs accepted {sum(r['ok'] for r in rows)} of {len(rows)}; pairs with "
          f"median <= 5 and p90 <= 10 µm: {on_target} of {len(rows)}; estimate/true ratio "
          f"{np.nanmin(ratios):.2f}-{np.nanmax(ratios):.2f} (within 2x: {within} of "
          f"{len(rows)})")  # fmt: skip
    import yaml

    min_ihc = float((yaml.safe_load(args.markers.read_text()) or {}).get("min_ihc_tissue", 0.6))
    lab = score_labels(manifest, labels, min_ihc)
    for t, (auc, pos, n) in lab["auroc"].items():
        print(f"IHC-derived {t}: tile AUROC {auc:.3f} vs region truth ({pos} positive of "
              f"{n} valid tiles)")  # fmt: skip
    e = lab["excluded"]
    print(f"excluded tiles: tool {e['tool']}, truth {e['truth']}, both {e['both']} "
          f"(of {e['tiles']} tiles)")  # fmt: skip
    q = score_qc(manifest, labels)
    warned = [r["pair"] for r in rows if r["qc"] == "warn"]
    print(
        f"registration QC: {len(warned)} of {len(rows)} pairs warn ({', '.join(warned) or '-'})"
        f"; tiles with a true local error > 10 µm: {q['bad']} of {q['tiles']}, excluded for "
        f"the registration {q['caught']} of them; good tiles excluded for it: {q['lost']}"
    )
    if not args.no_unrelated:
        found = unrelated(manifest)
        for name, ok, agreement, reason in found:
            print(f"unrelated {name}: {'ACCEPTED' if ok else 'refused'} (agreement "
                  f"{agreement:.3f}) {reason}")  # fmt: skip
        print(f"unrelated pairs refused {sum(not f[1] for f in found)} of {len(found)}")


if __name__ == "__main__":
    main()

"""A small training run learns what the labels say, and nothing when they are permuted.

Synthetic cohort (no real labelled data ships): each slide is a grid of 128 px blocks,
every block independently stemness-coloured, immunosuppressive-coloured, both or plain,
each annotated as a QuPath rectangle. With the right annotations the tile model separates
the classes on ≥ 500 held-out tiles (AUROC ≥ 0.9); with the annotation files permuted
across slides (each slide gets another slide's blocks: labels independent of the image
at every position) it cannot (AUROC within 0.4–0.6). A pipeline that shifts labels
against their tiles fails the first; one that leaks labels another way fails the second.
(``write_toy_cohort``'s single central rectangles would not do: two random central
rectangles overlap more often than chance, so permuted labels keep some signal.)
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cscvision.testing import TOY_COLORS, write_pyramid
from cscvision.training.config import load_config
from cscvision.training.train import train

N_SLIDES, SIZE_PX, BLOCK_PX = 16, 1024, 128


def _block_slide(rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    rgb = np.full((SIZE_PX, SIZE_PX, 3), 242, np.float32)
    features = []
    colors = {k: np.array(v, np.float32) for k, v in TOY_COLORS.items()}
    for y in range(BLOCK_PX // 2, SIZE_PX - BLOCK_PX, BLOCK_PX):
        for x in range(BLOCK_PX // 2, SIZE_PX - BLOCK_PX, BLOCK_PX):
            stem, immune = rng.random(2) < 0.3
            kinds = [k for k, on in (("stemness", stem), ("immunosuppressive", immune)) if on]
            color = np.mean([colors[k] for k in kinds], 0) if kinds else colors["tissue"]
            rgb[y : y + BLOCK_PX, x : x + BLOCK_PX] = color
            ring = [[x, y], [x + BLOCK_PX, y], [x + BLOCK_PX, y + BLOCK_PX], [x, y + BLOCK_PX]]
            for kind in kinds:
                name = {"stemness": "Stemness-rich", "immunosuppressive": "Immunosuppressive"}
                features.append({
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": [[*ring, ring[0]]]},
                    "properties": {"objectType": "annotation",
                                   "classification": {"name": name[kind]}},
                })  # fmt: skip
    rgb += rng.normal(0, 12, (SIZE_PX, SIZE_PX, 1))
    return np.clip(rgb, 0, 255).astype(np.uint8), features


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("learn")
    rng = np.random.default_rng(5)
    rows = ["slide_id,patient_id,slide_path,annotation_path"]
    for i in range(N_SLIDES):
        rgb, features = _block_slide(rng)
        write_pyramid(folder / f"b{i:02d}.tif", rgb, mpp=0.5, tile_px=256, levels=3)
        doc = {"type": "FeatureCollection", "features": features}
        (folder / f"b{i:02d}.geojson").write_text(json.dumps(doc))
        rows.append(f"b{i:02d},P{i},b{i:02d}.tif,b{i:02d}.geojson")
    (folder / "cohort.csv").write_text("\n".join(rows) + "\n")
    return folder / "cohort.csv"


def _permuted(csv_path: Path) -> Path:
    """The same cohort with each slide's annotation file taken from the next slide."""
    rows = list(csv.DictReader(csv_path.open()))
    notes = [r["annotation_path"] for r in rows]
    for i, row in enumerate(rows):
        row["annotation_path"] = notes[(i + 1) % len(rows)]
    out = csv_path.with_name("cohort_permuted.csv")
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def _test_metrics(csv_path: Path, run: Path) -> dict[str, float]:
    torch.set_num_threads(1)
    overrides = [
        f"cohort.csv={csv_path}", "cohort.split_fractions=[0.5, 0.125, 0.375]", "name=learn",
        f"run_dir={run / 'run'}", f"export_dir={run / 'model'}", "grid.mpp=1.0",
        "grid.tile_px=32", "grid.mask_mpp=4.0", "model.backbone=small_cnn",
        "data.batch_size=64", "data.num_workers=0", "trainer.max_epochs=3",
        "trainer.accelerator=cpu", "card.synthetic=true", "seed=0",
    ]  # fmt: skip
    return train(load_config(None, overrides), progress=False).metrics["test"]


@pytest.mark.slow
def test_training_learns_real_labels_and_not_permuted_ones(cohort, tmp_path):
    right = _test_metrics(cohort, tmp_path / "right")
    assert right["n_tiles"] >= 500
    for target in ("stemness", "immunosuppressive"):
        assert right[f"auroc_{target}"] >= 0.9, (target, right)
    permuted = _test_metrics(_permuted(cohort), tmp_path / "permuted")
    for name, m in (("right labels", right), ("permuted labels", permuted)):
        aurocs = ", ".join(f"{t} {m[f'auroc_{t}']:.3f}" for t in ("stemness", "immunosuppressive"))
        print(f"{name}: test AUROC {aurocs} on {int(m['n_tiles'])} tiles")
    assert permuted["n_tiles"] >= 500
    for target in ("stemness", "immunosuppressive"):
        assert 0.4 <= permuted[f"auroc_{target}"] <= 0.6, (target, permuted)

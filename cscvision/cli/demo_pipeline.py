"""The end-to-end demo: synthetic cohort → train a small CNN on the CPU → infer → outputs.

Everything here is synthetic: the model it trains knows synthetic slides only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from cscvision.core.io import read_csv

DEMO_CONFIG = "cpu_demo"  # a packaged config (cscvision config show cpu_demo)


@dataclass(frozen=True)
class DemoResult:
    cohort_csv: Path
    run_dir: Path
    model_dir: Path
    infer_dir: Path
    test_slides: list[str]
    metrics: dict
    seconds: float


def _cohort(out: Path, slides: int, patients: int, size_px: int, seed: int) -> Path:
    from cscvision.synth import write_cohort

    cohort_csv = out / "cohort" / "cohort.csv"
    if cohort_csv.exists():
        print(f"[1/3] synthetic cohort: reusing {cohort_csv}")
        return cohort_csv
    print(f"[1/3] synthetic cohort: {slides} slides of {patients} patients, {size_px} px each")
    return write_cohort(
        out / "cohort",
        n_slides=slides,
        n_patients=patients,
        size_px=size_px,
        seed=seed,
        workers=2,
        progress=True,
    )


def run_demo(
    out_dir: str | Path,
    *,
    slides: int = 16,
    patients: int = 8,
    size_px: int = 4096,
    seed: int = 0,
    config: str | Path = DEMO_CONFIG,
    overrides: tuple[str, ...] = (),
) -> DemoResult:
    """Run the whole demo into ``out_dir``; each stage resumes from what is already there."""
    from cscvision.cli import main as cli_main
    from cscvision.training.train import load_config, train

    start = time.perf_counter()
    out = Path(out_dir).resolve()
    cohort_csv = _cohort(out, slides, patients, size_px, seed)
    print("[2/3] training the demo model on the CPU (synthetic data only)")
    cfg = load_config(
        config,
        [
            f"cohort.csv={cohort_csv}",
            f"run_dir={out / 'run'}",
            f"export_dir={out / 'model'}",
            f"seed={seed}",
            *overrides,
        ],
    )
    result = train(cfg)
    splits = read_csv(result.run_dir / "splits.csv")
    test_ids = sorted(r["slide_id"] for r in splits if r["split"] == "test")
    paths = {r["slide_id"]: r["slide_path"] for r in read_csv(cohort_csv)}
    test_paths = [str(cohort_csv.parent / paths[s]) for s in test_ids]
    print(f"[3/3] inference on the {len(test_paths)} held-out test slides")
    infer_dir = out / "infer"
    cli_main(["infer", *test_paths, "--model", str(result.model_dir), "--out", str(infer_dir)])
    return DemoResult(
        cohort_csv=cohort_csv,
        run_dir=result.run_dir,
        model_dir=Path(result.model_dir),
        infer_dir=infer_dir,
        test_slides=test_ids,
        metrics=result.metrics,
        seconds=time.perf_counter() - start,
    )


def summary_lines(result: DemoResult) -> list[str]:
    test = result.metrics.get("test", {})
    aurocs = {k: v for k, v in test.items() if k.startswith("auroc_") and "mean" not in k}
    first = result.test_slides[0] if result.test_slides else "<slide_id>"
    return [
        f"demo finished in {result.seconds / 60:.1f} min",
        f"  synthetic cohort    {result.cohort_csv}",
        f"  training run        {result.run_dir}  (config, split, logs, checkpoints)",
        f"  model (synthetic!)  {result.model_dir}",
        "  held-out tile AUROC " + ", ".join(f"{k[6:]} {v:.3f}" for k, v in aurocs.items()),
        f"  heatmaps            {result.infer_dir}/{first}/overlay_<target>.png",
        f"  QuPath GeoJSON      {result.infer_dir}/{first}/{first}.geojson",
        f"  ASAP likelihood map {result.infer_dir}/{first}/{first}_likelihood_map_<target>.tif",
        f"  per-slide results   {result.infer_dir}/results.csv",
        "This model knows synthetic slides only; train your own on real annotated slides.",
    ]

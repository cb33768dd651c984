"""Ray against the local path: the same slides, the same model, wall time and overhead.

Each variant runs in a fresh subprocess into its own output folder:

* ``local``: ``run_batch`` + ``infer_job`` (what ``cscvision infer`` runs), with torch's
  default threads (all cores) and, for a fair comparison, with 1 thread;
* ``ray``: a local Ray instance (``ray.init(num_cpus=CORES)``), ``--workers`` actors of 1
  CPU each, timed in parts: start Ray, start the workers (each loads the model), dispatch.

Per slide: ``compute`` is the mean of the slides' own ``seconds`` (predict + stitch, in
``summary.json``), ``overhead`` = (dispatch time x workers - sum of per-slide seconds) / slides:
what a worker spends per slide outside the prediction (dispatch, output writing, tail idle).
Outputs of every variant are checked to be byte-identical (except timing fields).

    .venv/bin/python scripts/bench_ray.py --out /tmp/bench_ray            # synth + train
    .venv/bin/python scripts/bench_ray.py --out /tmp/bench_ray --model M  # any exported model
    .venv/bin/python scripts/bench_ray.py --out /tmp/bench_ray --random resnet18
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cscvision"]


# --- one variant, in its own process --------------------------------------------------------


def _one(args: argparse.Namespace) -> dict:
    import torch

    from cscvision.inference.batch import infer_job, job_complete
    from cscvision.inference.settings import InferSettings
    from cscvision.models.export import load_model
    from cscvision.outputs.slide_folder import model_identity
    from cscvision.slides.batch import make_jobs, run_batch

    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    info = model_identity(model)
    settings = InferSettings(workers=args.readers)
    manifest = args.cohort / "cohort.csv"
    from cscvision.slides.batch import collect_slides

    jobs = make_jobs(collect_slides([manifest]))
    out = Path(args.one_out)
    timing: dict = {"slides": len(jobs)}
    done = lambda job: job_complete(job, out, info, settings)  # noqa: E731
    if args.one == "local":
        device = torch.device("cpu")
        t1 = time.perf_counter()
        report = run_batch(
            jobs, lambda j: infer_job(j, model, out, settings, model_info=info, device=device),
            done, desc="local",
        )  # fmt: skip
        timing["batch_s"] = time.perf_counter() - t1
    else:
        timing |= _ray_parts(args, jobs, model, out, settings, info)
        report = None
    timing["wall_s"] = time.perf_counter() - t0
    failed = report.failed if report is not None else timing.pop("failed")
    timing["failed"] = len(failed)
    return timing


def _ray_parts(args, jobs, model, out, settings, info) -> dict:
    from cscvision.inference import distributed as d

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t = time.perf_counter()
    d.connect(num_cpus=args.cores)
    parts = {"ray_init_s": time.perf_counter() - t}
    import ray

    plan = d.plan_workers(ray.cluster_resources(), device="cpu", workers=args.workers)
    t = time.perf_counter()
    spawn = d.worker_factory(model, out, settings, plan, model_info=info, device="cpu")
    actors = d.start_workers(spawn, plan.workers)
    parts["workers_start_s"] = time.perf_counter() - t
    t = time.perf_counter()
    outcome = d.dispatch(jobs, actors, spawn=spawn, desc="ray")
    parts["dispatch_s"] = time.perf_counter() - t
    parts["batch_s"] = parts["workers_start_s"] + parts["dispatch_s"]
    d.stop_workers(actors)
    d.disconnect()
    parts["failed"] = [k for k, v in outcome.items() if v is not None]
    parts["workers"] = plan.workers
    return parts


# --- the driver -------------------------------------------------------------------------------


def _prepare(args: argparse.Namespace) -> None:
    if not (args.cohort / "cohort.csv").exists():
        subprocess.run([*CLI, "synth", "--out", str(args.cohort), "--slides", str(args.slides),
                        "--patients", str(args.slides // 2), "--size", "4096", "--seed", "0"],
                       check=True, cwd=ROOT)  # fmt: skip
    if args.model is not None:
        return
    if args.random:
        args.model = args.out / f"model_{args.random}"
        if not args.model.exists():
            import torch

            from cscvision.models.backbones import get_model
            from cscvision.models.export import ModelCard, export_model

            torch.manual_seed(0)
            card = ModelCard(name=f"random_{args.random}", backbone=args.random)
            export_model(get_model(args.random, 2), card, args.model)  # 224 px, 0.5 µm/px
        return
    args.model = args.out / "model"
    if not args.model.exists():
        subprocess.run([*CLI, "train", "--config", "configs/cpu_demo.yaml",
                        f"cohort.csv={args.cohort / 'cohort.csv'}", "--run-dir",
                        str(args.out / "run"), "--export", str(args.model), "--quiet"],
                       check=True, cwd=ROOT)  # fmt: skip


def _run_variant(args: argparse.Namespace, name: str, kind: str, threads: int) -> dict:
    out = args.out / "outputs" / name
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = [sys.executable, __file__, "--one", kind, "--one-out", str(out), "--out", str(args.out),
           "--cohort", str(args.cohort), "--model", str(args.model), "--workers",
           str(args.workers), "--readers", str(args.readers), "--cores", str(args.cores),
           "--threads", str(threads)]  # fmt: skip
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    timing = json.loads(done.stdout.strip().splitlines()[-1])
    timing["process_s"] = time.perf_counter() - t
    slide_s = [json.loads(p.read_text())["seconds"] for p in out.glob("*/summary.json")]
    timing["compute_per_slide_s"] = sum(slide_s) / max(1, len(slide_s))
    timing["sum_slide_s"] = sum(slide_s)
    return timing


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="work folder")
    p.add_argument("--cohort", type=Path, default=None, help="synthetic cohort (made if absent)")
    p.add_argument("--slides", type=int, default=8)
    p.add_argument("--model", type=Path, default=None, help="exported model (else trained)")
    p.add_argument("--random", default=None, help="export this backbone with random weights")
    p.add_argument("--workers", type=int, default=2, help="Ray workers")
    p.add_argument("--readers", type=int, default=2, help="reader threads per slide (--workers)")
    p.add_argument("--cores", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--one", choices=("local", "ray"), help=argparse.SUPPRESS)
    p.add_argument("--one-out", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.cohort = args.cohort or args.out / "cohort"
    if args.one:
        print(json.dumps(_one(args)))
        return
    _prepare(args)
    variants = [("local", "local", 0), ("local_1thread", "local", 1), ("ray", "ray", 1)]
    rows = []
    for repeat in range(args.repeats):
        for name, kind, threads in variants:
            rows.append((name, repeat, _run_variant(args, name, kind, threads)))
    from cscvision.testing import output_snapshot

    outputs = {name: output_snapshot(args.out / "outputs" / name) for name, _, _ in variants}
    same = all(o == outputs["local"] for o in outputs.values())
    _print_table(args, rows, same)


def _print_table(args: argparse.Namespace, rows: list, same: bool) -> None:
    print(f"\nmodel {args.model}; {args.cores} cores; slides from {args.cohort}")
    head = ("variant", "run", "process s", "batch s", "speed-up", "compute/slide s",
            "outside/slide s", "ray init s", "workers start s", "dispatch s")  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    local = {r: t["batch_s"] for n, r, t in rows if n == "local"}
    outside: dict[str, list[float]] = {}
    for name, repeat, t in rows:
        busy = t["dispatch_s"] * t["workers"] if name == "ray" else t["batch_s"]
        per_slide = (busy - t["sum_slide_s"]) / t["slides"]
        outside.setdefault(name, []).append(per_slide)
        cells = [name, repeat, f"{t['process_s']:.1f}", f"{t['batch_s']:.2f}",
                 f"{local[repeat] / t['batch_s']:.2f}x", f"{t['compute_per_slide_s']:.3f}",
                 f"{per_slide:.3f}",
                 *(f"{t[k]:.2f}" if k in t else "" for k in
                   ("ray_init_s", "workers_start_s", "dispatch_s"))]  # fmt: skip
        print("| " + " | ".join(map(str, cells)) + " |")
    mean = {k: sum(v) / len(v) for k, v in outside.items()}
    print(
        "\nbatch s: local = all slides; ray = workers start + dispatch (Ray init apart). "
        "speed-up: local batch s / this batch s. compute/slide: the slides' own seconds "
        "(tissue, tiles, scoring, stitching). outside/slide: (busy worker time - compute) / "
        "slides, i.e. output writing plus, on Ray, dispatch and the idle tail."
    )
    extra = mean["ray"] - mean["local_1thread"]
    print(f"Ray's own overhead per slide (ray - local_1thread, outside/slide): {extra:+.3f} s")
    print(f"outputs identical across variants (timing fields aside): {same}")


if __name__ == "__main__":
    main()

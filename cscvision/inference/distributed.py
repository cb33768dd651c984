"""Research batches on a Ray cluster: ``cscvision infer --ray [ADDRESS]`` and
``cscvision features --ray [ADDRESS]``.

A thin layer over the function the local path runs on each slide
(:func:`cscvision.inference.batch.infer_job`, :func:`cscvision.features.extract.extract_slide`):
one Ray actor per GPU (or per ``cpus_per_worker`` CPUs) holds the model, loaded once, and
processes the slides the driver hands it, one at a time, writing each slide's outputs with
the same atomic writers. The driver skips complete slides before dispatch,
shows a progress bar over slides as they finish (``ray.wait``), records a slide whose
worker raised (or died) as a failure and goes on, and returns the same
:class:`~cscvision.slides.batch.BatchReport` as :func:`cscvision.slides.batch.run_batch`.

Workers read the slides at the paths the driver gives and write into ``out_dir``: on a
cluster both must be on a filesystem every node sees at the same path. The model travels
through Ray's object store, so only ``cscvision`` itself must be installed on every node.

Ray is an optional extra (``pip install "cscvision[ray]"``); this module imports it only
when called.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from cscvision.core.errors import CscvisionError
from cscvision.core.guard import slide_lock
from cscvision.inference.batch import failure_reason, infer_job
from cscvision.inference.settings import InferSettings
from cscvision.models.export import LoadedModel
from cscvision.slides.batch import BatchReport, SlideJob, slide_dir

RAY_INSTALL = 'pip install "cscvision[ray]"'
LOCAL = "local"  # --ray without an address: start Ray on this machine


class RayUnavailable(CscvisionError, RuntimeError):
    """Ray is not installed."""


class DistributedError(CscvisionError, RuntimeError):
    """The Ray batch cannot start: no cluster, no resources, or workers that fail to start."""


def import_ray() -> Any:
    """The ``ray`` module, or :class:`RayUnavailable` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise RayUnavailable(
            f"--ray needs Ray, which is not installed here; install it with: {RAY_INSTALL}"
        ) from None
    return ray


def connect(address: str | None = LOCAL, *, num_cpus: int | None = None) -> bool:
    """Connect this process to Ray; returns True if it did (and so should disconnect).

    ``address``: ``"local"`` or None starts Ray on this machine (``num_cpus`` caps it);
    ``"auto"`` joins the cluster this machine belongs to (``ray start`` ran here);
    ``"ray://host:10001"`` connects through Ray Client; ``"host:6379"`` joins that head.
    Nothing happens, and False is returned, when this process is already connected.
    """
    ray = import_ray()
    if ray.is_initialized():
        return False
    options: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False)
    if address in (None, LOCAL):
        options["num_cpus"] = num_cpus
        where = "a local Ray instance"
    else:
        options["address"] = address
        where = f"the Ray cluster at {address}"
    try:
        ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise DistributedError(
            f"could not start or reach {where} ({e}); check the address (auto, "
            "ray://HEAD:10001 or HEAD:6379) and that `ray start --head` runs there. A "
            "cluster with token authentication (Ray >= 2.5x) also needs RAY_AUTH_MODE=token "
            "and its token (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)"
        ) from None
    return True


def disconnect() -> None:
    """Leave Ray (a local instance this process started stops with it)."""
    import_ray().shutdown()


@dataclass(frozen=True)
class WorkerPlan:
    """How many Ray workers, and what each one reserves."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float

    def describe(self) -> str:
        gpu = f", {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else ""
        return f"{self.workers} Ray workers ({self.cpus_per_worker:g} CPU{gpu} each)"


def plan_workers(
    resources: dict[str, float],
    *,
    device: str = "auto",
    workers: int | None = None,
    cpus_per_worker: float = 1,
) -> WorkerPlan:
    """One worker per GPU of the cluster (``device`` auto or cuda), else one per
    ``cpus_per_worker`` CPUs; ``workers`` overrides the count (several workers then share
    a GPU). ``resources`` is ``ray.cluster_resources()``. Pure."""
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    if workers is not None and workers < 1:
        raise ValueError(f"--ray-workers {workers}: give at least 1")
    if cpus_per_worker <= 0:
        raise ValueError(f"--ray-cpus {cpus_per_worker}: give a positive number")
    if device == "cuda" and gpus < 1:
        raise ValueError("--device cuda: the Ray cluster has no GPU; use --device cpu or auto")
    if device != "cpu" and gpus >= 1:
        count = workers or int(gpus)
        share = 1 / math.ceil(count / int(gpus))  # whole fractions: they must pack onto GPUs
        return WorkerPlan(count, cpus_per_worker, share)
    count = workers or max(1, int(cpus // cpus_per_worker))
    return WorkerPlan(count, cpus_per_worker, 0.0)


class JobWorker:
    """A Ray actor's state: ``setup(*args, device=...)`` runs once on the worker (it loads
    the model onto this worker's device) and returns the function run on slide after slide.

    ``setup`` must be a module-level function, so that the worker imports it by name.
    """

    def __init__(
        self,
        setup: Callable[..., Callable[[SlideJob], None]],
        *args: Any,
        device: str = "auto",
        threads: int = 1,
    ) -> None:
        import torch

        from cscvision.inference.predict import resolve_device

        torch.set_num_threads(max(1, threads))
        self.device = resolve_device(device)
        self.process = setup(*args, device=self.device)

    def ready(self) -> str:
        import os
        import socket

        return f"{socket.gethostname()} pid {os.getpid()} on {self.device}"

    def run(self, job: SlideJob) -> str | None:
        """Process one slide; None when done, else the failure reason (as the local path's:
        a slide file deleted or moved while it was read is said to have gone away)."""
        import os

        from cscvision.core.batch import went_away_reason

        existed = os.path.lexists(job.slide_path)
        try:
            self.process(job)
        except Exception as e:  # one bad slide must not stop the worker or the batch
            return went_away_reason(job.slide_path, existed) or failure_reason(e)
        return None


def infer_setup(
    model: LoadedModel,
    out_dir: str,
    settings: InferSettings,
    model_info: dict[str, str],
    *,
    device: Any,
) -> Callable[[SlideJob], None]:
    """:class:`JobWorker` setup for ``infer``: the model on ``device``, and a function that
    scores a slide and writes its outputs under the slide's lock, as the local path does
    (waiting for it: the driver chose the slide)."""
    model = LoadedModel(model.net.to(device).eval(), model.card, model.path)
    out = Path(out_dir)

    def process(job: SlideJob) -> None:
        with slide_lock(slide_dir(out, job.slide_id), wait=True):
            infer_job(job, model, out, settings, model_info=model_info, device=device)

    return process


def actor_factory(
    setup: Callable[..., Callable[[SlideJob], None]],
    args: Sequence[Any],
    plan: WorkerPlan,
    *,
    device: str = "auto",
) -> Callable[[], Any]:
    """A function that starts one more :class:`JobWorker` actor running ``setup(*args)``;
    each argument (the model) goes into the object store once, whatever the workers."""
    ray = import_ray()
    actor = ray.remote(num_cpus=plan.cpus_per_worker, num_gpus=plan.gpus_per_worker)
    worker_cls = actor(JobWorker)
    refs = [ray.put(a) for a in args]
    threads = max(1, int(plan.cpus_per_worker))
    return lambda: worker_cls.remote(setup, *refs, device=device, threads=threads)


def worker_factory(
    model: LoadedModel,
    out_dir: Path,
    settings: InferSettings,
    plan: WorkerPlan,
    *,
    model_info: dict[str, str],
    device: str = "auto",
) -> Callable[[], Any]:
    """:func:`actor_factory` for ``infer`` workers (:func:`infer_setup`)."""
    args = (model, str(out_dir), settings, model_info)
    return actor_factory(infer_setup, args, plan, device=device)


def start_workers(
    spawn: Callable[[], Any], count: int, *, start_timeout_s: float = 600.0
) -> list[Any]:
    """Start ``count`` actors and wait until one holds the model (the others join the
    batch as they come up: a cluster may be scaling up). Raises :class:`DistributedError`
    when that first worker fails to start, or none starts within ``start_timeout_s``."""
    ray = import_ray()
    actors = [spawn() for _ in range(count)]
    ready, _ = ray.wait([a.ready.remote() for a in actors], timeout=start_timeout_s)
    try:
        if not ready:
            raise DistributedError(
                f"no Ray worker started within {start_timeout_s:.0f} s: the cluster has no "
                "room for one; lower --ray-cpus or add nodes"
            )
        ray.get(ready)
    except ray.exceptions.RayActorError as e:
        stop_workers(actors)
        raise DistributedError(
            f"a Ray worker failed to start ({e}); every node needs the same cscvision "
            "installed (pip install 'cscvision[ray]') and, for GPUs, a working CUDA"
        ) from None
    except DistributedError:
        stop_workers(actors)
        raise
    return actors


def stop_workers(actors: Sequence[Any]) -> None:
    ray = import_ray()
    for a in actors:
        ray.kill(a)


def dispatch(
    jobs: Sequence[SlideJob],
    actors: list[Any],
    *,
    spawn: Callable[[], Any] | None = None,
    desc: str = "infer",
    skipped: int = 0,
    progress: bool = True,
) -> dict[str, str | None]:
    """Feed ``jobs`` to ``actors`` as each comes up and finishes, one slide in flight per
    actor; returns each slide's failure reason (None if done). A worker that dies (a crash
    in a decoder, out of memory) fails its slide and is replaced by ``spawn()``; ``actors``
    is kept up to date (stop them with :func:`stop_workers`)."""
    ray = import_ray()
    queue, idle, outcome = list(reversed(jobs)), [], {}
    in_flight = {a.ready.remote(): (None, a) for a in actors}  # job None: starting
    bar = tqdm(total=len(jobs) + skipped, initial=skipped, desc=desc, unit="slide",
               dynamic_ncols=True, disable=not progress)  # fmt: skip
    while queue or any(job is not None for job, _ in in_flight.values()):
        while queue and idle:
            job, worker = queue.pop(), idle.pop()
            in_flight[worker.run.remote(job)] = (job, worker)
        if not in_flight:  # every worker died and none could be replaced
            outcome.update({j.slide_id: "no Ray worker left to run this slide" for j in queue})
            break
        (ref,), _ = ray.wait(list(in_flight), num_returns=1)
        job, worker = in_flight.pop(ref)
        try:
            result = ray.get(ref)
            idle.append(worker)
        except ray.exceptions.RayActorError as e:  # the worker process died
            actors.remove(worker)
            result = f"RayActorError: the Ray worker died on this slide ({e})"
            if job is not None and spawn is not None:
                actors.append(spawn())
                in_flight[actors[-1].ready.remote()] = (None, actors[-1])
        if job is not None:
            outcome[job.slide_id] = result
            bar.set_postfix_str(job.slide_id)
            bar.update(1)
    bar.close()
    return outcome


def run_jobs_ray(
    jobs: Sequence[SlideJob],
    is_complete: Callable[[SlideJob], bool],
    setup: Callable[..., Callable[[SlideJob], None]],
    args: Sequence[Any],
    *,
    plan: WorkerPlan,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    desc: str = "slides",
) -> BatchReport:
    """Like :func:`cscvision.slides.batch.run_batch`, with the function ``setup(*args)``
    returns run on Ray workers (:class:`JobWorker`). Needs a Ray connection
    (:func:`connect`). Lists in the report keep the jobs' order."""
    report = BatchReport()
    start = time.perf_counter()
    todo = []
    for job in jobs:
        if not overwrite and is_complete(job):
            report.skipped.append(job.slide_id)
        else:
            todo.append(job)
    if todo:
        plan = dataclasses.replace(plan, workers=min(plan.workers, len(todo)))
        spawn = actor_factory(setup, args, plan, device=device)
        actors = start_workers(spawn, plan.workers)
        try:
            outcome = dispatch(
                todo,
                actors,
                spawn=spawn,
                desc=desc,
                skipped=len(report.skipped),
                progress=progress,
            )
        finally:
            stop_workers(actors)
        for job in todo:
            reason = outcome[job.slide_id]
            if reason is None:
                report.done.append(job.slide_id)
            else:
                report.failed.append((job.slide_id, str(job.slide_path), reason))
    report.seconds = time.perf_counter() - start
    return report


def run_batch_ray(
    jobs: Sequence[SlideJob],
    model: LoadedModel,
    out_dir: Path,
    settings: InferSettings,
    is_complete: Callable[[SlideJob], bool],
    *,
    plan: WorkerPlan,
    model_info: dict[str, str],
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    desc: str = "infer",
) -> BatchReport:
    """:func:`run_jobs_ray` with :func:`~cscvision.inference.batch.infer_job` on each slide."""
    args = (model, str(out_dir), settings, model_info)
    return run_jobs_ray(jobs, is_complete, infer_setup, args, plan=plan, device=device,
                        overwrite=overwrite, progress=progress, desc=desc)  # fmt: skip

"""Flags shared by the commands that read slides, and the driver of their ``--ray`` batches.

The settings flags are generated from the settings records' fields
(:func:`add_settings_args`): help, default, choices and range come from one place
(:mod:`cscvision.slides.settings`), so ``tile``, ``infer`` and ``features`` declare each
shared flag once and the Python API takes the same defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import Field

from cscvision.core.io import check_writable, write_csv
from cscvision.core.validate import FlagError, Flags, check_flags
from cscvision.slides.batch import (
    BatchReport,
    SlideJob,
    collect_inputs,
    make_jobs,
    parse_shard,
    shard_jobs,
)
from cscvision.slides.info import MPP_RANGE
from cscvision.slides.settings import Fraction, MaskMpp, Mpp, TilePx
from cscvision.slides.slide import load_mpp_overrides

S = TypeVar("S")


def _fields(schema: type) -> dict[str, Any]:
    return getattr(schema, "model_fields", None) or schema.__pydantic_fields__


def _value_type(annotation: Any) -> Any:
    """``int`` of ``int | None``; the type argparse converts a flag's word with."""
    if get_origin(annotation) in (Union, getattr(__import__("types"), "UnionType", Union)):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    return annotation


def add_settings_args(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    schema: type,
    names: Sequence[str],
    *,
    group: str | None = None,
) -> None:
    """One flag per field ``names`` of ``schema`` (a settings record or a flag schema):
    ``min_tissue`` is ``--min-tissue``, its help the field's description, its default and
    choices the field's; a bool field defaulting to true is ``--no-<name>``. ``group`` (or
    the field's own) names its section of ``--help``."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name in names:
        info = _fields(schema)[name]
        extra = info.json_schema_extra or {}
        section = group or extra.get("group")
        target = parser
        if section and isinstance(parser, argparse.ArgumentParser):
            if section not in groups:
                found = [g for g in parser._action_groups if g.title == section]
                groups[section] = found[0] if found else parser.add_argument_group(section)
            target = groups[section]
        flag = "--" + name.replace("_", "-")
        kind = _value_type(info.annotation)
        kw: dict[str, Any] = {"dest": name, "default": info.default, "help": info.description}
        if kind is bool:
            flag = f"--no-{name.replace('_', '-')}" if info.default else flag
            target.add_argument(flag, action="store_false" if info.default else "store_true",
                                **kw)  # fmt: skip
            continue
        if get_origin(kind) is Literal or "choices" in extra:
            kw["choices"] = extra.get("choices") or get_args(kind)
        else:
            kw["type"] = kind
        if "metavar" in extra:
            kw["metavar"] = extra["metavar"]
        target.add_argument(flag, **kw)


def settings_from_args(schema: type[S], args: argparse.Namespace) -> S:
    """``schema`` made from the flags :func:`add_settings_args` added (the other fields keep
    their defaults), checked once: a :class:`FlagError` names the flag and its range."""
    given = {n: getattr(args, n) for n in _fields(schema) if hasattr(args, n)}
    return check_flags(schema, **given)


class ThreadFlags(Flags):
    """``--threads`` of the commands that run a model (the process's torch threads, set at
    the entry point, never by the library)."""

    threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="torch CPU threads for the model (default: torch's choice); on a shared or "
        "busy machine fewer threads can be much faster",
    )


def add_slide_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "slides",
        nargs="+",
        metavar="SLIDE_OR_DIR",
        help="slide files, folders of slides, or CSV manifests (column slide_path, optional "
        "slide_id); a file name starting with '-' goes after '--' or as ./-name",
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="output folder (one subfolder per slide)"
    )
    parser.add_argument(
        "--slide-mpp",
        type=float,
        default=None,
        metavar="UM_PER_PX",
        help="level-0 µm/px for slides whose metadata and TIFF tags give none "
        "(a slide that states its own µm/px keeps it, with a warning if they differ)",
    )
    parser.add_argument(
        "--mpp-override",
        type=Path,
        default=None,
        metavar="CSV",
        help="CSV with columns slide,mpp giving level-0 µm/px per slide file name, "
        "for slides whose metadata gives none",
    )
    parser.add_argument(
        "--shard",
        default=None,
        metavar="i/N",
        help="process only shard i of N (0 ≤ i < N), e.g. $SLURM_ARRAY_TASK_ID/N",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="redo slides whose outputs are complete"
    )


def check_decode(decode: str, device_type: str) -> None:
    """``--decode gpu`` needs the model on a CUDA device: :class:`FlagError` naming the flag."""
    if decode == "gpu" and device_type != "cuda":
        raise FlagError(
            f"--decode gpu needs a CUDA device (the model runs on {device_type}); "
            "use --decode cpu or auto"
        )


def jobs_from_args(args: argparse.Namespace) -> tuple[list[SlideJob], tuple[int, int] | None]:
    overrides = load_mpp_overrides(args.mpp_override) if args.mpp_override else None
    jobs = make_jobs(collect_inputs(args.slides), overrides, args.slide_mpp)
    shard = parse_shard(args.shard) if args.shard else None
    if shard is not None:
        jobs = shard_jobs(jobs, *shard)
    return jobs, shard


def add_hardening_args(parser: argparse.ArgumentParser) -> None:
    """Flags for batches that share ``--out`` with other runs (SLURM shards, a second job)."""
    parser.add_argument(
        "--wait",
        action="store_true",
        help="wait for slides another run on the same --out is processing (default: skip "
        "them and report them as busy)",
    )


class BatchFlags(Flags):
    """The flags every slide batch shares (``--slide-mpp``), checked before any slide is read."""

    slide_mpp: float | None = Field(None, ge=MPP_RANGE[0], le=MPP_RANGE[1])


def check_batch_args(args: argparse.Namespace) -> None:
    """Validate the shared flags and probe-write ``--out``; :class:`FlagError` naming the flag."""
    check_flags(BatchFlags, slide_mpp=args.slide_mpp)
    check_writable(args.out)


def corrupt_tiles_line(out: Path, slide_ids: Iterable[str], record: str) -> str | None:
    """One line naming the slides whose ``record`` (``summary.json``, ``tiles.json``) lists
    tiles skipped as corrupt; None when none were."""
    counts = {}
    for slide_id in slide_ids:
        try:
            count = json.loads((out / slide_id / record).read_text())["corrupt_tiles"]["count"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if count:
            counts[slide_id] = count
    if not counts:
        return None
    each = ", ".join(f"{sid} {n}" for sid, n in counts.items())
    return (
        f"corrupt tiles skipped: {sum(counts.values())} in {len(counts)} slide(s) ({each}); "
        f"their level-0 x, y are in OUT/<slide_id>/{record} (corrupt_tiles)"
    )


def add_ray_args(p: argparse.ArgumentParser, *, holds: str = "the model") -> None:
    """``--ray [ADDRESS]``, ``--ray-workers``, ``--ray-cpus`` (``infer``, ``features``)."""
    g = p.add_argument_group(
        'Ray cluster (optional extra: pip install "cscvision[ray]")',
        f"Slides are spread over Ray workers, each holding {holds} once. On a cluster, "
        "--out and the slides must be on a filesystem every node sees at the same path "
        "(workers write their slides' outputs under OUT themselves); the driver skips "
        "complete slides and writes results.csv and errors.csv.",
    )
    g.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="run on Ray: no ADDRESS (or local) starts Ray on this machine; 'auto' joins "
        "the cluster of this node; ray://HEAD:10001 (Ray Client) or HEAD:6379 joins that one. "
        "Put a bare --ray after the slides (else it takes the next word as ADDRESS)",
    )
    g.add_argument(
        "--ray-workers",
        type=int,
        default=None,
        metavar="N",
        help="Ray workers (default: one per GPU of the cluster, else cluster CPUs / --ray-cpus)",
    )
    g.add_argument(
        "--ray-cpus",
        type=int,
        default=1,
        metavar="N",
        help="CPUs each worker reserves and gives the model as threads (default 1); "
        "--workers reader threads come on top",
    )


class RayFlags(Flags):
    """The ``--ray-*`` counts, checked before any slide is read."""

    ray_workers: int | None = Field(None, ge=1)
    ray_cpus: int = Field(1, ge=1)


def run_on_ray(
    args: argparse.Namespace,
    jobs: list[SlideJob],
    is_complete: Callable[[SlideJob], bool],
    setup: Callable[..., Callable[[SlideJob], None]],
    setup_args: Sequence[Any],
    *,
    command: str,
) -> BatchReport | None:
    """The batch on Ray workers running ``setup(*setup_args)``
    (:func:`cscvision.inference.distributed.run_jobs_ray`); None, after saying why on
    stderr, when it cannot start."""
    from cscvision.inference import distributed

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report, no network
    try:
        distributed.import_ray()
        owned = distributed.connect(args.ray)
    except (distributed.RayUnavailable, distributed.DistributedError) as e:
        print(f"cscvision {command}: {e}", file=sys.stderr)
        return None
    try:
        import ray

        plan = distributed.plan_workers(
            ray.cluster_resources(),
            device=args.device,
            workers=args.ray_workers,
            cpus_per_worker=args.ray_cpus,
        )
        print(f"{command}: {plan.describe()} on {args.ray}", file=sys.stderr)
        return distributed.run_jobs_ray(
            jobs,
            is_complete,
            setup,
            setup_args,
            plan=plan,
            device=args.device,
            overwrite=args.overwrite,
            desc=command,
        )
    except (distributed.DistributedError, ValueError) as e:
        print(f"cscvision {command}: {e}", file=sys.stderr)
        return None
    finally:
        if owned:
            distributed.disconnect()


class LabelFlags(Flags):
    """The grid and slide flags of the ``labels`` commands, with the ranges ``tile``,
    ``infer`` and ``features`` use (:mod:`cscvision.slides.settings`), checked before the
    manifest is read or anything is written (:func:`check_label_flags`)."""

    mpp: Mpp | None = None
    tile_px: TilePx | None = None
    min_tissue: Fraction | None = None
    mask_mpp: MaskMpp | None = None
    slide_mpp: Mpp | None = None
    mif_mpp: Mpp | None = None
    expand_um: float | None = Field(None, ge=0, le=100)
    threshold: float | None = None  # any finite number


def check_label_flags(args: argparse.Namespace) -> None:
    """:class:`LabelFlags` of the flags ``args`` has; :class:`FlagError` naming the flag."""
    names = LabelFlags.model_fields
    check_flags(LabelFlags, **{n: getattr(args, n) for n in names if hasattr(args, n)})


def measure_then_write(
    command: str,
    measure: Callable[[], tuple[Any, int | None]],
    write: Callable[[Any], int],
    *,
    unwritten: str,
) -> int:
    """The two phases of a ``labels`` command whose tables share cohort-wide thresholds or
    quantiles: ``measure()`` (a :func:`~cscvision.core.batch.run_items` loop; what it found
    and the signal that stopped it, or None), then ``write(found)``, which finishes once
    begun (all tables, or none). SIGTERM/SIGINT at any point, between the phases too, ends
    in one notice (``unwritten``, or that every table was written) and 128 + the signal."""
    from cscvision.core.guard import (
        Interrupted,
        defer_signals,
        interrupt_on_signals,
        interrupted_notice,
    )

    written = False
    try:
        with interrupt_on_signals():
            found, signum = measure()
            if signum is not None:
                raise Interrupted(signum)
            with defer_signals():
                written = True
                status = write(found)
    except Interrupted as e:
        done = "every table written" if written else unwritten
        print(interrupted_notice(command, e.signum, done), file=sys.stderr)
        return 128 + e.signum
    return status


LABEL_COHORT_HEADER = ("slide_id", "patient_id", "slide_path", "label_path", "split")


def label_cohort_row(entry: Any, label_path: Path, out: Path) -> tuple[str, ...]:
    """A ``cohort.csv`` row of a labelled slide (a ``CohortEntry``), its paths relative to
    ``out`` so the label folder can move whole."""
    return (entry.slide_id, entry.patient_id, _relative(entry.slide_path, out),
            _relative(label_path, out), entry.split or "")  # fmt: skip


def write_label_cohort(
    out: Path, rows: Iterable[Sequence[str]], errors: Iterable[Sequence[str]]
) -> tuple[Path, Path]:
    """``out/cohort.csv`` (for ``cscvision train``) and ``out/errors.csv`` of a labels run."""
    cohort = write_csv(out / "cohort.csv", LABEL_COHORT_HEADER, rows)
    return cohort, write_csv(out / "errors.csv", ("slide_id", "reason"), errors)


def print_not_labelled(errors: Iterable[Sequence[str]]) -> None:
    for slide_id, reason in errors:
        print(f"  not labelled: {slide_id}: {reason}", file=sys.stderr)


def _relative(path: str | Path, folder: Path) -> str:
    return os.path.relpath(Path(path).resolve(), folder.resolve())

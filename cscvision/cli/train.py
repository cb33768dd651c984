"""``cscvision train``: train a tile model from a YAML config plus overrides, then export it."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

HELP = """\
Train a tile classifier on a cohort (cohort CSV + annotations), validate, test on held-out
patients, and export the model.

Configuration: --config FILE or the name of a packaged config (cscvision config list;
`cscvision config show default` documents every key), then overrides, either as
positional KEY=VALUE or after --set, values parsed as YAML:
  cscvision train --config cpu_demo trainer.max_epochs=3 data.batch_size=32
  cscvision train --config default --set model.backbone=resnet34 cohort.csv=c.csv
  cscvision train --config my_config.yaml cohort.csv=c.csv

The run folder (runs/<name>/ or --run-dir) receives config.yaml, versions.json,
splits.csv, logs/ (CSV + TensorBoard), checkpoints/ (last.ckpt + best) and metrics.json.
A run folder that holds checkpoints/last.ckpt resumes from it unless --no-resume.
The best checkpoint is exported to models/<name>/ (or --export): model.safetensors,
model.json (targets, thresholds chosen on validation, tile px, µm/px, normalisation,
metrics) and README.md, the human model card.

kind: mil (0.1.0: task: mil) trains a slide-level model instead: bags of an encoder's tile
features (model.encoder, model.weights) against a slide-label table (mil.labels, mil.targets),
cross-validated over patients (cv.folds; runs/<name>/cv/), then exported with the
pooled CV metrics on its card; cscvision infer writes its slide predictions to results.csv.
"""


class _IntermixedParser(argparse.ArgumentParser):
    """Lets positional KEY=VALUE overrides sit anywhere among the options."""

    _inside = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._inside:  # parse_known_intermixed_args calls back here (Python ≤ 3.12)
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return super().parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a tile model on annotated slides and export it",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE_OR_NAME",
        help="YAML config file, or a packaged config name (default, cpu_demo, gpu, ...)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (dotted keys)"
    )
    parser.add_argument(
        "--set",
        dest="set_overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="more config overrides (same as positional ones)",
    )
    parser.add_argument("--run-dir", type=Path, default=None, help="run folder (run_dir)")
    parser.add_argument("--export", type=Path, default=None, help="model folder (export_dir)")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume", action="store_true", default=None, help="require resuming from last.ckpt"
    )
    resume.add_argument(
        "--no-resume", dest="resume", action="store_false", help="start afresh in the run folder"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)
    parser.__class__ = _IntermixedParser


def run(args: argparse.Namespace) -> int:
    import yaml

    from cscvision.training.config import config_to_dict, load_config

    overrides = list(args.overrides) + list(args.set_overrides)
    if args.run_dir is not None:
        overrides.append(f"run_dir={args.run_dir}")
    if args.export is not None:
        overrides.append(f"export_dir={args.export}")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True), end="")
        return 0
    _log_to_stderr()
    if cfg.threads:  # torch CPU threads of this process (the library never sets them)
        import torch

        torch.set_num_threads(cfg.threads)
    return _train(cfg, args)


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a message comes."""

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def _log_to_stderr() -> None:
    """The package's INFO messages on stderr: one handler, however often ``train`` runs
    in this process (it used to add one per call)."""
    package_log = logging.getLogger("cscvision")
    package_log.setLevel(logging.INFO)
    if not any(isinstance(h, _Stderr) for h in package_log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        package_log.addHandler(handler)


def _train(cfg: object, args: argparse.Namespace) -> int:
    from cscvision.core.guard import Interrupted, interrupt_on_signals
    from cscvision.training.train import train

    try:  # errors: exit 2 (cli.run_command)
        with interrupt_on_signals():
            result = train(cfg, resume=args.resume, progress=not args.quiet)
    except Interrupted as e:
        print(_stopped(cfg, e.signum), file=sys.stderr)
        return 128 + e.signum
    except SystemExit as e:  # Lightning's SIGTERMException, should it stop the fit itself
        if type(e).__name__ != "SIGTERMException":
            raise
        print(_stopped(cfg, signal.SIGTERM), file=sys.stderr)
        return 128 + signal.SIGTERM
    if result.model_dir is not None:  # under DDP only rank 0 exports, and reports
        print(_summary(result))
    return 0


def _stopped(cfg: object, signum: int) -> str:
    """The notice of a run stopped by a signal: nothing exported, and how it resumes."""
    from cscvision.core.guard import interrupted_notice

    run_dir = getattr(cfg, "run_dir", None) or "the run folder"
    return interrupted_notice(
        "train",
        signum,
        f"no model exported; checkpoints in {run_dir}/checkpoints (last.ckpt, if an epoch "
        "finished)",
    )


def _summary(result: object) -> str:
    lines = [f"run folder: {result.run_dir}"]
    if result.metrics.get("cv"):
        lines.append(f"cross-validation: {result.best_checkpoint} (cv_metrics.json, "
                     "predictions.csv, tiles/)")  # fmt: skip
    else:
        lines.append(f"best checkpoint: {result.best_checkpoint}")
    if result.model_dir is not None:
        lines.append(f"model: {result.model_dir} (model.safetensors, model.json, README.md)")
    for split, counts in result.summary.items():
        lines.append(
            f"{split}: {counts['slides']} slides, {counts['patients']} patients, "
            f"{counts['tiles']} tiles"
        )
    for name, rec in result.metrics.get("cv", {}).get("pooled", {}).items():
        lo, hi = rec["ci95"]
        lines.append(f"pooled CV {name}: {rec['value']:.3f} (95 % CI {lo:.3f} to {hi:.3f})")
    for stage in ("val", "test"):
        metrics = result.metrics.get(stage, {})
        parts = [
            f"{t} AUROC {metrics[f'auroc_{t}']:.3f}"
            for t in result.thresholds
            if f"auroc_{t}" in metrics
        ]
        if parts:
            lines.append(f"{stage}: " + ", ".join(parts))
    return "\n".join(lines)

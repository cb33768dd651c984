"""Each shared flag declared once: the same defaults in the CLI and the Python API, the
same ranges in every command, one wrapper turning errors into the exit statuses."""

from __future__ import annotations

import dataclasses
import inspect
import signal

import pytest

from cscvision.cli import build_parser, main, run_command
from cscvision.core.errors import CscvisionError
from cscvision.core.guard import Interrupted
from cscvision.features.settings import ExtractSettings
from cscvision.inference.predict import predict_slide
from cscvision.inference.settings import InferSettings
from cscvision.slides.settings import ReadSettings


def _flags(command: str) -> dict[str, object]:
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    return {a.dest: a.default for a in parser._actions if a.option_strings}


@pytest.mark.parametrize(
    ("command", "record"),
    [("infer", InferSettings), ("features", ExtractSettings), ("tile", ReadSettings)],
)
def test_every_shared_flag_has_the_api_default(command, record):
    flags = _flags(command)
    api = dataclasses.asdict(record())  # what the Python API takes when given nothing
    shared = set(flags) & set(api)
    assert {"min_tissue", "mask_mpp", "overlap"} & shared and len(shared) >= 4
    assert {k: flags[k] for k in shared} == {k: api[k] for k in shared}


def test_the_api_takes_the_cli_defaults():
    """0.1.0: --workers 2 in the CLI and 0 in predict_slide, --device auto and cpu."""
    infer = _flags("infer")
    assert InferSettings().workers == infer["workers"] == 2
    assert InferSettings().device == infer["device"] == "auto"
    params = inspect.signature(predict_slide).parameters
    assert params["settings"].default is None  # None: InferSettings(), the flags' defaults
    assert not {"workers", "device", "batch_size", "min_tissue"} & set(params)


@pytest.mark.parametrize("command", ["infer", "features"])
@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--mask-mpp", "0.01", "--mask-mpp 0.01: input should be greater than or equal to 1"),
        ("--min-tissue", "1.5", "--min-tissue 1.5: input should be less than or equal to 1"),
        ("--workers", "-1", "--workers -1: input should be greater than or equal to 0"),
        ("--threads", "0", "--threads 0: input should be greater than or equal to 1"),
    ],
)
def test_infer_and_features_refuse_the_same_values(command, flag, value, message, tmp_path,
                                                   capsys):  # fmt: skip
    model = ["--model", "demo"] if command == "infer" else ["--encoder", "demo-cnn"]
    out = tmp_path / "out"
    args = [command, str(tmp_path / "missing.tiff"), "--out", str(out), *model, flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"cscvision {command}: {message} (allowed: " + err.split("(allowed: ")[1]
    assert not out.exists()  # refused before anything is written


def test_tile_refuses_them_too(tmp_path, capsys):
    assert main(["tile", "x.tiff", "--out", str(tmp_path / "o"), "--mask-mpp", "0.01"]) == 2
    assert "--mask-mpp 0.01: input should be greater than or equal to 1" in capsys.readouterr().err


def _ending(error: BaseException):
    def func(_args):
        raise error

    return func


@pytest.mark.parametrize(
    ("error", "status", "said"),
    [
        (CscvisionError("x.csv: no column slide_path; add it"), 2, "x.csv: no column slide_path"),
        (FileNotFoundError(2, "No such file or directory", "a.csv"), 2, "a.csv"),
        (Interrupted(signal.SIGTERM), 143, "stopped by SIGTERM"),
        (Interrupted(signal.SIGINT), 130, "stopped by SIGINT"),
        (KeyboardInterrupt(), 130, "interrupted"),
    ],
)
def test_one_wrapper_maps_errors_to_exit_statuses(error, status, said, capsys):
    args = build_parser().parse_args(["labels", "st", "m.csv", "--out", "o"])
    args.func = _ending(error)
    assert run_command(args) == status
    err = capsys.readouterr().err
    assert err.startswith("cscvision labels st: ") and said in err and err.count("\n") == 1


def test_a_bug_keeps_its_traceback():
    args = build_parser().parse_args(["config", "list"])
    args.func = _ending(ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError):
        run_command(args)

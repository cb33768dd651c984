"""Every exception class the package defines derives from the one root, CscvisionError."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import cscvision
from cscvision.core.errors import CscvisionError
from cscvision.core.guard import Interrupted

# Optional stacks whose modules cannot import without their extra.
OPTIONAL = ("cscvision.inference.distributed",)


def _package_exceptions() -> list[type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(cscvision.__path__, "cscvision."):
        if info.name.endswith("__main__"):
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError:
            if info.name.startswith(OPTIONAL):
                continue
            raise
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith("cscvision."):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return list(found.values())


def test_every_exception_derives_from_the_root() -> None:
    classes = _package_exceptions()
    assert len(classes) >= 30  # the walk found the package's errors, not nothing
    strays = [
        c.__qualname__
        for c in classes
        if c is not Interrupted and not issubclass(c, CscvisionError)
    ]
    assert strays == []


def test_interrupted_stays_outside_except_exception() -> None:
    assert not issubclass(Interrupted, Exception)


def test_old_builtin_bases_still_catch() -> None:
    from cscvision.labels.table import LabelTableError
    from cscvision.training.train import TrainError

    assert issubclass(LabelTableError, ValueError)
    assert issubclass(TrainError, RuntimeError)


def test_a_signal_whose_exception_a_finalizer_swallowed_still_interrupts(tmp_path) -> None:
    # SIGTERM landing inside a finalizer: Python prints "Exception ignored" and goes on, so
    # a batch ran to its end and exited 0 (seen once in a fresh-clone run of `labels st`)
    import gc
    import os
    import signal

    from cscvision.core.batch import BatchItem, run_items
    from cscvision.core.guard import interrupt_on_signals

    class Dying:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(1000))  # the handler runs at a bytecode boundary here, inside __del__

    def lose_a_signal() -> None:
        obj = Dying()
        del obj
        gc.collect()

    went_on = False
    with pytest.raises(Interrupted) as stop, interrupt_on_signals():
        lose_a_signal()
        went_on = True  # a plain block: raised as it ends
    assert went_on and stop.value.signum == signal.SIGTERM
    # a batch stops at the next item and reports it, as for a signal that was not lost
    seen: list[str] = []

    def process(item: BatchItem) -> None:
        seen.append(item.slide_id)
        if item.slide_id == "a":
            lose_a_signal()

    items = [BatchItem(s, tmp_path / f"{s}.tif") for s in "abc"]
    report = run_items(items, process)
    assert seen == ["a"] and report.interrupted == signal.SIGTERM
    with interrupt_on_signals():  # nothing is left noted for the next block
        pass


def test_a_half_built_objects_finalizer_is_not_printed_as_a_crash_after_a_stop(monkeypatch):
    # SIGTERM cut a progress bar's __init__; its __del__ then raised AttributeError as the
    # interrupted frames were freed, and "Exception ignored ... Traceback" reached stderr
    import gc
    import os
    import signal
    import sys

    from cscvision.core.guard import interrupt_on_signals

    class HalfBuilt:
        def __init__(self, stop: bool) -> None:
            if stop:
                os.kill(os.getpid(), signal.SIGTERM)
                sum(range(1000))  # the handler raises here, before `ready` is set
            self.ready = True

        def __del__(self) -> None:
            self.ready  # noqa: B018  (AttributeError on a half-built one)

    printed: list = []
    monkeypatch.setattr(sys, "unraisablehook", printed.append)
    with pytest.raises(Interrupted), interrupt_on_signals():
        HalfBuilt(stop=True)
    gc.collect()
    assert printed == []
    with interrupt_on_signals():  # a new block: such a finalizer error is printed again
        obj = HalfBuilt(stop=False)
        del obj.ready
        del obj
        gc.collect()
    assert [type(i.exc_value) for i in printed] == [AttributeError]

"""``cscvision.core.batch.run_items``: the one per-item loop every batch command runs."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from cscvision.core.batch import BatchItem, merge_table, run_items
from cscvision.core.guard import item_lock
from cscvision.core.io import read_csv
from cscvision.core.names import UnsafeNameError


def _items(tmp_path: Path, *ids: str) -> list[BatchItem]:
    items = []
    for slide_id in ids:
        path = tmp_path / f"{slide_id}.tif"
        path.write_bytes(b"slide")
        items.append(BatchItem(slide_id, path, data=slide_id.upper()))
    return items


def test_each_item_is_done_skipped_failed_or_busy_and_results_keep_item_order(tmp_path):
    items = _items(tmp_path, "d", "a", "b", "c", "e")
    seen = []

    def process(item: BatchItem) -> str:
        seen.append(item.slide_id)
        if item.slide_id == "c":
            raise ValueError("boom")
        return item.data

    locks = tmp_path / "locks"
    with item_lock(locks / "e.lock"):  # as another run holding e
        report = run_items(items, process, is_complete=lambda i: i.slide_id == "b",
                           lock_of=lambda i: locks / f"{i.slide_id}.lock")  # fmt: skip
    assert seen == ["d", "a", "c"]
    assert report.done == ["d", "a"] and report.skipped == ["b"] and report.busy == ["e"]
    assert report.failed == [("c", str(tmp_path / "c.tif"), "ValueError: boom")]
    assert list(report.results.items()) == [("d", "D"), ("a", "A")]
    assert report.interrupted is None and report.in_progress is None
    again = run_items(items, process, is_complete=lambda i: True, overwrite=True)
    assert again.done == ["d", "a", "b", "e"]  # --overwrite redoes complete items


def test_an_error_the_command_does_not_record_stops_the_batch(tmp_path):
    items = _items(tmp_path, "a", "b", "c")

    def process(item: BatchItem) -> None:
        if item.slide_id == "b":
            raise KeyError("a bug, not a bad slide")

    with pytest.raises(KeyError):
        run_items(items, process, record=(ValueError, OSError))


def test_sigterm_ends_the_loop_with_what_finished(tmp_path):
    items = _items(tmp_path, "a", "b", "c")
    seen = []

    def process(item: BatchItem) -> str:
        seen.append(item.slide_id)
        if item.slide_id == "b":
            os.kill(os.getpid(), signal.SIGTERM)
        return item.data

    before = signal.getsignal(signal.SIGTERM)
    report = run_items(items, process)
    assert seen == ["a", "b"] and report.done == ["a"] and report.results == {"a": "A"}
    assert report.interrupted == signal.SIGTERM and report.in_progress == "b"
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back


def test_a_slide_file_that_goes_away_is_said_to_have_gone(tmp_path):
    items = _items(tmp_path, "a")

    def process(item: BatchItem) -> None:
        item.slide_path.unlink()
        raise OSError("Passing closed slide object")

    report = run_items(items, process)
    assert "the slide file went away while it was read" in report.failed[0][2]


@pytest.mark.parametrize(("ids", "message"), [(["../x"], "cannot name a file"),
                                              (["A", "a"], "differ only in case")])  # fmt: skip
def test_ids_that_are_not_names_are_refused_before_any_item_runs(tmp_path, ids, message):
    items = [BatchItem(i, tmp_path / "s.tif") for i in ids]
    with pytest.raises(UnsafeNameError, match=message):
        run_items(items, lambda i: pytest.fail("ran"))


def test_merge_table_keeps_other_ids_and_the_newest_row_of_each(tmp_path):
    path = tmp_path / "results.csv"
    merge_table(path, ["slide_id", "status"], [("a", "done"), ("b", "failed")])
    merge_table(path, ["slide_id", "status"], [("b", "done"), ("c", "done")], drop=["x"])
    rows = {r["slide_id"]: r["status"] for r in read_csv(path)}
    assert rows == {"a": "done", "b": "done", "c": "done"}


@pytest.mark.parametrize("when", ["measuring", "between", "writing"])
def test_a_labels_run_stopped_at_any_point_writes_all_tables_or_none(capsys, when):
    from cscvision.cli.common import measure_then_write

    written = []

    def measure() -> tuple[list, int | None]:
        if when == "measuring":  # as run_items reports a signal that stopped its loop
            return [], signal.SIGTERM
        if when == "between":  # after the loop, before the writing: no handler of its own
            os.kill(os.getpid(), signal.SIGTERM)
        return ["a", "b"], None

    def write(found: list) -> int:
        if when == "writing":
            os.kill(os.getpid(), signal.SIGINT)  # acted on once every table is written
        written.extend(found)
        return 0

    status = measure_then_write("labels x", measure, write, unwritten="no table written")
    err = capsys.readouterr().err
    if when == "writing":
        assert status == 130 and written == ["a", "b"] and "every table written" in err
    else:
        assert status == 143 and not written and "no table written" in err
    assert "cscvision labels x: stopped by" in err

"""Next-slide prefetch: while the model scores one slide, the next is made ready.

In a batch the device would otherwise idle between slides while the outputs of one are
written and the next is opened, its tissue mask computed and its first batches read.
:class:`NextSlide` does that preparation (:func:`~cscvision.inference.predict.prepare_slide`)
for the next pending slide in one background thread, so scoring can start at once.
``scripts/bench_prefetch.py`` measures the gap with and without it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from cscvision.inference.predict import PreparedSlide
from cscvision.slides.batch import SlideJob


class NextSlide:
    """Prepares, one at a time and one ahead, the jobs of ``jobs`` that ``pending`` accepts.

    :meth:`take` returns the prepared slide of a job (waiting for it if need be; a failed
    preparation raises here, for that job) and starts on the next pending job. Use as a
    context manager: leaving it waits for the background thread.
    """

    def __init__(
        self,
        jobs: Sequence[SlideJob],
        prepare: Callable[[SlideJob], PreparedSlide],
        pending: Callable[[SlideJob], bool] = lambda job: True,
    ) -> None:
        self.jobs = list(jobs)
        self.prepare = prepare
        self.pending = pending
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="next-slide")
        self._ahead: dict[str, Future] = {}

    def __enter__(self) -> NextSlide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for future in self._ahead.values():
            future.cancel()
        self._pool.shutdown(wait=True)
        for future in self._ahead.values():  # prepared but never taken: close its reader
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().batches.close()
        self._ahead.clear()

    def take(self, job: SlideJob) -> PreparedSlide:
        """``job`` prepared (here, or ahead in the background), the next one started."""
        future = self._ahead.pop(job.slide_id, None)
        self._start_after(job)
        if future is None:
            return self.prepare(job)
        return future.result()

    def _start_after(self, job: SlideJob) -> None:
        ids = [j.slide_id for j in self.jobs]
        if job.slide_id not in ids:
            return
        for later in self.jobs[ids.index(job.slide_id) + 1 :]:
            if self.pending(later):
                if later.slide_id not in self._ahead:
                    self._ahead[later.slide_id] = self._pool.submit(self.prepare, later)
                return

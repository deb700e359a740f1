"""The one helper through which widgets run slow core generators.

A core ``iter_x(...)`` generator yields :class:`~napari_openseg.core.progress.Progress` records and
returns its result. :func:`run_in_background` runs it in a napari worker thread, mirrors the records
in a napari progress bar, and calls back on the main thread (the only thread that touches layers).
``handle.cancel()`` stops the generator at its next yield; nothing is returned then.

Setting ``OPENSEG_INLINE_WORKERS=1`` runs the generator in the calling thread instead (for tests and
scripts); callbacks and cancellation behave the same.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Generator
from typing import Any

from napari.utils import progress as napari_progress
from napari.utils.notifications import show_error, show_info

from ..core.progress import Progress
from ..errors import OpenSegError

log = logging.getLogger(__name__)

INLINE_ENV = "OPENSEG_INLINE_WORKERS"


def run_inline() -> bool:
    return os.environ.get(INLINE_ENV, "").lower() in ("1", "true", "yes")


class WorkHandle:
    """A running (or finished) piece of background work."""

    def __init__(self, description: str):
        self.description = description
        self.cancelled = False
        self.finished = False
        self.worker = None  # the napari GeneratorWorker, when threaded
        self._bar = None

    def cancel(self) -> None:
        """Stop at the next progress record; ``on_done`` will not be called."""
        self.cancelled = True
        if self.worker is not None and not self.finished:
            self.worker.quit()

    @property
    def running(self) -> bool:
        return not self.finished

    def _show(self, step: Progress) -> None:
        if self._bar is None:
            self._bar = napari_progress(total=step.total, desc=self.description)
        if self._bar.total != step.total:
            self._bar.total = step.total
        self._bar.n = step.done
        if step.stage:
            self._bar.set_description(f"{self.description}: {step.stage}")
        self._bar.refresh()

    def _close(self) -> None:
        self.finished = True
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def report_error(err: BaseException, what: str) -> None:
    """A user's mistake gets its message; anything else gets a short notice and a log entry."""
    if isinstance(err, OpenSegError):
        show_error(f"{what}: {err}")
    else:
        log.exception("%s failed", what, exc_info=err)
        show_error(f"{what} failed unexpectedly ({type(err).__name__}: {err}); see the log for details")


def run_in_background(
    generator: Generator[Progress, None, Any] | Callable[[], Generator[Progress, None, Any]],
    description: str,
    on_done: Callable[[Any], None],
    on_progress: Callable[[Progress], None] | None = None,
    on_finished: Callable[[], None] | None = None,
) -> WorkHandle:
    """Run ``generator`` (or a zero-argument function making one) off the main thread.

    ``on_progress(step)`` and ``on_done(result)`` run on the main thread; ``on_finished()`` runs
    after success, error or cancellation alike (re-enable buttons there). Errors are shown as
    napari notifications.
    """
    handle = WorkHandle(description)

    def progress(step: Progress) -> None:
        handle._show(step)
        if on_progress is not None:
            on_progress(step)

    def finish() -> None:
        handle._close()
        if handle.cancelled:
            show_info(f"{description}: cancelled; nothing was changed")
        if on_finished is not None:
            on_finished()

    if run_inline():
        _run_inline(handle, generator, progress, on_done, finish, description)
        return handle

    from napari.qt.threading import create_worker

    def body():
        gen = generator() if callable(generator) and not hasattr(generator, "send") else generator
        result = yield from gen
        return result

    worker = create_worker(body, _start_thread=False)
    handle.worker = worker
    worker.yielded.connect(progress)
    worker.returned.connect(lambda result: None if handle.cancelled else on_done(result))
    worker.errored.connect(lambda err: report_error(err, description))
    worker.finished.connect(finish)
    worker.start()
    return handle


def _run_inline(handle, generator, progress, on_done, finish, description) -> None:
    gen = generator() if callable(generator) and not hasattr(generator, "send") else generator
    try:
        while True:
            if handle.cancelled:
                gen.close()
                break
            try:
                step = next(gen)
            except StopIteration as stop:
                on_done(stop.value)
                break
            progress(step)
    except Exception as err:  # shown to the user exactly like a worker's error
        report_error(err, description)
    finally:
        finish()

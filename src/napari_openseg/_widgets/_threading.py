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

from napari_openseg.core.progress import Progress
from napari_openseg.errors import OpenSegError

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
        self.pooled = False  # counted in the jobs of Qt's thread pool
        self._bar = None
        self._showing = False
        self._stage = ""

    def cancel(self) -> None:
        """Stop at the next progress record; ``on_done`` will not be called."""
        self.cancelled = True
        if self.worker is not None and not self.finished:
            self.worker.quit()

    @property
    def running(self) -> bool:
        return not self.finished

    def _show(self, step: Progress) -> None:
        # Updating napari's progress bar processes pending Qt events, so the next steps and even
        # ``finish`` may run inside this method: nested calls return at once (the bar is cosmetic;
        # the next step updates it) and a bar is never made or kept after the end.
        if self._showing or self.finished:
            return
        self._showing = True
        try:
            bar = self._bar
            if bar is None:
                bar = napari_progress(total=step.total, desc=self.description)
                if self.finished:  # ended while the bar was being made
                    bar.close()
                    return
                self._bar = bar
            if bar.total != step.total:
                bar.total = step.total
            if step.stage and step.stage != self._stage and not self.finished:
                self._stage = step.stage  # each description change repaints the window: only on change
                bar.set_description(f"{self.description}: {step.stage}")
            if step.done != bar.n and not self.finished:
                bar.update(step.done - bar.n)  # update() (not n=) is what moves napari's Qt bar
        finally:
            self._showing = False

    def _close(self) -> None:
        self.finished = True
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class _Failure:
    """An exception raised by the work, carried out of the worker as its return value.

    Letting it propagate would make napari's worker show a second, raw notification with a
    traceback, and superqt's worker drops ``RuntimeError`` (torch's usual error type) without
    emitting ``errored`` or ``finished`` at all, which would leave a widget busy forever.
    """

    def __init__(self, error: Exception):
        self.error = error


def report_error(err: BaseException, what: str) -> str:
    """A user's mistake gets its message; anything else gets a short notice and a log entry.
    Returns the text shown."""
    if isinstance(err, OpenSegError):
        text = f"{what}: {err}"
    else:
        log.exception("%s failed", what, exc_info=err)
        text = f"{what} failed unexpectedly ({type(err).__name__}: {err}); see the log for details"
    show_error(text)
    return text


def run_in_background(
    generator: Generator[Progress, None, Any] | Callable[[], Generator[Progress, None, Any]],
    description: str,
    on_done: Callable[[Any], None],
    on_progress: Callable[[Progress], None] | None = None,
    on_finished: Callable[[], None] | None = None,
    on_error: Callable[[str], None] | None = None,
    on_start: Callable[[WorkHandle], None] | None = None,
) -> WorkHandle:
    """Run ``generator`` (or a zero-argument function making one) off the main thread.

    ``on_progress(step)`` and ``on_done(result)`` run on the main thread; ``on_finished()`` runs
    after success, error or cancellation alike (re-enable buttons there). Errors are shown as
    napari notifications; ``on_error(text)`` then gets the text shown. ``on_start(handle)`` gets the
    handle before any work is done (an inline run ends before this function returns).
    """
    handle = WorkHandle(description)
    if on_start is not None:
        on_start(handle)

    def failed(err: BaseException) -> None:
        text = report_error(err, description)
        if on_error is not None:
            _unless_closed(on_error, text)

    def progress(step: Progress) -> None:
        if handle.finished or handle.cancelled:  # a step that was queued before Cancel or the end
            return
        if on_progress is not None:
            _unless_closed(on_progress, step)
        # last: napari's bar processes pending Qt events when it updates, which can run the next
        # signals (more steps, the result, the end) before this call returns
        handle._show(step)

    def finish() -> None:
        global _RUNNING
        if handle.pooled:
            _RUNNING -= 1
        handle._close()
        if handle.cancelled:
            show_info(f"{description}: cancelled; nothing was changed")
        if on_finished is not None:
            _unless_closed(on_finished)

    if run_inline():
        _run_inline(handle, generator, progress, on_done, finish, failed)
        return handle

    from napari.qt.threading import create_worker

    def body():
        try:
            gen = generator() if callable(generator) and not hasattr(generator, "send") else generator
            result = yield from gen
        except Exception as err:  # reported on the main thread, see _Failure
            return _Failure(err)
        return result

    def returned(result) -> None:
        if isinstance(result, _Failure):
            failed(result.error)
        elif not handle.cancelled:
            _unless_closed(on_done, result)

    worker = create_worker(body, _start_thread=False)
    handle.worker = worker
    worker.yielded.connect(progress)
    worker.returned.connect(returned)
    worker.errored.connect(failed)
    worker.finished.connect(finish)
    _make_room_in_the_pool()
    handle.pooled = True
    worker.start()
    return handle


#: Jobs of this module running in Qt's global thread pool.
_RUNNING = 0
#: Pool threads kept free for Qt itself: napari's progress bar animates through Qt's image code,
#: which waits on pool tasks; with every pool thread held by a job that waits for the GIL the main
#: thread holds, the window froze for good (two jobs on a 2-core machine were enough).
QT_RESERVE = 2


def _make_room_in_the_pool() -> None:
    global _RUNNING
    from qtpy.QtCore import QThreadPool

    _RUNNING += 1
    pool = QThreadPool.globalInstance()
    if pool.maxThreadCount() < _RUNNING + QT_RESERVE:
        pool.setMaxThreadCount(_RUNNING + QT_RESERVE)


def _unless_closed(callback, *args) -> None:
    """Run a widget's callback, unless the widget was deleted meanwhile (the viewer was closed)."""
    try:
        callback(*args)
    except RuntimeError as err:
        if "has been deleted" not in str(err):
            raise
        log.debug("a callback's widget is gone: %s", err)


def _run_inline(handle, generator, progress, on_done, finish, failed) -> None:
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
        failed(err)
    finally:
        finish()

"""The one threading helper: threaded and inline modes, errors, cancellation."""

from __future__ import annotations

import threading

import pytest

from napari_openseg._widgets import _threading
from napari_openseg._widgets._threading import run_in_background
from napari_openseg.core.progress import Progress
from napari_openseg.errors import OpenSegError

pytestmark = pytest.mark.qt


def counting(n: int, gate: threading.Event | None = None, fail: BaseException | None = None):
    for i in range(n):
        if gate is not None:
            gate.wait(5)
        yield Progress(i + 1, n, "counting", {"thread": threading.get_ident()})
        if fail is not None and i == 1:
            raise fail
    return n * 10


@pytest.fixture
def errors(monkeypatch):
    shown = []
    monkeypatch.setattr(_threading, "show_error", shown.append)
    return shown


@pytest.fixture(params=["threaded", "inline"])
def mode(request, monkeypatch):
    monkeypatch.setenv(_threading.INLINE_ENV, "1" if request.param == "inline" else "0")
    return request.param


def test_runs_to_the_end_and_reports_progress(qtbot, mode):
    seen, done, finished = [], [], []
    handle = run_in_background(
        lambda: counting(3),
        "count",
        on_done=done.append,
        on_progress=seen.append,
        on_finished=lambda: finished.append(True),
    )
    qtbot.waitUntil(lambda: bool(finished), timeout=10_000)
    assert done == [30]
    assert [step.done for step in seen] == [1, 2, 3]
    assert not handle.running and not handle.cancelled
    main = threading.get_ident()
    assert all((step.payload["thread"] == main) == (mode == "inline") for step in seen)


@pytest.mark.parametrize(
    "failure", [OpenSegError("paint something first"), RuntimeError("CUDA out of memory")]
)
def test_errors_become_notifications(qtbot, mode, errors, failure):
    done, finished = [], []
    run_in_background(
        counting(5, fail=failure), "count", on_done=done.append, on_finished=lambda: finished.append(True)
    )
    qtbot.waitUntil(lambda: bool(finished), timeout=10_000)
    assert done == []
    assert len(errors) == 1
    assert str(failure) in errors[0]
    if isinstance(failure, OpenSegError):
        assert errors[0] == "count: paint something first"
    else:
        assert "RuntimeError" in errors[0]


def test_cancel_stops_at_the_next_step_threaded(qtbot, monkeypatch):
    monkeypatch.setenv(_threading.INLINE_ENV, "0")
    gate = threading.Event()
    seen, done, finished = [], [], []
    handle = run_in_background(
        counting(100, gate),
        "count",
        on_done=done.append,
        on_progress=seen.append,
        on_finished=lambda: finished.append(True),
    )
    handle.cancel()
    gate.set()
    qtbot.waitUntil(lambda: bool(finished), timeout=10_000)
    assert handle.cancelled and not handle.running
    assert done == []
    assert len(seen) <= 2  # at most the step in flight when cancel arrived


def test_cancel_from_a_progress_callback_inline(qtbot, monkeypatch):
    monkeypatch.setenv(_threading.INLINE_ENV, "1")
    seen, done = [], []
    holder = {}

    def progress(step):
        seen.append(step.done)
        if step.done == 2:
            holder["handle"].cancel()

    def factory():
        holder["handle"] = handle_ref[0]
        return counting(10)

    handle_ref = [None]

    # the handle exists before the generator starts in inline mode: grab it through the factory
    original = _threading.WorkHandle

    class Capturing(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            handle_ref[0] = self

    monkeypatch.setattr(_threading, "WorkHandle", Capturing)
    handle = run_in_background(factory, "count", on_done=done.append, on_progress=progress)
    assert handle.cancelled and not handle.running
    assert seen == [1, 2]
    assert done == []


def test_jobs_always_leave_qt_pool_threads_free(qtbot, monkeypatch):
    # Qt's image code (napari's animated progress bar) waits on pool tasks: with every pool thread
    # held by a job waiting for the GIL, the window froze for good.
    from qtpy.QtCore import QThreadPool

    monkeypatch.setenv(_threading.INLINE_ENV, "0")
    pool = QThreadPool.globalInstance()
    monkeypatch.setattr(pool, "maxThreadCount", lambda: 2)  # a 2-core machine's default
    limits = []
    monkeypatch.setattr(pool, "setMaxThreadCount", limits.append)
    gate = threading.Event()
    running = _threading._RUNNING
    handles = [run_in_background(counting(2, gate), f"job {k}", on_done=lambda r: None) for k in range(3)]
    assert limits[-1] >= running + 3 + _threading.QT_RESERVE
    gate.set()
    qtbot.waitUntil(lambda: all(h.finished for h in handles), timeout=10_000)
    assert _threading._RUNNING == running


def test_a_callback_of_a_deleted_widget_is_skipped(qtbot, monkeypatch):
    monkeypatch.setenv(_threading.INLINE_ENV, "1")

    def deleted(*_args):
        raise RuntimeError("wrapped C/C++ object of type QLabel has been deleted")

    handle = run_in_background(counting(2), "job", on_done=deleted, on_progress=deleted, on_finished=deleted)
    assert handle.finished  # the viewer closed during the run: nothing else to do, nothing raised

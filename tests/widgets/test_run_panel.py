"""The run lifecycle every widget shares (_run.RunPanel): progress with the time left, refusals,
failures, stale notifications closed, and runs cancelled by closing their layers or their dock."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from qtpy.QtWidgets import QVBoxLayout, QWidget

from napari_openseg._widgets._run import RunPanel, TimeLeft
from napari_openseg.core.progress import Progress
from napari_openseg.errors import OpenSegError

pytestmark = pytest.mark.qt


def counting(n: int, gate: threading.Event | None = None, fail_at: int | None = None):
    yield Progress(0, n, "loading")
    for i in range(n):
        if gate is not None:
            gate.wait(10)
        if i == fail_at:
            raise OpenSegError("label 4 is not painted")
        yield Progress(i + 1, n, "counting")
    return n * 10


def make_panel(qtbot) -> tuple[QWidget, RunPanel]:
    host = QWidget()
    panel = RunPanel("Count", host=host, unit="slices")
    layout = QVBoxLayout(host)
    layout.addWidget(panel.status)
    layout.addWidget(panel)
    qtbot.addWidget(host)
    return host, panel


def test_time_left_is_the_pace_since_the_work_began():
    now = [0.0]
    left = TimeLeft(clock=lambda: now[0])
    assert left.update(0, 10) is None  # loading: no pace yet
    now[0] = 30.0  # loading took 30 s: not the pace of the work
    assert left.update(0, 10) is None
    now[0] = 32.0
    assert left.update(1, 10) == pytest.approx(18.0)  # 2 s per slice, 9 to go
    now[0] = 38.0
    assert left.update(4, 10) == pytest.approx(12.0)
    assert left.update(1, 3) is None  # a new stage starts again


def test_a_run_shows_progress_with_the_time_left_then_done(qtbot, inline):
    _, panel = make_panel(qtbot)
    formats, outcomes, results = [], [], []
    panel.finished.connect(outcomes.append)
    panel.start(
        lambda: counting(4),
        results.append,
        on_progress=lambda step: formats.append(panel.bar.format()),
        message="Counting 4 slices",
    )
    assert results == [40] and outcomes == ["done"]
    assert formats[-1].startswith("counting: 3 of 4 slices, about ") and formats[-1].endswith(" left")
    assert panel.status.text().startswith("Done in ") and panel.bar.value() == panel.bar.maximum() == 4
    assert not panel.running and not panel.cancel_button.isEnabled()


def test_cancel_reaches_an_inline_run_too(qtbot, inline):
    _, panel = make_panel(qtbot)
    outcomes, results, seen = [], [], []
    panel.finished.connect(outcomes.append)

    def at_step(step):
        seen.append(step.done)
        if step.done == 2:
            panel.cancel("enough")

    panel.start(lambda: counting(10), results.append, on_progress=at_step)
    assert outcomes == ["cancelled"] and results == [] and seen == [0, 1, 2]
    assert panel.status.text() == "Cancelled (enough); nothing was changed."


def test_a_refused_start_emits_nothing_and_a_failure_says_why(qtbot, inline, errors):
    _, panel = make_panel(qtbot)
    outcomes = []
    panel.finished.connect(outcomes.append)
    panel.refuse(OpenSegError("choose a folder first"))
    assert outcomes == [] and errors == ["Count: choose a folder first"]
    assert panel.status.text() == "Count: choose a folder first"
    panel.start(lambda: counting(4, fail_at=2), lambda result: None)
    assert outcomes == ["failed"] and errors[-1] == "Count: label 4 is not painted"
    assert panel.status.text() == "Failed: Count: label 4 is not painted" and panel.bar.format() == "failed"


def test_a_result_that_cannot_be_shown_is_a_failure(qtbot, inline, errors):
    _, panel = make_panel(qtbot)
    outcomes = []
    panel.finished.connect(outcomes.append)

    def show(result):
        raise OpenSegError("the output layer was closed")

    panel.start(lambda: counting(2), show)
    assert outcomes == ["failed"] and "the output layer was closed" in errors[-1]


def test_a_new_run_closes_the_notifications_of_earlier_failures(make_napari_viewer, qtbot, inline):
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    viewer = make_napari_viewer(show=True)
    host, panel = make_panel(qtbot)
    viewer.window.add_dock_widget(host, name="count")
    canvas = viewer.window._qt_viewer.canvas.native
    stale = NapariQtNotification("Count: label 4 is not painted", "error", parent=canvas)
    other = NapariQtNotification("Segment: something else", "error", parent=canvas)
    stale.show()
    other.show()
    assert stale.isVisible() and other.isVisible()
    panel.start(lambda: counting(2), lambda result: None)
    assert not stale.isVisible()  # it described the last run, not this one
    assert other.isVisible()  # another widget's message stays
    other.close()


def test_closing_the_dock_or_the_layer_cancels_the_run(make_napari_viewer, qtbot, threaded):
    viewer = make_napari_viewer()
    host, panel = make_panel(qtbot)
    viewer.window.add_dock_widget(host, name="count")
    gate = threading.Event()
    with qtbot.waitSignal(panel.finished, timeout=30_000) as blocker:
        panel.start(lambda: counting(50, gate), lambda result: None)
        viewer.window.remove_dock_widget(host)  # napari's close button: the widget leaves its dock
        gate.set()
    assert (
        blocker.args == ["cancelled"]
        and panel.status.text() == "Cancelled (its dock was closed); nothing was changed."
    )

    layer = viewer.add_image(np.zeros((4, 4)), name="vol")
    gate.clear()
    with qtbot.waitSignal(panel.finished, timeout=30_000) as blocker:
        panel.start(lambda: counting(50, gate), lambda result: None, watch=[layer], viewer=viewer)
        viewer.layers.remove(layer)
        gate.set()
    assert blocker.args == ["cancelled"] and "'vol' was closed during the run" in panel.status.text()

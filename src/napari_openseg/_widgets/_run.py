"""The run lifecycle every widget shares: start, progress bar with time left, cancel, fail, done.

A widget owns one :class:`RunPanel` per kind of work it starts. ``panel.start(work, on_done)`` runs
a core generator through :func:`~._threading.run_in_background`; the panel then

* refuses a second start while a run goes on, and closes the error notifications of its earlier
  runs (they no longer describe what is on screen);
* shows each :class:`~napari_openseg.core.progress.Progress` record in its bar, with the time left
  measured from the records themselves (:class:`TimeLeft`);
* cancels the run when the layers it reads are closed, or when its dock is closed;
* ends with one outcome, emitted by ``finished``: ``"done"`` (``on_done`` ran; a widget may set
  another outcome, such as ``"closed"``, with :meth:`RunPanel.set_outcome`), ``"cancelled"`` or
  ``"failed"``. Its status line says which, and why.

Input mistakes found before a run starts are not runs: :meth:`RunPanel.refuse` shows them (as a
notification and in the status line) and nothing is emitted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from qtpy.QtCore import QEvent, QObject, Qt, Signal
from qtpy.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QWidget

from napari_openseg._widgets._threading import WorkHandle, report_error, run_in_background
from napari_openseg.core.progress import Progress
from napari_openseg.core.segment.expected_time import format_duration
from napari_openseg.errors import OpenSegError

#: Class name of napari's notification pop-ups (closed by name: napari does not export the class).
NOTIFICATION_CLASS = "NapariQtNotification"


class TimeLeft:
    """Time left, from progress records: the pace since the last record before the work moved on.

    Records that do not advance (loading weights, ``0 of N``) move the starting point, so the time a
    run spends before its first unit of work is not counted as the pace of that work. A new total
    (a new stage) starts again.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._since: tuple[float, int] | None = None
        self._total: int | None = None

    def update(self, done: int, total: int) -> float | None:
        """Seconds left after this record, or ``None`` while the pace is unknown."""
        now = self._clock()
        if self._since is None or total != self._total or done <= self._since[1]:
            self._since, self._total = (now, done), total
            return None
        started, first = self._since
        return (now - started) / (done - first) * max(0, total - done)


def _stop(handle: WorkHandle | None) -> None:
    if handle is not None and handle.running:
        handle.cancel()


class _DockWatcher(QObject):
    """Calls ``on_closed`` when the watched widget is taken out of its dock (napari's close button
    takes the widget out and keeps it alive, so ``destroyed`` alone would not tell)."""

    def __init__(self, host: QWidget, on_closed: Callable[[], None]):
        super().__init__(host)
        self._on_closed = on_closed
        host.installEventFilter(self)

    def eventFilter(self, watched, event) -> bool:  # noqa: N802 (Qt's name)
        if event.type() == QEvent.ParentChange and watched.parent() is None:
            self._on_closed()
        return False


class RunPanel(QWidget):
    """Progress bar, time left and Cancel of a widget's runs, with a status line to place.

    Parameters
    ----------
    what
        The action's name, shown before its messages (``"Segment"``).
    host
        The dock widget the panel belongs to: closing its dock cancels the run.
    unit
        What the progress records count (``"slices"``), shown in the bar.

    Signals: ``running_changed(bool)``; ``finished(str)`` with the outcome (module docstring).
    """

    running_changed = Signal(bool)
    finished = Signal(str)

    def __init__(self, what: str, host: QWidget, unit: str = "steps", parent: QWidget | None = None):
        super().__init__(parent)
        self.what, self.unit = what, unit
        self.handle: WorkHandle | None = None
        self.bar = QProgressBar()
        self.bar.setTextVisible(True)
        self.bar.setFormat("ready")
        self.bar.setValue(0)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(lambda: self.cancel())
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.bar, stretch=1)
        row.addWidget(self.cancel_button)
        #: the panel's status line; the widget places it (it may be long, so it scrolls with the form)
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self._time_left = TimeLeft()
        self._outcome = "failed"
        self._message = ""
        self._cancel_reason = ""
        self._error = ""
        self._started = 0.0
        self._watched: list = []
        self._viewer = None
        _DockWatcher(host, lambda: self.cancel("its dock was closed"))
        # the panel (a child) is gone when its host's ``destroyed`` comes: a closure keeps what to stop
        self._current: dict[str, WorkHandle | None] = {"handle": None}
        current = self._current
        host.destroyed.connect(lambda *_: _stop(current["handle"]))

    # --- state ---------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.handle is not None and self.handle.running

    @property
    def elapsed(self) -> float:
        """Seconds since the current (or last) run started."""
        return time.perf_counter() - self._started

    def set_status(self, text: str) -> None:
        """Show ``text`` in the status line; written by ``on_done``, it stays instead of the panel's
        own "Done in ..." (as does any text the widget put there meanwhile)."""
        self.status.setText(text)

    def set_outcome(self, outcome: str, text: str | None = None) -> None:
        """From ``on_done``: end with ``outcome`` instead of ``"done"`` (for example ``"closed"``)."""
        self._outcome = outcome
        if text is not None:
            self.set_status(text)

    # --- lifecycle -----------------------------------------------------------------------------

    def refuse(self, err: OpenSegError | str) -> None:
        """Show why a run cannot start (a notification and the status line); nothing is emitted."""
        text = report_error(err if isinstance(err, BaseException) else OpenSegError(err), self.what)
        if not self.running:
            self.status.setText(text)

    def start(
        self,
        work: Callable[[], Any],
        on_done: Callable[[Any], None],
        *,
        on_progress: Callable[[Progress], None] | None = None,
        message: str = "",
        watch: Iterable = (),
        viewer=None,
    ) -> WorkHandle | None:
        """Run ``work`` (a zero-argument function making a core generator) in the background.

        ``on_done(result)`` runs on the main thread when the run has finished; ``message`` is shown
        while it runs. The run is cancelled when every layer in ``watch`` has left ``viewer``.
        Returns the handle, or ``None`` when a run is already going on (refused with a message).
        """
        if self.running:
            self.refuse("a run is in progress: wait for it or press Cancel")
            return None
        self.clear_notifications()
        self._outcome, self._message, self._cancel_reason, self._error = "failed", message, "", ""
        self._time_left = TimeLeft()
        self._started = time.perf_counter()
        self._watch(list(watch), viewer)
        self.bar.setRange(0, 0)  # busy until the first record says how much there is
        self.bar.setFormat("starting…")
        self.status.setText(message)
        self.cancel_button.setEnabled(True)

        def done(result) -> None:
            self._outcome = None  # on_done may choose one with set_outcome; too late to cancel now
            on_done(result)
            if self._outcome is None:
                self._outcome = "done"

        def started(handle: WorkHandle) -> None:  # before any work: Cancel reaches an inline run too
            self.handle = self._current["handle"] = handle
            self.running_changed.emit(True)

        return run_in_background(
            work,
            self.what,
            on_done=done,
            on_progress=lambda step: self._progress(step, on_progress),
            on_finished=self._finish,
            on_error=self._failed,
            on_start=started,
        )

    def cancel(self, reason: str = "") -> None:
        """Stop the run at its next progress record; ``reason`` says why in the status line. Once the
        result has come (``on_done`` is running), it is too late: nothing happens."""
        if not self.running or self._outcome != "failed":
            return
        self._cancel_reason = reason
        self.handle.cancel()
        self.cancel_button.setEnabled(False)
        self.bar.setFormat("cancelling…")

    # --- callbacks -----------------------------------------------------------------------------

    def _progress(self, step: Progress, on_progress) -> None:
        if on_progress is not None:
            on_progress(step)
        if self.handle is not None and self.handle.cancelled:
            return
        total = max(1, int(step.total))
        self.bar.setRange(0, total)
        self.bar.setValue(min(int(step.done), total))
        left = self._time_left.update(int(step.done), total)
        stage = f"{step.stage}: " if step.stage else ""
        text = f"{stage}{step.done} of {step.total} {self.unit}"
        self.bar.setFormat(text + (f", about {format_duration(left)} left" if left is not None else ""))

    def _failed(self, text: str) -> None:
        self._error = text

    def _finish(self) -> None:
        self._unwatch()
        self.cancel_button.setEnabled(False)
        took = format_duration(self.elapsed)
        if self._outcome is None:  # on_done itself failed
            self._outcome = "failed"
        if self._outcome == "failed" and self.handle is not None and self.handle.cancelled:
            self._outcome = "cancelled"
        if self._outcome == "cancelled":
            why = f" ({self._cancel_reason})" if self._cancel_reason else ""
            self.status.setText(f"Cancelled{why}; nothing was changed.")
            self.bar.setFormat("cancelled")
        elif self._outcome == "failed":
            self.status.setText(f"Failed: {self._error}" if self._error else "Failed; see the notification.")
            self.bar.setFormat("failed")
        else:
            if self.status.text() == self._message:  # the widget wrote nothing of its own
                self.status.setText(f"Done in {took}.")
            self.bar.setFormat(f"finished in {took}")
        if self.bar.maximum() == 0:  # ended before any record: leave the busy look
            self.bar.setRange(0, 1)
        if self._outcome != "cancelled" and self._outcome != "failed":
            self.bar.setValue(self.bar.maximum())
        self.running_changed.emit(False)
        self.finished.emit(self._outcome)

    # --- what ends a run early -----------------------------------------------------------------

    def _watch(self, layers: list, viewer) -> None:
        self._watched, self._viewer = layers, viewer
        if layers and viewer is not None:
            viewer.layers.events.removed.connect(self._layer_removed)

    def _unwatch(self) -> None:
        if self._watched and self._viewer is not None:
            self._viewer.layers.events.removed.disconnect(self._layer_removed)
        self._watched, self._viewer = [], None

    def _layer_removed(self, event=None) -> None:
        if self._viewer is None or any(layer in self._viewer.layers for layer in self._watched):
            return
        names = ", ".join(f"'{layer.name}'" for layer in self._watched)
        self.cancel(f"{names} {'was' if len(self._watched) == 1 else 'were'} closed during the run")

    def clear_notifications(self) -> None:
        """Close the pop-ups of this action's earlier errors: a new run makes them stale."""
        window = self.window()
        if window is None or window is self:
            return
        for toast in window.findChildren(QWidget):
            if type(toast).__name__ != NOTIFICATION_CLASS:
                continue
            message = getattr(toast, "message", None)
            text = message.text() if message is not None else ""
            if text.startswith(self.what):
                toast.close()

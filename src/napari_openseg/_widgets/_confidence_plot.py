"""A small Qt-drawn bar plot of per-slice confidence: one bar per slice, click a bar to go there."""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import QRectF, Qt, Signal
from qtpy.QtGui import QColor, QPainter, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

LOW, HIGH = QColor(220, 60, 40), QColor(60, 170, 80)


class ConfidencePlot(QWidget):
    """Bars of height = confidence in [0, 1] per slice; NaN (a painted or unpredicted slice) is a
    grey tick. The current slice is outlined and the weakest one marked. ``slice_clicked(int)``."""

    slice_clicked = Signal(int)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.values = np.zeros(0, np.float32)
        self.current: int | None = None
        self.setMinimumHeight(70)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.setToolTip(
            "confidence per slice (click a bar to go to that slice; grey: painted or not predicted)"
        )

    def set_values(self, values: np.ndarray) -> None:
        self.values = np.asarray(values, np.float32)
        self.update()

    def set_current(self, index: int | None) -> None:
        self.current = index
        self.update()

    def weakest(self) -> int | None:
        if not np.isfinite(self.values).any():
            return None
        return int(np.nanargmin(self.values))

    def _bar_width(self) -> float:
        return self.width() / max(1, len(self.values))

    def mousePressEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        if len(self.values):
            x = event.pos().x()
            self.slice_clicked.emit(int(np.clip(x // self._bar_width(), 0, len(self.values) - 1)))

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        painter = QPainter(self)
        painter.fillRect(self.rect(), QColor(30, 30, 34))
        n = len(self.values)
        if n == 0:
            painter.setPen(QColor(160, 160, 160))
            painter.drawText(self.rect(), Qt.AlignCenter, "confidence per slice appears after a run")
            return
        width, height = self._bar_width(), self.height() - 4
        weakest = self.weakest()
        for s, value in enumerate(self.values):
            left = s * width
            if not np.isfinite(value):
                painter.fillRect(QRectF(left, height - 1, max(1.0, width - 1), 3), QColor(110, 110, 110))
                continue
            mix = float(np.clip(value, 0.0, 1.0))
            color = QColor(
                int(LOW.red() + mix * (HIGH.red() - LOW.red())),
                int(LOW.green() + mix * (HIGH.green() - LOW.green())),
                int(LOW.blue() + mix * (HIGH.blue() - LOW.blue())),
            )
            bar = max(2.0, mix * height)
            painter.fillRect(QRectF(left, 2 + height - bar, max(1.0, width - 1), bar), color)
            if s == weakest:
                painter.setPen(QPen(QColor(255, 255, 255), 1, Qt.DashLine))
                painter.drawRect(QRectF(left, 2, max(1.0, width - 1), height))
        if self.current is not None and 0 <= self.current < n:
            painter.setPen(QPen(QColor(250, 220, 60), 2))
            painter.drawRect(QRectF(self.current * width, 1, max(1.0, width - 1), height + 2))
        painter.end()

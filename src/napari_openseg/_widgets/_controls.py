"""Small Qt controls shared by the widgets: a layer picker that follows the layer list, foldable
sections, and the dock layout that keeps every widget within a small screen."""

from __future__ import annotations

from collections.abc import Callable

from qtpy.QtCore import QEvent, QObject, QSize, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QDockWidget,
    QDoubleSpinBox,
    QFormLayout,
    QFrame,
    QLabel,
    QLayout,
    QMainWindow,
    QScrollArea,
    QSizePolicy,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from napari_openseg._widgets._layers import owner_info, slice_axis
from napari_openseg.core.axes import axis_text
from napari_openseg.errors import OpenSegError


def parse_label_values(text: str) -> list[int] | None:
    """Label values typed as ``"1, 3"`` (commas or spaces); ``None`` for an empty field (every value)."""
    try:
        return [int(v) for v in text.replace(",", " ").split()] or None
    except ValueError as err:
        raise OpenSegError(f"label values must be whole numbers separated by commas, got {text!r}") from err


class LayerCombo(QComboBox):
    """A combo box of the viewer's layers that pass ``accept``, kept current as layers come, go,
    move or are renamed. The selection follows the layer object, not its name.

    ``extra_items`` are fixed entries listed first (for example "All open image layers"); they are
    returned by :meth:`current` as their text. ``default_extra`` names the one chosen when nothing
    (or a layer since removed) was chosen; without it the newest matching layer is.
    """

    selection_changed = Signal()

    def __init__(
        self,
        viewer,
        accept: Callable[[object], bool],
        extra_items: tuple[str, ...] = (),
        placeholder: str = "(no suitable layer)",
        default_extra: str | None = None,
        parent: QWidget | None = None,
    ):
        super().__init__(parent)
        self._viewer = viewer
        self._accept = accept
        self._extra = extra_items
        self._default_extra = default_extra
        self._placeholder = placeholder
        self._layers: list = []
        self.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)
        events = viewer.layers.events
        for emitter in (events.inserted, events.removed, events.moved, events.reordered):
            emitter.connect(self.refresh)
        self.currentIndexChanged.connect(lambda _i: self.selection_changed.emit())
        self.refresh()

    def refresh(self, event=None) -> None:
        previous = self.current()
        self._layers = [layer for layer in self._viewer.layers if self._accept(layer)]
        for layer in self._layers:  # follow renames; connecting twice is harmless (same slot)
            layer.events.name.connect(self._rename)
        self.blockSignals(True)
        self.clear()
        self.addItems(list(self._extra))
        self.addItems([layer.name for layer in self._layers])
        if self.count() == 0:
            self.addItem(self._placeholder)
        position = self._position_of(previous)
        if position is None and self._default_extra is not None:
            position = self._position_of(self._default_extra)
        if position is None and self._layers:  # default: the newest matching layer
            position = len(self._extra) + len(self._layers) - 1
        self.setCurrentIndex(position or 0)
        self.blockSignals(False)
        if self.current() is not previous:
            self.selection_changed.emit()

    def _rename(self, event=None) -> None:
        for i, layer in enumerate(self._layers):
            self.setItemText(len(self._extra) + i, layer.name)

    def _position_of(self, item) -> int | None:
        if isinstance(item, str) and item in self._extra:
            return self._extra.index(item)
        for i, layer in enumerate(self._layers):
            if layer is item:
                return len(self._extra) + i
        return None

    def current(self):
        """The chosen layer, the text of a chosen extra item, or ``None``."""
        index = self.currentIndex()
        if 0 <= index < len(self._extra):
            return self._extra[index]
        index -= len(self._extra)
        return self._layers[index] if 0 <= index < len(self._layers) else None

    def layers(self) -> list:
        """Every layer currently listed."""
        return list(self._layers)

    def select(self, item) -> None:
        """Choose a layer (or an extra item's text)."""
        position = self._position_of(item)
        if position is None:
            raise ValueError(f"{item!r} is not among the choices")
        self.setCurrentIndex(position)


def is_image(layer) -> bool:
    from napari.layers import Image

    return isinstance(layer, Image) and owner_info(layer) is None


def is_user_labels(layer) -> bool:
    """A labels layer the user owns: their own, or an output they have painted on (it is kept as theirs)."""
    from napari.layers import Labels

    info = owner_info(layer)
    return isinstance(layer, Labels) and (info is None or bool(info.get("edited")))


def form_row(form: QFormLayout, label: str, widget: QWidget, tip: str) -> QWidget:
    """Add a row with a tooltip on both the label and the field."""
    widget.setToolTip(tip)
    text = QLabel(label)
    text.setToolTip(tip)
    form.addRow(text, widget)
    return widget


def fraction_box(value: float, top: float = 1.0, step: float = 0.05) -> QDoubleSpinBox:
    """A spin box for a value in [0, ``top``] (a threshold, a ratio), starting at ``value``."""
    box = QDoubleSpinBox()
    box.setRange(0.0, top)
    box.setSingleStep(step)
    box.setValue(value)
    return box


class AxisCombo(QComboBox):
    """Slice-axis choice: "auto" (the axis the viewer's slider moves along) or 0, 1, 2."""

    AUTO = "auto (the viewer's slider)"

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.addItems([self.AUTO, "0", "1", "2"])
        for axis in range(3):  # numbers in array order, which is the NIfTI file's axes reversed
            self.setItemData(axis + 1, axis_text(axis), Qt.ToolTipRole)

    def axis_for(self, viewer, layer) -> int:
        """The chosen axis for ``layer``; a 2D layer always uses 0."""
        if self.currentText() == self.AUTO:
            return slice_axis(viewer, layer)
        axis = int(self.currentText())
        if layer.ndim < 3:
            return 0
        if axis >= layer.ndim:
            raise OpenSegError(f"layer '{layer.name}' has no axis {axis}; choose 0, 1 or 2 (array order)")
        return axis


class Collapsible(QWidget):
    """A titled section that folds away: an arrow button, and its content below (folded at first).

    ``content`` is a widget or a layout; :meth:`set_title` lets the title summarise what is inside
    (for example the chosen weights) while it is folded.
    """

    toggled = Signal(bool)

    def __init__(
        self, title: str, content: QWidget | QLayout, expanded: bool = False, parent: QWidget | None = None
    ):
        super().__init__(parent)
        self.button = QToolButton()
        self.button.setToolButtonStyle(Qt.ToolButtonTextBesideIcon)
        self.button.setCheckable(True)
        self.button.setStyleSheet("QToolButton { border: none; }")
        self.button.toggled.connect(self.set_expanded)
        if isinstance(content, QLayout):
            holder = QWidget()
            holder.setLayout(content)
            content = holder
        self.content = content
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        layout.addWidget(self.button)
        layout.addWidget(content)
        self.set_title(title)
        self.button.setChecked(expanded)
        self.set_expanded(expanded)

    def set_title(self, title: str) -> None:
        self.button.setText(title)

    @property
    def expanded(self) -> bool:
        return self.button.isChecked()

    def set_expanded(self, expanded: bool) -> None:
        if self.button.isChecked() != expanded:
            self.button.setChecked(expanded)  # comes back here through toggled
            return
        self.button.setArrowType(Qt.DownArrow if expanded else Qt.RightArrow)
        self.content.setVisible(expanded)
        self.toggled.emit(expanded)


#: Height below which a dock's scrolling part is not squeezed. Five docks stacked on a 1000-pixel
#: screen leave each about 170 pixels with its title bar and footer (tests/widgets/test_docks.py).
SCROLL_MIN_HEIGHT = 60


class _FormScroll(QScrollArea):
    """A scroll area as wide as its form needs (only the height scrolls) and short when squeezed."""

    def __init__(self, inner: QWidget):
        super().__init__()
        self.setWidget(inner)
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Expanding)
        inner.installEventFilter(self)

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        width = self.widget().minimumSizeHint().width() + self.verticalScrollBar().sizeHint().width()
        return QSize(width, SCROLL_MIN_HEIGHT)

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        # the form's height as it is now (Qt's own hint is the form's height when it was first set)
        hint = self.widget().sizeHint()
        return QSize(self.minimumSizeHint().width(), max(SCROLL_MIN_HEIGHT, hint.height()))

    def eventFilter(self, watched, event) -> bool:  # noqa: N802 (Qt's name)
        if watched is self.widget() and event.type() == QEvent.LayoutRequest:
            self.updateGeometry()  # a section unfolded or a longer item appeared: ask for the width again
        return super().eventFilter(watched, event)


class _RoomOnFirstShow(QObject):
    """When its widget first shows in a dock, asks the main window for the dock's preferred height.

    Qt keeps the docks already open at their sizes and squeezes a new one to its minimum; the dock
    just opened is the one the user wants to see, so it gets its height (the others give way, never
    below their minimum)."""

    def __init__(self, host: QWidget):
        super().__init__(host)
        self._host = host
        host.installEventFilter(self)

    def eventFilter(self, watched, event) -> bool:  # noqa: N802 (Qt's name)
        if event.type() == QEvent.Show:
            self._host.removeEventFilter(self)
            QTimer.singleShot(0, self._make_room)
        return False

    def _make_room(self) -> None:
        dock = self._host.parentWidget()
        while dock is not None and not isinstance(dock, QDockWidget):
            dock = dock.parentWidget()
        window = dock.parentWidget() if dock is not None else None
        if isinstance(window, QMainWindow) and not dock.isFloating():
            window.resizeDocks([dock], [dock.sizeHint().height()], Qt.Vertical)


def dock_layout(host: QWidget, content: QLayout, footer: QWidget | None = None) -> QScrollArea:
    """Lay ``host`` out so that its dock fits a small screen beside others: ``content`` scrolls
    when the dock is short, ``footer`` (the run panel: progress and Cancel) stays in view, and a dock
    just opened gets its preferred height."""
    inner = QWidget()
    inner.setLayout(content)
    scroll = _FormScroll(inner)
    layout = QVBoxLayout(host)
    layout.setContentsMargins(0, 0, 0, 0)
    layout.addWidget(scroll, stretch=1)
    if footer is not None:
        layout.addWidget(footer)
    _RoomOnFirstShow(host)
    return scroll

"""Small Qt controls shared by the widgets: a layer picker that follows the layer list."""

from __future__ import annotations

from collections.abc import Callable

from qtpy.QtCore import Signal
from qtpy.QtWidgets import QComboBox, QFormLayout, QLabel, QWidget

from ..errors import OpenSegError
from ._layers import owner_info, slice_axis


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


class AxisCombo(QComboBox):
    """Slice-axis choice: "auto" (the axis the viewer's slider moves along) or 0, 1, 2."""

    AUTO = "auto (the viewer's slider)"

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.addItems([self.AUTO, "0", "1", "2"])

    def axis_for(self, viewer, layer) -> int:
        """The chosen axis for ``layer``; a 2D layer always uses 0."""
        if self.currentText() == self.AUTO:
            return slice_axis(viewer, layer)
        axis = int(self.currentText())
        if layer.ndim < 3:
            return 0
        if axis >= layer.ndim:
            raise OpenSegError(f"layer '{layer.name}' has no axis {axis}; choose 0, 1 or 2")
        return axis

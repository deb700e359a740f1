"""The support-set gallery: one thumbnail per entry (the slice with its mask tinted), selectable,
with removal by button, Delete key or context menu."""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import QSize, Qt, Signal
from qtpy.QtGui import QIcon, QImage, QPixmap
from qtpy.QtWidgets import QAbstractItemView, QListView, QListWidget, QListWidgetItem, QMenu

from napari_openseg.core.axes import axis_text
from napari_openseg.core.support import SupportEntry, SupportSet

THUMB = 80
# Tints per label value (cycled), chosen to stay visible over grey.
PALETTE = np.array(
    [(255, 80, 80), (80, 200, 255), (255, 210, 60), (120, 230, 120), (220, 120, 255), (255, 150, 60)],
    dtype=np.float32,
)


def thumbnail_rgb(entry: SupportEntry, size: int = THUMB) -> np.ndarray:
    """``"h w 3"`` uint8 picture of an entry (nearest-neighbour, longest side ``size``); the mask is
    tinted in its label's colour at half opacity."""
    height, width = entry.image.shape
    scale = size / max(height, width)
    rows = np.minimum((np.arange(max(1, round(height * scale))) / scale).astype(int), height - 1)
    cols = np.minimum((np.arange(max(1, round(width * scale))) / scale).astype(int), width - 1)
    grey = np.clip(entry.image[np.ix_(rows, cols)], 0, 1)[..., None] * 255.0
    mask = entry.mask[np.ix_(rows, cols)][..., None]
    tint = PALETTE[(int(entry.label) - 1) % len(PALETTE)]
    rgb = np.where(mask, 0.5 * grey + 0.5 * tint, np.repeat(grey, 3, axis=-1))
    return np.ascontiguousarray(rgb.astype(np.uint8))


def _pixmap(rgb: np.ndarray) -> QPixmap:
    height, width, _ = rgb.shape
    image = QImage(rgb.data, width, height, 3 * width, QImage.Format_RGB888)
    return QPixmap.fromImage(image.copy())  # copy: the QImage must not outlive the numpy buffer


def entry_caption(entry: SupportEntry) -> str:
    where = "" if entry.slice_index is None else f" #{entry.slice_index}"
    return f"L{entry.label}{where}"


def entry_tooltip(entry: SupportEntry) -> str:
    where = (
        "a 2D image"
        if entry.slice_index is None
        else f"slice {entry.slice_index} along {axis_text(entry.axis)}"
    )
    return (
        f"label {entry.label} from '{entry.source}', {where}\n"
        f"{entry.image.shape[0]}x{entry.image.shape[1]} pixels, {int(entry.mask.sum())} in the mask"
    )


class SupportGallery(QListWidget):
    """Thumbnails of a support set's entries; emits ``remove_requested(list[int])``."""

    remove_requested = Signal(list)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setViewMode(QListView.IconMode)
        self.setIconSize(QSize(THUMB, THUMB))
        self.setResizeMode(QListView.Adjust)
        self.setMovement(QListView.Static)
        self.setUniformItemSizes(True)
        self.setSpacing(4)
        self.setWordWrap(False)
        self.setSelectionMode(QAbstractItemView.ExtendedSelection)
        self.setContextMenuPolicy(Qt.CustomContextMenu)
        self.customContextMenuRequested.connect(self._menu)
        self.setMinimumHeight(THUMB + 40)
        self._icons: dict[int, tuple[SupportEntry, QIcon]] = {}

    def show_support(self, support: SupportSet) -> None:
        """Redraw from ``support`` (thumbnails of entries seen before are reused)."""
        icons = {}
        self.clear()
        for entry in support.entries:
            cached = self._icons.get(id(entry))
            icon = cached[1] if cached and cached[0] is entry else QIcon(_pixmap(thumbnail_rgb(entry)))
            icons[id(entry)] = (entry, icon)
            item = QListWidgetItem(icon, entry_caption(entry))
            item.setToolTip(entry_tooltip(entry))
            self.addItem(item)
        self._icons = icons

    def selected_indices(self) -> list[int]:
        return sorted(self.row(item) for item in self.selectedItems())

    def keyPressEvent(self, event) -> None:
        if event.key() in (Qt.Key_Delete, Qt.Key_Backspace) and self.selectedItems():
            self.remove_requested.emit(self.selected_indices())
            return
        super().keyPressEvent(event)

    def _menu(self, position) -> None:
        item = self.itemAt(position)
        if item is None:
            return
        if not item.isSelected():
            self.clearSelection()
            item.setSelected(True)
        menu = QMenu(self)
        count = len(self.selectedItems())
        action = menu.addAction(f"Remove {count} entr{'y' if count == 1 else 'ies'}")
        if menu.exec_(self.viewport().mapToGlobal(position)) is action:
            self.remove_requested.emit(self.selected_indices())

"""Dock widget that builds the viewer's support set from painted labels.

Pick an image layer and the labels layer painted on it; "Add current slice" takes the slice on
screen, "Add all labelled slices" every slice with a chosen label value. Each (slice, label value)
becomes one entry; each label value is one task. Entries from any number of images live in one set,
kept in the viewer's :class:`~napari_openseg._widgets._session.Session`. "Add current slice" says so
when the slice is already in the set, and refuses a slice that only cuts across slices painted along
another axis (a transposed view), whose "mask" would be a line one voxel wide.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from napari.utils.notifications import show_info, show_warning
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_openseg._widgets._controls import AxisCombo, LayerCombo, dock_layout, form_row, is_image
from napari_openseg._widgets._gallery import SupportGallery
from napari_openseg._widgets._layers import current_slice, is_preview, layer_image, slice_axis
from napari_openseg._widgets._session import connect_widget, get_session, unwrap_viewer
from napari_openseg._widgets._threading import WorkHandle, report_error, run_in_background
from napari_openseg.core.axes import axis_text
from napari_openseg.core.progress import Progress
from napari_openseg.core.support import SupportSet, coverage_warning, entries_from_arrays, painted_across
from napari_openseg.errors import OpenSegError

NO_BACKGROUND = "none (whole masks)"


def present_values(labels: np.ndarray) -> list[int]:
    """Non-zero label values in ``labels`` (bincount for small unsigned types: one pass, no sort)."""
    labels = np.asarray(labels)
    if labels.dtype in (np.uint8, np.uint16, np.bool_):
        counts = np.bincount(labels.ravel().astype(np.uint16, copy=False), minlength=1)
        return [int(v) for v in np.flatnonzero(counts) if v != 0]
    values = np.unique(labels)
    return [int(v) for v in values if v > 0 and float(v).is_integer()]


def _value_scan(labels: np.ndarray):
    """:func:`present_values` as background work; it reports no progress (so shows no bar)."""
    yield from ()
    return present_values(labels)


def _is_paintable(layer) -> bool:
    from napari.layers import Labels

    return isinstance(layer, Labels) and not is_preview(layer)


class SupportSetWidget(QWidget):
    """Build, inspect, save and load the viewer's support set."""

    def __init__(self, napari_viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer = unwrap_viewer(napari_viewer)
        self.session = get_session(napari_viewer)
        self._job: WorkHandle | None = None
        self._scan: WorkHandle | None = None

        form = QFormLayout()
        self.image_combo = form_row(
            form, "Image", LayerCombo(napari_viewer, is_image), "the image (2D) or volume (3D) you painted on"
        )
        self.labels_combo = form_row(
            form,
            "Labels",
            LayerCombo(napari_viewer, _is_paintable),
            "the labels layer with your examples; it must have the image's shape",
        )
        self.axis_combo = form_row(
            form, "Slice axis", AxisCombo(), "axis of a 3D volume whose slices become entries"
        )
        self.values_list = form_row(
            form, "Tasks", QListWidget(), "label values to use; each checked value becomes one task"
        )
        self.values_list.setMaximumHeight(60)
        self.background_combo = form_row(
            form,
            "Background label",
            QComboBox(),
            "for strokes: the label you painted background with; other labels are structures and "
            "unpainted pixels (0) count as unknown, not as background",
        )
        self.background_combo.addItem(NO_BACKGROUND, None)

        self.add_slice_button = QPushButton("Add current slice")
        self.add_slice_button.setToolTip("add the slice shown in the viewer (one entry per checked label)")
        self.add_all_button = QPushButton("Add all labelled slices")
        self.add_all_button.setToolTip("add every slice that contains a checked label value")
        self.remove_button = QPushButton("Remove selected")
        self.clear_button = QPushButton("Clear")
        self.save_button = QPushButton("Save…")
        self.load_button = QPushButton("Load…")
        buttons = QGridLayout()
        for i, button in enumerate(
            (
                self.add_slice_button,
                self.add_all_button,
                self.remove_button,
                self.clear_button,
                self.save_button,
                self.load_button,
            )
        ):
            buttons.addWidget(button, i // 2, i % 2)

        self.gallery = SupportGallery()
        self.counts_label = QLabel()
        self.counts_label.setWordWrap(True)

        layout = QVBoxLayout()
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(QLabel("Support set (select, then Remove or press Delete):"))
        layout.addWidget(self.gallery, stretch=1)
        layout.addWidget(self.counts_label)
        dock_layout(self, layout)

        self.add_slice_button.clicked.connect(self.add_current_slice)
        self.add_all_button.clicked.connect(self.add_all_slices)
        self.remove_button.clicked.connect(self.remove_selected)
        self.clear_button.clicked.connect(self.session.clear_support)
        self.save_button.clicked.connect(self._save_dialog)
        self.load_button.clicked.connect(self._load_dialog)
        self.gallery.remove_requested.connect(self.session.remove_entries)
        connect_widget(self.session.support_changed, self, self._redraw)

        # label values are re-read shortly after painting stops, not on every brush stroke
        self._values_timer = QTimer(self)
        self._values_timer.setSingleShot(True)
        self._values_timer.setInterval(300)
        self._values_timer.timeout.connect(self.refresh_values)
        self._watched = None
        self.labels_combo.selection_changed.connect(self._watch_labels)
        self._watch_labels()
        self._redraw(self.session.support)

    # --- label values ------------------------------------------------------------------------

    def _watch_labels(self) -> None:
        if self._watched is not None:
            for emitter in (self._watched.events.paint, self._watched.events.data):
                emitter.disconnect(self._schedule_values)
        layer = self.labels_combo.current()
        self._watched = layer
        if layer is not None:
            layer.events.paint.connect(self._schedule_values)
            layer.events.data.connect(self._schedule_values)
        self.refresh_values()

    def _schedule_values(self, event=None) -> None:
        self._values_timer.start()

    def refresh_values(self) -> WorkHandle | None:
        """Re-list the label values present in the chosen labels layer, keeping unchecked ones off.

        The layer is read in the background: on a large volume that takes seconds, and it runs
        after every brush stroke."""
        if self._scan is not None and self._scan.running:
            self._values_timer.start()  # read again once this read is over
            return self._scan
        layer = self.labels_combo.current()
        if layer is None:
            self._show_values([])
            return None

        def show(values: list[int]) -> None:
            if self.labels_combo.current() is layer:  # else the new choice is being read
                self._show_values(values)

        data = layer.data
        self._scan = run_in_background(lambda: _value_scan(data), "Reading label values", on_done=show)
        return self._scan

    def _unchecked_values(self) -> set[int]:
        return {
            int(self.values_list.item(i).data(Qt.UserRole))
            for i in range(self.values_list.count())
            if self.values_list.item(i).checkState() != Qt.Checked
        }

    def _show_values(self, values: list[int]) -> None:
        background = self.background_label()
        self.background_combo.clear()
        self.background_combo.addItem(NO_BACKGROUND, None)
        for value in values:
            self.background_combo.addItem(f"label {value}", value)
        if background in values:
            self.background_combo.setCurrentIndex(values.index(background) + 1)
        unchecked = self._unchecked_values()
        self.values_list.clear()
        for value in values:
            item = QListWidgetItem(f"label {value}")
            item.setData(Qt.UserRole, value)
            item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
            item.setCheckState(Qt.Unchecked if value in unchecked else Qt.Checked)
            self.values_list.addItem(item)

    def chosen_values(self) -> list[int]:
        """Checked label values (all listed values when none is listed yet is an empty list)."""
        return [
            int(self.values_list.item(i).data(Qt.UserRole))
            for i in range(self.values_list.count())
            if self.values_list.item(i).checkState() == Qt.Checked
        ]

    def background_label(self) -> int | None:
        """The label painted as background (strokes), or ``None`` (whole masks)."""
        value = self.background_combo.currentData()
        return None if value is None else int(value)

    def set_background_label(self, value: int | None) -> None:
        """Choose the background label (for scripts and tests); ``None``: whole masks."""
        index = self.background_combo.findData(value)
        if index < 0:
            raise OpenSegError(f"label {value} is not painted in the chosen labels layer")
        self.background_combo.setCurrentIndex(index)

    def set_values(self, values: list[int]) -> None:
        """Check exactly ``values`` (for scripts and tests)."""
        for i in range(self.values_list.count()):
            item = self.values_list.item(i)
            item.setCheckState(Qt.Checked if int(item.data(Qt.UserRole)) in values else Qt.Unchecked)

    # --- adding entries ----------------------------------------------------------------------

    def add_current_slice(self) -> WorkHandle | None:
        """Add the slice on screen (a 2D image: the whole image)."""
        return self._add(current_only=True)

    def add_all_slices(self) -> WorkHandle | None:
        """Add every slice that holds a checked label value."""
        return self._add(current_only=False)

    def _add(self, current_only: bool) -> WorkHandle | None:
        what = "Add current slice" if current_only else "Add labelled slices"
        try:
            image_layer, labels_layer = self.image_combo.current(), self.labels_combo.current()
            if image_layer is None or labels_layer is None:
                raise OpenSegError("choose an image layer and the labels layer painted on it first")
            image, rgb = layer_image(image_layer)
            axis = self.axis_combo.axis_for(self.viewer, image_layer) if image_layer.ndim == 3 else 0
            shown = slice_axis(self.viewer, image_layer)
            if current_only and image_layer.ndim == 3 and axis != shown:
                raise OpenSegError(
                    f"the viewer shows slices along {axis_text(shown)}, not along axis {axis}: set Slice axis "
                    "to auto to add the slice on screen (or use Add all labelled slices)"
                )
            slices = (
                [current_slice(self.viewer, image_layer, axis)]
                if current_only and image_layer.ndim == 3
                else None
            )
            labels = np.array(labels_layer.data, copy=True)  # painting may go on while we read
        except OpenSegError as err:
            report_error(err, what)
            return None
        source, unchecked, name = image_layer.name, self._unchecked_values(), labels_layer.name
        background = self.background_label()

        def build():
            yield Progress(0, 1, "reading slices")
            # read here, not from the list: values painted since it was last refreshed count too
            values = [v for v in present_values(labels) if v not in unchecked and v != background]
            if not values:
                raise OpenSegError(
                    f"labels layer '{name}' has no checked label value: paint the structure "
                    "with a label other than 0 (or tick a value under Tasks)"
                )
            if slices is not None:
                _refuse_a_cut_across(labels, axis, slices[0], values, name)
            entries = entries_from_arrays(
                image,
                labels,
                axis=axis,
                source=source,
                label_values=values,
                slice_indices=slices,
                rgb=rgb,
                background_label=background,
            )
            yield Progress(1, 1, "reading slices")
            return entries, coverage_warning(entries)

        def add(found) -> None:
            entries, warning = found
            added = self.session.add_entries(entries)
            if added < len(entries):
                where = "this image" if slices is None else f"slice {slices[0]} along {axis_text(axis)}"
                held = len(entries) - added
                show_info(
                    f"{what}: {'nothing was added' if not added else f'{added} entries added'}; {held} "
                    f"entr{'y' if held == 1 else 'ies'} of {where} {'is' if held == 1 else 'are'} already in the "
                    "support set, painted the same"
                )
            if warning:
                show_warning(f"Support set: {warning}")

        self._set_busy(True)
        self._job = run_in_background(build, what, on_done=add, on_finished=self._added)
        return self._job

    def _added(self) -> None:
        self._set_busy(False)
        self.refresh_values()  # list what was painted since the last read

    def _set_busy(self, busy: bool) -> None:
        self.add_slice_button.setEnabled(not busy)
        self.add_all_button.setEnabled(not busy)

    # --- removing, saving, loading -----------------------------------------------------------

    def remove_selected(self) -> None:
        indices = self.gallery.selected_indices()
        if not indices:
            report_error(OpenSegError("select one or more thumbnails first"), "Remove")
            return
        self.session.remove_entries(indices)

    def save_to(self, path: str | Path, overwrite: bool = False) -> Path | None:
        """Save the support set; errors become notifications (returns ``None`` then)."""
        try:
            return self.session.save_support(path, overwrite=overwrite)
        except OpenSegError as err:
            report_error(err, "Save support set")
            return None

    def load_from(self, path: str | Path) -> int:
        """Add the entries of a support-set file; errors become notifications (returns 0 then)."""
        try:
            return self.session.load_support(path)
        except OpenSegError as err:
            report_error(err, "Load support set")
            return 0

    def _save_dialog(self) -> None:
        if not len(self.session.support):
            report_error(
                OpenSegError("the support set is empty: add slices before saving"), "Save support set"
            )
            return
        path, _ = QFileDialog.getSaveFileName(self, "Save support set", "support.npz", "Support sets (*.npz)")
        if path:
            if not path.lower().endswith(".npz"):
                path += ".npz"
            # the dialog has already asked before replacing an existing file
            self.save_to(path, overwrite=True)

    def _load_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load support set", "", "Support sets (*.npz)")
        if path:
            self.load_from(path)

    # --- redraw ------------------------------------------------------------------------------

    def _redraw(self, support: SupportSet) -> None:
        self.gallery.show_support(support)
        counts = support.counts()
        if not counts:
            self.counts_label.setText("Empty: paint a structure, then Add current slice.")
            return
        per_task = ", ".join(f"label {label}: {n}" for label, n in counts.items())
        sources = len({entry.source for entry in support.entries})
        self.counts_label.setText(
            f"{len(support)} entries from {sources} image{'s' if sources != 1 else ''} ({per_task})"
        )


def _refuse_a_cut_across(labels: np.ndarray, axis: int, index: int, values: list[int], name: str) -> None:
    """Refuse the slice on screen when it only cuts across slices painted along another axis."""
    crossing = painted_across(labels, axis, index, values)
    if crossing is None:
        return
    value, other, painted = crossing
    shown = ", ".join(map(str, painted[:4])) + (", ..." if len(painted) > 4 else "")
    raise OpenSegError(
        f"slice {index} along {axis_text(axis)} cuts across your painting: label {value} of '{name}' is "
        f"painted on slices {shown} along axis {other}, so here it is a line one voxel wide, not an "
        f"example. Move the view back so that the slider moves along axis {other} (View > Transpose, "
        f"or the dims order), or set Slice axis to {other} and press Add all labelled slices"
    )

"""Dock widget that segments one image layer, or every open image layer, from the support set.

The run happens in a worker thread (:mod:`._threading`) with a progress bar counting slices.
While it runs, the slices fill in batch by batch in a read-only preview (see :mod:`._preview`): a new
``"<name> (running)"`` layer that becomes the output ``"<name> openseg"`` at the end, or, when
the plugin's earlier output is to be replaced, that output layer itself. The result counts only
when the whole run has finished: Cancel or an error removes the new layer, or gives the earlier
output its earlier array back, so every layer ends as it was. Probability layers (optional) are
added at the end.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_openseg.core.device import available_devices
from napari_openseg.core.engine import CHOICES
from napari_openseg.core.extent import EXTENTS, RANGE_MARGIN, painted_range
from napari_openseg.core.support import SupportSet
from napari_openseg.errors import OpenSegError
from napari_openseg.model.registry import DEFAULT_WEIGHTS, PROPAGATION_WEIGHTS, REGISTRY, is_available

from ._controls import AxisCombo, LayerCombo, form_row, is_image
from ._layers import layer_image, owned_roles, put_output_layer, remove_owned_layers
from ._preview import Preview
from ._segment_job import Query, iter_segment_queries
from ._session import connect_widget, get_session, unwrap_viewer
from ._threading import WorkHandle, report_error, run_in_background

BATCH = "All open image layers"
WEIGHTS_FILE = "Weights file…"


class SegmentationWidget(QWidget):
    """Segment query layers with the viewer's support set.

    Signals: ``run_finished(str)`` with ``"done"``, ``"cancelled"`` or ``"failed"``;
    ``preview_updated(int)`` with the number of slices shown so far.
    """

    run_finished = Signal(str)
    preview_updated = Signal(int)

    def __init__(self, napari_viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer = unwrap_viewer(napari_viewer)
        self.session = get_session(napari_viewer)
        self._handle: WorkHandle | None = None
        self._preview = Preview(napari_viewer, output_role="segmentation")
        self._sources: list = []
        self._left_out = ""
        self._axes: list[int] = []
        self._cancel_requested = False
        self._outcome = "failed"
        self._started = 0.0

        form = QFormLayout()
        self.query_combo = form_row(
            form, "Query", LayerCombo(napari_viewer, is_image, extra_items=(BATCH,)),
            "the image to segment, or all open image layers (one output each)",
        )
        self.weights_combo = form_row(form, "Weights", QComboBox(), "network weights used for the run")
        self.weights_path = QLineEdit()
        self.weights_path.setPlaceholderText("path to a .pt weights file")
        browse = QPushButton("…")
        browse.setMaximumWidth(30)
        browse.clicked.connect(self._browse_weights)
        self._file_row = QWidget()
        row = QHBoxLayout(self._file_row)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.weights_path)
        row.addWidget(browse)
        form.addRow("", self._file_row)
        self.weights_note = QLabel()
        self.weights_note.setWordWrap(True)
        form.addRow("", self.weights_note)
        self.device_combo = form_row(form, "Device", QComboBox(), "where the network runs")
        self.device_combo.addItems(["auto", *available_devices()])
        self.support_size = form_row(
            form, "Support size S", QSpinBox(), "examples shown to the network per prediction"
        )
        self.support_size.setRange(1, 256)
        self.support_size.setValue(16)
        self.ensemble = form_row(
            form, "Ensemble K", QSpinBox(), "predictions from different support subsets, combined"
        )
        self.ensemble.setRange(1, 32)
        self.threshold = form_row(
            form, "Threshold", QDoubleSpinBox(), "minimum probability for a pixel to be labelled"
        )
        self.threshold.setRange(0.0, 1.0)
        self.threshold.setSingleStep(0.05)
        self.threshold.setValue(0.5)
        self.method_combo = form_row(
            form, "Method", QComboBox(),
            "auto: per task, the best of the network, the pixel classifier and both stacked, by "
            "cross-validation on the support set; or one of them",
        )
        self.method_combo.addItems(CHOICES)
        self.axis_combo = form_row(form, "Slice axis", AxisCombo(), "axis of a volume to segment along")
        self._add_range_rows(form)
        self.probabilities = form_row(
            form, "", QCheckBox("Add probability layers"), "one image layer per task with its probability"
        )

        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.estimate = QLabel()
        self.estimate.setWordWrap(True)
        self.estimate.setToolTip("cross-validated on the support set: each example segmented from the others")
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addWidget(self.estimate)
        layout.addStretch(1)

        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self._fill_weights()
        if self.device_combo.findText(self.session.device) >= 0:  # a second Segment widget keeps the choice
            self.device_combo.setCurrentText(self.session.device)
        self.weights_combo.currentIndexChanged.connect(self._weights_changed)
        self.weights_path.editingFinished.connect(self._weights_changed)
        self.device_combo.currentIndexChanged.connect(self._weights_changed)
        connect_widget(self.session.support_changed, self, self._support_changed)
        connect_widget(self.session.model_changed, self, self._show_model)
        self.query_combo.selection_changed.connect(self.reset_range)
        self.axis_combo.currentIndexChanged.connect(self.reset_range)
        self._weights_changed()
        self._support_changed(self.session.support)

    # --- weights -----------------------------------------------------------------------------

    def _fill_weights(self) -> None:
        self.weights_combo.addItem(DEFAULT_WEIGHTS)
        if is_available(PROPAGATION_WEIGHTS):
            self.weights_combo.addItem(PROPAGATION_WEIGHTS)
        if is_available("universeg-v1"):
            self.weights_combo.addItem("universeg-v1")
        self.weights_combo.addItem(WEIGHTS_FILE)
        self._show_weights(self.session.weights)

    def _show_weights(self, chosen: str) -> None:
        if chosen in REGISTRY:
            if self.weights_combo.findText(chosen) < 0:  # chosen by a script though not installed: show it
                self.weights_combo.insertItem(self.weights_combo.findText(WEIGHTS_FILE), chosen)
            self.weights_combo.setCurrentText(chosen)
        else:
            self.weights_combo.setCurrentText(WEIGHTS_FILE)
            self.weights_path.setText(chosen)

    def _show_model(self, weights: str, device: str) -> None:
        """Show a choice made elsewhere (a script, another widget) without sending it back."""
        for control in (self.weights_combo, self.weights_path, self.device_combo):
            control.blockSignals(True)
        try:
            self._show_weights(weights)
            if self.device_combo.findText(device) < 0:  # e.g. "cuda:1" from a script: show what runs
                self.device_combo.addItem(device)
            self.device_combo.setCurrentText(device)
        finally:
            for control in (self.weights_combo, self.weights_path, self.device_combo):
                control.blockSignals(False)
        from_file = self.weights_combo.currentText() == WEIGHTS_FILE
        shown = self.weights_path.text().strip() if from_file else self.weights_combo.currentText()
        if (shown, self.device_combo.currentText()) == (weights, device):
            self._weights_changed()  # the note and the file row; the session holds this choice already

    def set_weights(self, spec: str | Path) -> None:
        """Choose weights by registry name or file path (for scripts and tests)."""
        spec = str(spec)
        if self.weights_combo.findText(spec) >= 0 and spec != WEIGHTS_FILE:
            self.weights_combo.setCurrentText(spec)
        else:
            self.weights_path.setText(spec)
            self.weights_combo.setCurrentText(WEIGHTS_FILE)
        self._weights_changed()

    def _weights_changed(self, *_args) -> None:
        from_file = self.weights_combo.currentText() == WEIGHTS_FILE
        self._file_row.setVisible(from_file)
        spec = self.weights_path.text().strip() if from_file else self.weights_combo.currentText()
        if spec and from_file:
            spec = str(Path(spec).expanduser())  # "~/weights.pt" is a file too
        if spec:
            self.session.set_model(weights=spec, device=self.device_combo.currentText())
        if from_file:
            note = "" if not spec or Path(spec).is_file() else "this file does not exist"
        elif is_available(spec):
            entry = REGISTRY[spec]
            short_licence = entry.licence.split(";")[0].split(" (")[0]
            note = f"{'bundled' if entry.bundled else 'downloaded'}; licence: {short_licence}"
            self.weights_note.setToolTip(f"{entry.description}.\nLicence: {entry.licence}")
        else:
            note = (
                f"'{spec}' is not installed in this copy of napari-openseg: choose '{WEIGHTS_FILE}' and "
                "pick a .pt file"
            )
        self.weights_note.setText(note)

    def weights_spec(self) -> str:
        """The chosen weights as a name or a path, or an ``OpenSegError`` saying how to get some."""
        if self.weights_combo.currentText() == WEIGHTS_FILE:
            path = self.weights_path.text().strip()
            if not path:
                raise OpenSegError("choose a weights file (the … button next to Weights)")
            if not Path(path).expanduser().is_file():
                raise OpenSegError(f"weights file {path} does not exist; choose another file")
            return str(Path(path).expanduser())
        name = self.weights_combo.currentText()
        if not is_available(name):
            raise OpenSegError(
                f"the weights '{name}' are not installed in this copy of napari-openseg; choose "
                f"'{WEIGHTS_FILE}' under Weights and pick a .pt file (or reinstall napari-openseg)"
            )
        return name

    def _browse_weights(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Weights file", "", "PyTorch weights (*.pt *.pth)")
        if path:
            self.set_weights(path)

    # --- slice range and extent ------------------------------------------------------------------

    def _add_range_rows(self, form: QFormLayout) -> None:
        self.range_from, self.range_to = QSpinBox(), QSpinBox()
        self.whole_volume = QCheckBox("whole volume")
        row = QWidget()
        line = QHBoxLayout(row)
        line.setContentsMargins(0, 0, 0, 0)
        for part in (self.range_from, QLabel("to"), self.range_to, self.whole_volume):
            line.addWidget(part)
        form_row(form, "Slices", row,
                 f"volumes: segment only slices 'from' to 'to' (both included) along the slice axis; by "
                 f"default the slices painted on this image in the support set, widened by "
                 f"{RANGE_MARGIN:.0%} of their range on each side (with 'All open image layers': each "
                 "image's own painted slices)")
        self.whole_volume.toggled.connect(self._show_range_state)
        self.extent_combo = form_row(form, "Extent", QComboBox(),
                                     "auto: each label ends where it fades out on two slices in a row, "
                                     "starting from the slices painted for it; all: every slice in the range")
        self.extent_combo.addItems(list(EXTENTS))

    def reset_range(self, *_args) -> None:
        """Set the slice range to this image's painted slices plus the margin (whole volume if none)."""
        layer = self.query_combo.current()
        span = None
        if layer is not None and layer != BATCH and layer.ndim - int(getattr(layer, "rgb", False)) == 3:
            try:
                axis = self.axis_combo.axis_for(self.viewer, layer)
            except OpenSegError:
                axis = None
            if axis is not None:
                n_slices = int(np.shape(layer.data)[axis])
                for box in (self.range_from, self.range_to):
                    box.setRange(0, n_slices - 1)
                span = painted_range(self.session.support, layer.name, axis, n_slices)
                first, stop = span or (0, n_slices)
                self.range_from.setValue(first)
                self.range_to.setValue(stop - 1)
        self.whole_volume.setChecked(span is None and layer != BATCH)
        self._show_range_state()

    def _show_range_state(self, *_args) -> None:
        single = self.query_combo.current() != BATCH
        for box in (self.range_from, self.range_to):
            box.setEnabled(single and not self.whole_volume.isChecked())

    def _slices_for(self, layer, axis: int, n_slices: int) -> tuple[int, int] | None:
        if self.whole_volume.isChecked():
            return None
        if self.query_combo.current() == BATCH:
            return painted_range(self.session.support, layer.name, axis, n_slices)
        first, last = self.range_from.value(), self.range_to.value()
        if last < first:
            raise OpenSegError(f"the slice range {first} to {last} is empty: 'to' must be at least 'from'")
        return first, min(last + 1, n_slices)

    # --- running -----------------------------------------------------------------------------

    def _queries(self) -> tuple[list, list[Query], list[str]]:
        """The layers to segment, their queries, and (batch mode) the names of the open images left
        out: those that are neither 2D nor 3D (a single run refuses them with the reason)."""
        choice = self.query_combo.current()
        batch = choice == BATCH
        layers = self.query_combo.layers() if batch else [choice]
        if not layers or layers[0] is None:
            raise OpenSegError("open an image (File > Open, or File > Open Sample > OpenSeg) to segment")
        kept, queries, skipped = [], [], []
        for layer in layers:
            try:
                data, rgb = layer_image(layer)
                if batch and not 2 <= np.ndim(data) - rgb <= 3:
                    raise OpenSegError(f"layer '{layer.name}' is {np.ndim(data) - rgb}D")
            except OpenSegError as err:
                if not batch:
                    raise
                skipped.append((layer.name, str(err)))
                continue
            axis = self.axis_combo.axis_for(self.viewer, layer)
            volume = np.ndim(data) - rgb == 3
            slices = self._slices_for(layer, axis, int(np.shape(data)[axis])) if volume else None
            kept.append(layer)
            queries.append(Query(layer.name, data, rgb, axis, slices))
        if not kept:
            raise OpenSegError("no open image can be segmented: " + "; ".join(reason for _, reason in skipped))
        return kept, queries, [name for name, _ in skipped]

    def run(self) -> WorkHandle | None:
        """Start a run (returns its handle), or show what is missing and return ``None``."""
        if self._handle is not None and self._handle.running:
            report_error(OpenSegError("a run is in progress: wait for it or press Cancel"), "Segment")
            return None
        try:
            support = self.session.support
            if not len(support):
                raise OpenSegError(
                    "no support set yet: paint a structure, then press 'Add current slice' in the "
                    "Support set widget"
                )
            support.validate()
            layers, queries, skipped = self._queries()
            busy = [layer.name for layer in layers if str(layer.unique_id) in self.session.segmenting]
            if busy:
                raise OpenSegError(f"another Segment run is writing to {', '.join(busy)}: wait for it or cancel it")
            weights = self.weights_spec()
        except OpenSegError as err:
            report_error(err, "Segment")
            return None
        snapshot = self.session.support_snapshot()
        options = {
            "device": self.device_combo.currentText(),
            "support_size": self.support_size.value(),
            "ensemble": self.ensemble.value(),
            "threshold": self.threshold.value(),
            "method": self.method_combo.currentText(),
            "keep_probabilities": self.probabilities.isChecked(),
            "extent": self.extent_combo.currentText(),
        }
        self._sources = layers
        self.session.segmenting.update(str(layer.unique_id) for layer in layers)
        self._axes = [query.axis for query in queries]
        self._cancel_requested = False
        self._outcome = "failed"
        self._started = time.perf_counter()
        self._set_running(True)
        self._preview.prepare(0, layers[0])
        self._preview.draw_now()
        self._left_out = f" (left out, neither 2D nor 3D: {', '.join(skipped)})" if skipped else ""
        self.status.setText(f"Segmenting {len(layers)} image{'s' if len(layers) != 1 else ''}…{self._left_out}")
        self._handle = run_in_background(
            lambda: iter_segment_queries(queries, snapshot, weights, **options),
            "Segment",
            on_done=self._write_outputs,
            on_progress=self._show_batch,
            on_finished=self._finished,
        )
        return self._handle

    def cancel(self) -> None:
        """Stop the run after the batch in progress; nothing is written."""
        if self._handle is not None and self._handle.running:
            self._cancel_requested = True
            self._handle.cancel()
            self.status.setText("Cancelling after the current batch…")

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)

    def _show_batch(self, step) -> None:
        payload = step.payload
        if "labels" not in payload:
            return
        index = payload["query"]
        source = self._sources[index]
        if source not in self.viewer.layers:
            return
        self._preview.write(index, source, self._axes[index], payload["start"], payload["stop"], payload["labels"])
        self.preview_updated.emit(step.done)

    def _write_outputs(self, results) -> None:
        written, missing = [], []
        for index, (source, result) in enumerate(zip(self._sources, results, strict=True)):
            if source not in self.viewer.layers:  # closed during the run: nothing to attach it to
                missing.append(source.name)
                continue
            name = f"{source.name} openseg"
            layer = self._preview.promote(index, source, result.labels, name=name)
            if layer is None:
                layer = put_output_layer(self.viewer, source, result.labels, role="segmentation", name=name)
            written.append(layer)
            mapped = {f"probability:{v}" for v in result.label_values} if result.probabilities is not None else set()
            remove_owned_layers(self.viewer, [  # an earlier run's maps of tasks this run has not mapped
                stale for role, stale in owned_roles(self.viewer, source).items()
                if role.startswith("probability:") and role not in mapped
            ])
            if result.probabilities is not None:
                for value in result.label_values:
                    put_output_layer(
                        self.viewer, source, result.probability(value), role=f"probability:{value}",
                        name=f"{source.name} p(label {value})", layer_type="image",
                        colormap="magma", contrast_limits=(0.0, 1.0), blending="additive", visible=False,
                    )
        self._preview.drop()
        self._outcome = "done"
        seconds = time.perf_counter() - self._started
        text = f"Done in {seconds:.1f} s: {', '.join(layer.name for layer in written) or 'no layer'}"
        if missing:
            text += f" (skipped closed layers: {', '.join(missing)})"
        self.status.setText(text + self._left_out)
        self.show_estimates(results[0].describe_estimates() if results else [])

    def show_estimates(self, lines: list[str]) -> None:
        """Show each task's expected Dice and method (from the run's cross-validation)."""
        self.estimate.setText("\n".join(lines))

    def _finished(self) -> None:
        self.session.segmenting.difference_update(str(layer.unique_id) for layer in self._sources)
        self._preview.drop()
        if self._cancel_requested and self._outcome != "done":
            self._outcome = "cancelled"
            self.status.setText("Cancelled; no layer was changed.")
        elif self._outcome == "failed":
            self.status.setText("The run failed; see the notification.")
        self._set_running(False)
        self.run_finished.emit(self._outcome)

    def _support_changed(self, support: SupportSet) -> None:
        if self._handle is not None and self._handle.running:
            return
        self.reset_range()
        self.estimate.setText("")  # it described the support set that was
        counts = support.counts()
        self.status.setText(
            "No support set yet: build one in the support-set widget."
            if not counts
            else f"Support set: {len(support)} entries, tasks {', '.join(map(str, counts))}."
        )

"""Dock widget that segments one image layer, or every open image layer, from the support set.

The run happens in a worker thread (:mod:`._run`): the dock's progress bar counts slices and says
how long is left, and the status line says beforehand what to expect (:mod:`napari_openseg.core.segment.expected_time`).
Closing the query image or the dock cancels the run. While it runs, the slices fill in batch by batch in a read-only preview (see :mod:`._preview`): a new
``"<name> (running)"`` layer that becomes the output ``"<name> openseg"`` at the end, or, when
the plugin's earlier output is to be replaced, that output layer itself. The result counts only
when the whole run has finished: Cancel or an error removes the new layer, or gives the earlier
output its earlier array back, so every layer ends as it was. Probability layers (optional) are
added at the end.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_openseg._widgets._controls import (
    AxisCombo,
    Collapsible,
    LayerCombo,
    dock_layout,
    form_row,
    fraction_box,
    is_image,
)
from napari_openseg._widgets._layers import layer_image, owned_roles, put_output_layer, remove_owned_layers
from napari_openseg._widgets._model_picker import ModelPicker
from napari_openseg._widgets._preview import Preview
from napari_openseg._widgets._run import RunPanel
from napari_openseg._widgets._segment_job import Query, iter_segment_queries
from napari_openseg._widgets._session import connect_widget, get_session, unwrap_viewer
from napari_openseg._widgets._threading import WorkHandle
from napari_openseg.core.engine_settings import CHOICES, EXTENTS, SegmentSettings
from napari_openseg.core.segment.expected_time import (
    GRID_PIXELS,
    describe_check,
    describe_expected_time,
    format_duration,
    per_slice_phrase,
    seconds_per_slice,
)
from napari_openseg.core.segment.extent import RANGE_MARGIN, painted_range
from napari_openseg.core.support import SupportSet
from napari_openseg.errors import OpenSegError

BATCH = "All open image layers"


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
        self._preview = Preview(napari_viewer, output_role="segmentation")
        self._sources: list = []
        self._left_out = ""
        self._axes: list[int] = []

        form = QFormLayout()
        self.query_combo = form_row(
            form,
            "Query",
            LayerCombo(napari_viewer, is_image, extra_items=(BATCH,)),
            "the image to segment, or all open image layers (one output each)",
        )
        self.picker = ModelPicker(self.session)
        self.model_section = self.picker.section()
        self.settings_section = Collapsible("Settings", self._settings_form())
        self.run_button = QPushButton("Run")
        self.panel = RunPanel("Segment", host=self, unit="slices")
        self.status = self.panel.status
        self.estimate = QLabel()
        self.estimate.setWordWrap(True)
        self.estimate.setToolTip("cross-validated on the support set: each example segmented from the others")

        layout = QVBoxLayout()
        layout.addLayout(form)
        layout.addWidget(self.model_section)
        layout.addWidget(self.settings_section)
        layout.addWidget(self.run_button)
        layout.addWidget(self.status)
        layout.addWidget(self.estimate)
        layout.addStretch(1)
        dock_layout(self, layout, footer=self.panel)

        self.run_button.clicked.connect(self.run)
        self.panel.running_changed.connect(lambda _running: self._update_run_button())
        self.panel.finished.connect(self._finished)
        for spin in (self.support_size, self.ensemble):
            spin.valueChanged.connect(self._show_expected)
        for control in (self.support_size, self.ensemble, self.threshold):
            control.valueChanged.connect(self._title_settings)
        self.method_combo.currentTextChanged.connect(self._title_settings)
        self.method_combo.currentTextChanged.connect(self._show_expected)
        self._title_settings()
        connect_widget(self.session.support_changed, self, self._support_changed)
        self.query_combo.selection_changed.connect(self.reset_range)
        self.query_combo.selection_changed.connect(self._show_expected)
        self.axis_combo.currentIndexChanged.connect(self.reset_range)
        self._support_changed(self.session.support)

    @property
    def cancel_button(self) -> QPushButton:
        return self.panel.cancel_button

    def _settings_form(self) -> QFormLayout:
        defaults = SegmentSettings()
        form = QFormLayout()
        self.support_size = form_row(
            form, "Support size S", QSpinBox(), "examples shown to the network per prediction"
        )
        self.support_size.setRange(1, 256)
        self.support_size.setValue(defaults.support_size)
        self.ensemble = form_row(
            form,
            "Ensemble K",
            QSpinBox(),
            "predictions from K different draws of S entries, combined; K times slower, and it changes "
            "something only for tasks with more entries than S. Measured: a larger S gains more for less "
            "time (docs/user-guide.md, Speed)",
        )
        self.ensemble.setRange(1, 32)
        self.ensemble.setValue(defaults.ensemble)
        self.expected = QLabel()
        self.expected.setWordWrap(True)
        form.addRow("", self.expected)
        self.threshold = form_row(
            form,
            "Threshold",
            fraction_box(defaults.threshold),
            "minimum probability for a pixel to be labelled",
        )
        self.method_combo = form_row(
            form,
            "Method",
            QComboBox(),
            "auto: per task, the best of the network, the pixel classifier and both stacked, by "
            "cross-validation on the support set; or one of them",
        )
        self.method_combo.addItems(CHOICES)
        self.method_combo.setCurrentText(defaults.method)
        self.axis_combo = form_row(form, "Slice axis", AxisCombo(), "axis of a volume to segment along")
        self._add_range_rows(form)
        self.probabilities = form_row(
            form, "", QCheckBox("Add probability layers"), "one image layer per task with its probability"
        )
        return form

    def _title_settings(self, *_args) -> None:
        self.settings_section.set_title(
            f"Settings: S={self.support_size.value()}, K={self.ensemble.value()}, "
            f"threshold {self.threshold.value():.2f}, {self.method_combo.currentText()}"
        )

    def set_weights(self, spec) -> None:
        """Choose weights by registry name or file path (for scripts and tests)."""
        self.picker.set_weights(spec)

    def settings(self) -> SegmentSettings:
        """The settings as the controls show them (the others at their defaults)."""
        return SegmentSettings(
            support_size=self.support_size.value(),
            ensemble=self.ensemble.value(),
            threshold=self.threshold.value(),
            method=self.method_combo.currentText(),
            extent=self.extent_combo.currentText(),
        )

    def weights_spec(self) -> str:
        """The chosen weights as a name or a path, or an ``OpenSegError`` saying how to get some."""
        return self.picker.weights_spec()

    # --- slice range and extent ------------------------------------------------------------------

    def _add_range_rows(self, form: QFormLayout) -> None:
        self.range_from, self.range_to = QSpinBox(), QSpinBox()
        self.whole_volume = QCheckBox("whole volume")
        row = QWidget()
        line = QHBoxLayout(row)
        line.setContentsMargins(0, 0, 0, 0)
        for part in (self.range_from, QLabel("to"), self.range_to, self.whole_volume):
            line.addWidget(part)
        form_row(
            form,
            "Slices",
            row,
            f"volumes: segment only slices 'from' to 'to' (both included) along the slice axis; by "
            f"default the slices painted on this image in the support set, widened by "
            f"{RANGE_MARGIN:.0%} of their range on each side (with 'All open image layers': each "
            "image's own painted slices)",
        )
        self.whole_volume.toggled.connect(self._show_range_state)
        self.extent_combo = form_row(
            form,
            "Extent",
            QComboBox(),
            "auto: each label ends where it fades out on two slices in a row, "
            "starting from the slices painted for it; all: every slice in the range",
        )
        self.extent_combo.addItems(list(EXTENTS))
        self.extent_combo.setCurrentText(SegmentSettings().extent)

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
            raise OpenSegError("open an image (File > Open, or File > Open Sample) to segment")
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
            raise OpenSegError(
                "no open image can be segmented: " + "; ".join(reason for _, reason in skipped)
            )
        return kept, queries, [name for name, _ in skipped]

    def _update_run_button(self) -> None:
        self.run_button.setEnabled(not self.panel.running and len(self.session.support) > 0)
        self.run_button.setToolTip(
            "segment the query from the support set"
            if len(self.session.support)
            else "build a support set first (Support set widget: paint, then Add current slice)"
        )

    def _show_expected(self, *_args) -> None:
        """The expected time per slice for the settings and support set as they are now."""
        counts = self.session.support.counts()
        if not counts:
            self.expected.setText("")
            return
        size, method = self.support_size.value(), self.method_combo.currentText()
        try:
            pixels = _mean_pixels(self._queries()[1])
        except OpenSegError:  # no image to segment yet: slices the size of the model's grid
            pixels = GRID_PIXELS
        per_slice = seconds_per_slice(counts, size, self.ensemble.value(), method, pixels)
        once = describe_check(counts, size, method)
        self.expected.setText(
            f"{per_slice_phrase(per_slice, counts, method)} on one CPU thread (measured)"
            + (f", plus {once}" if once else "")
        )

    def run(self) -> WorkHandle | None:
        """Start a run (returns its handle), or show what is missing and return ``None``."""
        if self.panel.running:
            self.panel.refuse("a run is in progress: wait for it or press Cancel")
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
                raise OpenSegError(
                    f"another Segment run is writing to {', '.join(busy)}: wait for it or cancel it"
                )
            weights = self.picker.weights_spec()
            device = self.picker.device()
            on_gpu = _resolved_type(device) != "cpu"
            settings = self.settings()
        except OpenSegError as err:
            self.panel.refuse(err)
            return None
        snapshot = self.session.support_snapshot()
        options = {**asdict(settings), "device": device, "keep_probabilities": self.probabilities.isChecked()}
        expected = describe_expected_time(
            sum(query.n_slices for query in queries),
            snapshot.counts(),
            settings.support_size,
            settings.ensemble,
            on_gpu=on_gpu,
            method=settings.method,
            pixels=_mean_pixels(queries),
        )
        self._sources = layers
        self.session.segmenting.update(str(layer.unique_id) for layer in layers)
        self._axes = [query.axis for query in queries]
        self._preview.prepare(0, layers[0])
        self._preview.draw_now()
        self._left_out = f" (left out, neither 2D nor 3D: {', '.join(skipped)})" if skipped else ""
        count = f"{len(layers)} image{'s' if len(layers) != 1 else ''}"
        return self.panel.start(
            lambda: iter_segment_queries(queries, snapshot, weights, **options),
            on_done=self._write_outputs,
            on_progress=self._show_batch,
            message=f"Segmenting {count}: {expected}.{self._left_out}",
            watch=layers,
            viewer=self.viewer,
        )

    def cancel(self) -> None:
        """Stop the run after the batch in progress; nothing is written."""
        self.panel.cancel()

    def _show_batch(self, step) -> None:
        payload = step.payload
        if "labels" not in payload:
            return
        index = payload["query"]
        source = self._sources[index]
        if source not in self.viewer.layers:
            return
        self._preview.write(
            index, source, self._axes[index], payload["start"], payload["stop"], payload["labels"]
        )
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
            mapped = (
                {f"probability:{v}" for v in result.label_values}
                if result.probabilities is not None
                else set()
            )
            remove_owned_layers(
                self.viewer,
                [  # an earlier run's maps of tasks this run has not mapped
                    stale
                    for role, stale in owned_roles(self.viewer, source).items()
                    if role.startswith("probability:") and role not in mapped
                ],
            )
            if result.probabilities is not None:
                for value in result.label_values:
                    put_output_layer(
                        self.viewer,
                        source,
                        result.probability(value),
                        role=f"probability:{value}",
                        name=f"{source.name} p(label {value})",
                        layer_type="image",
                        colormap="magma",
                        contrast_limits=(0.0, 1.0),
                        blending="additive",
                        visible=False,
                    )
        self._preview.drop()
        text = f"Done in {format_duration(self.panel.elapsed)}: {', '.join(layer.name for layer in written) or 'no layer'}"
        if missing:
            text += f" (skipped closed layers: {', '.join(missing)})"
        self.panel.set_status(text + self._left_out)
        self.show_estimates(results[0].describe_estimates() if results else [])

    def show_estimates(self, lines: list[str]) -> None:
        """Show each task's expected Dice and method (from the run's cross-validation)."""
        self.estimate.setText("\n".join(lines))

    def _finished(self, outcome: str) -> None:
        self.session.segmenting.difference_update(str(layer.unique_id) for layer in self._sources)
        self._preview.drop()
        self.run_finished.emit(outcome)

    def _support_changed(self, support: SupportSet) -> None:
        self._update_run_button()
        self._show_expected()
        if self.panel.running:
            return
        self.reset_range()
        self.estimate.setText("")  # it described the support set that was
        counts = support.counts()
        self.status.setText(
            "No support set yet: build one in the support-set widget."
            if not counts
            else f"Support set: {len(support)} entries, tasks {', '.join(map(str, counts))}."
        )


def _resolved_type(device: str) -> str:
    """``"cpu"``, ``"cuda"`` or ``"mps"``: where ``device`` (``"auto"`` included) runs here."""
    from napari_openseg.core.device import resolve_device

    return resolve_device(device).type


def _mean_pixels(queries: list[Query]) -> int:
    """Pixels per slice over the queries' slices (what the classifier's time per slice follows)."""
    slices = sum(query.n_slices for query in queries)
    return round(sum(query.n_slices * query.pixels for query in queries) / max(1, slices))

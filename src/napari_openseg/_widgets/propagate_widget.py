"""Dock widget: paint an object on one slice of a volume and carry it through the whole volume.

It reads an image layer and the user's labels layer holding the painted prompt(s), runs
:func:`~napari_openseg.core.propagate.propagation.iter_propagate` in a worker (:mod:`._run`: progress bar with
the time left, Cancel; closing the image or the dock cancels), and writes the result into the
plugin's own labels layer ``"<image> propagated"``, never into the painted layer. While it runs, a
preview layer fills in slice by slice and the confidence plot grows. Correction loop: fix any slice
of the output layer (start with "Go to least confident slice"), then press "Run again with
corrections": the fixed slices become pinned prompts and the result replaces that same layer (the
fixes are in it, as prompts), which is selected so that the current output is the obvious one.
Weights and device are the viewer's session choice, shown (and changed) in the Model section.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_openseg._widgets._confidence_plot import ConfidencePlot
from napari_openseg._widgets._controls import (
    AxisCombo,
    Collapsible,
    LayerCombo,
    dock_layout,
    form_row,
    fraction_box,
    is_image,
    is_user_labels,
    parse_label_values,
)
from napari_openseg._widgets._layers import current_slice, layer_image, put_output_layer, remove_owned_layers
from napari_openseg._widgets._model_picker import ModelPicker
from napari_openseg._widgets._run import RunPanel
from napari_openseg._widgets._session import get_session, unwrap_viewer
from napari_openseg._widgets._threading import WorkHandle, report_error
from napari_openseg.core.propagate.fronts import DIRECTIONS
from napari_openseg.core.propagate.memory import DEFAULT_CAPACITY
from napari_openseg.core.propagate.propagation import PropagationResult, iter_propagate
from napari_openseg.core.propagate.settings import (
    DEFAULT_CLASSIFIER_STOP,
    DEFAULT_PIXEL_CLASSIFIER,
    DEFAULT_STOP_CONFIDENCE,
    DEFAULT_STOP_RATIO,
    PIXEL_CLASSIFIER_MODES,
)
from napari_openseg.core.segment.expected_time import format_duration
from napari_openseg.errors import OpenSegError
from napari_openseg.model.registry import DEFAULT_WEIGHTS, PROPAGATION_WEIGHTS, propagation_weights

ROLE, PREVIEW_ROLE = "propagation", "propagation-preview"
#: The stop controls' labels, also named in the hint after a run that stopped on low confidence.
STOP_RATIO_LABEL, STOP_CONFIDENCE_LABEL = "Stop below × first slice", "Stop below confidence"
CLASSIFIER_STOP_LABEL = "Stop below classifier agreement"


class PropagationWidget(QWidget):
    """Propagate painted prompts through a volume.

    Signals: ``run_finished(str)`` with ``"done"``, ``"cancelled"``, ``"failed"`` or ``"closed"`` (the
    image was closed during the run);
    ``preview_updated(int)`` with the number of steps shown so far.
    """

    run_finished = Signal(str)
    preview_updated = Signal(int)

    def __init__(self, napari_viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer = unwrap_viewer(napari_viewer)
        self.session = get_session(napari_viewer)
        self.result: PropagationResult | None = None
        self.output = None
        self._run: dict = {}  # inputs of the last finished run: corrections and navigation refer to it
        self._pending: dict = {}  # inputs of the run in progress
        self._preview = None

        form = QFormLayout()
        self.image_combo = form_row(
            form, "Image", LayerCombo(napari_viewer, is_image), "the volume to segment"
        )
        self.prompt_combo = form_row(
            form,
            "Painted prompt",
            LayerCombo(napari_viewer, is_user_labels),
            "your labels layer with the object painted on one or more slices (it is never changed)",
        )
        self.picker = ModelPicker(self.session, explain=_propagation_note)
        self.model_section = self.picker.section()
        self.settings_section = Collapsible("Settings", self._settings_form())

        self.run_button = QPushButton("Run")
        self.again_button = QPushButton("Run again with corrections")
        self.again_button.setToolTip("fix slices in the output layer first; they become pinned prompts")
        self.weakest_button = QPushButton("Go to least confident slice")
        self.plot = ConfidencePlot()
        self.panel = RunPanel("Propagate", host=self, unit="slices")
        self.status = self.panel.status
        buttons = QHBoxLayout()
        for button in (self.run_button, self.again_button):
            buttons.addWidget(button)
        layout = QVBoxLayout()
        layout.addLayout(form)
        layout.addWidget(self.model_section)
        layout.addWidget(self.settings_section)
        layout.addLayout(buttons)
        layout.addWidget(QLabel("Confidence per slice"))
        layout.addWidget(self.plot)
        layout.addWidget(self.weakest_button)
        layout.addWidget(self.status)
        layout.addStretch(1)
        dock_layout(self, layout, footer=self.panel)

        self.run_button.clicked.connect(lambda: self.run())
        self.again_button.clicked.connect(lambda: self.run(corrections=True))
        self.weakest_button.clicked.connect(self.go_to_least_confident)
        self.plot.slice_clicked.connect(self.go_to_slice)
        self.panel.running_changed.connect(self._set_running)
        self.panel.finished.connect(self._finished)
        self.bank_size.valueChanged.connect(self._title_settings)
        self.stop_confidence.valueChanged.connect(self._title_settings)
        self.stop_ratio.valueChanged.connect(self._title_settings)
        self.classifier_stop.valueChanged.connect(self._title_settings)
        self.pixel_classifier.currentTextChanged.connect(self._title_settings)
        self._title_settings()
        napari_viewer.dims.events.current_step.connect(self._follow_slider)
        self.destroyed.connect(
            lambda *_: napari_viewer.dims.events.current_step.disconnect(self._follow_slider)
        )
        self._set_running(False)

    @property
    def cancel_button(self) -> QPushButton:
        return self.panel.cancel_button

    def _title_settings(self, *_args) -> None:
        stops = [f"{self.stop_ratio.value():.2f} x first slice"] if self.stop_ratio.value() > 0 else []
        if self.stop_confidence.value() > 0:
            stops.append(f"{self.stop_confidence.value():.2f}")
        stop = f"stop below {' or '.join(stops)}" if stops else "no confidence stop"
        if self.classifier_stop.value() > 0 and self.pixel_classifier.currentText() != "never":
            stop += f", classifier agreement {self.classifier_stop.value():.2f}"
        self.settings_section.set_title(f"Settings: bank {self.bank_size.value()}, {stop}")

    def _settings_form(self) -> QFormLayout:
        form = QFormLayout()
        self.label_values = form_row(
            form,
            "Label values",
            QLineEdit(),
            "comma-separated label values to propagate (empty: every painted one)",
        )
        self.label_values.setPlaceholderText("all painted labels")
        self.bank_size = form_row(form, "Memory bank size", QSpinBox(), "M: slices remembered per object")
        self.bank_size.setRange(1, 256)
        self.bank_size.setValue(DEFAULT_CAPACITY)
        self.axis_combo = form_row(form, "Slice axis", AxisCombo(), "the axis to propagate along")
        self.direction_combo = form_row(
            form,
            "Direction",
            QComboBox(),
            "from each painted slice: both ways, or towards higher/lower indices",
        )
        self.direction_combo.addItems(list(DIRECTIONS))
        self.stop_ratio = form_row(
            form,
            STOP_RATIO_LABEL,
            fraction_box(DEFAULT_STOP_RATIO, top=0.99),
            "an object ends after two slices whose confidence is below this fraction of the first "
            "slice its front predicted (0: off); lower it if a structure stops too early",
        )
        self.stop_confidence = form_row(
            form,
            STOP_CONFIDENCE_LABEL,
            fraction_box(DEFAULT_STOP_CONFIDENCE),
            "an object also ends after two slices less confident than this (0: off)",
        )
        self.pixel_classifier = form_row(
            form,
            "Pixel classifier",
            QComboBox(),
            "join a pixel classifier fitted to the painted slices to the network: auto = where it "
            "segments held-out halves of the painted slices well (objects defined by their intensity)",
        )
        self.pixel_classifier.addItems(list(PIXEL_CLASSIFIER_MODES))
        self.pixel_classifier.setCurrentText(DEFAULT_PIXEL_CLASSIFIER)
        self.classifier_stop = form_row(
            form,
            CLASSIFIER_STOP_LABEL,
            fraction_box(DEFAULT_CLASSIFIER_STOP, top=0.99),
            "where the pixel classifier joins, an object ends after two slices where its mask and the "
            "network's agree less than this (Dice), in place of the confidence stops (0: off)",
        )
        self.unordered = form_row(
            form,
            "",
            QCheckBox("Slices are unrelated 2D images"),
            "one-prompt segmentation of a stack: images are taken in order of similarity, not stack order",
        )
        return form

    # --- running -----------------------------------------------------------------------------

    def _inputs(self, corrections: bool) -> dict:
        source = self.image_combo.current()
        painted = self.prompt_combo.current()
        if source is None:
            raise OpenSegError("open a volume (File > Open) to propagate through")
        image, rgb = layer_image(source)
        axis = self.axis_combo.axis_for(self.viewer, source)
        values = parse_label_values(self.label_values.text())
        if corrections:
            if self.result is None:
                raise OpenSegError("run once first, then fix slices in the output layer and run again")
            if self.output is None or self.output not in self.viewer.layers:
                raise OpenSegError(
                    "the output layer of the last run was closed: run again from the painted "
                    "prompt, then fix slices in its output"
                )
            if self._run.get("source") is not source:
                raise OpenSegError(
                    f"the last run was on '{self._run['source'].name}': choose that image again"
                )
            edited = np.asarray(self.output.data)
            changed = self.result.changed_slices(edited)
            if not changed:
                raise OpenSegError(
                    f"no slice of '{self.output.name}' was changed: fix a slice there first "
                    "(try 'Go to least confident slice')"
                )
            prompt, complete = self.result.with_corrections(self._run["prompt"], edited, changed)
            axis = self.result.axis
        else:
            if painted is None:
                raise OpenSegError("add a labels layer and paint the object on one slice (the prompt)")
            prompt, complete = np.array(painted.data), []
        return {
            "source": source,
            "image": np.asarray(image),
            "rgb": rgb,
            "prompt": prompt,
            "complete": complete,
            "axis": axis,
            "values": values,
        }

    def run(self, corrections: bool = False) -> WorkHandle | None:
        """Start a run (returns its handle), or show what is missing and return ``None``."""
        if self.panel.running:
            self.panel.refuse("a run is in progress: wait for it or press Cancel")
            return None
        try:
            self._pending = run = self._inputs(corrections)
            weights = propagation_weights(self.picker.weights_spec())
        except OpenSegError as err:
            self.panel.refuse(err)
            return None
        run["corrections"] = corrections
        run["live"] = np.full(np.shape(run["image"])[run["axis"]] if run["image"].ndim > 2 else 0, np.nan)
        options = {
            "axis": run["axis"],
            "label_values": run["values"],
            "complete_slices": run["complete"],
            "bank_size": self.bank_size.value(),
            "direction": self.direction_combo.currentText(),
            "stop_confidence": self.stop_confidence.value(),
            "stop_ratio": self.stop_ratio.value(),
            "pixel_classifier": self.pixel_classifier.currentText(),
            "classifier_stop": self.classifier_stop.value(),
            "unordered": self.unordered.isChecked(),
            "device": self.picker.device(),
            "rgb": run["rgb"],
        }
        if corrections:  # its fixes are this run's prompts: no painting on it until the result replaces it
            self.output.editable = False
        return self.panel.start(
            lambda: iter_propagate(run["image"], run["prompt"], weights, **options),
            on_done=self._show_result,
            on_progress=self._show_step,
            message=f"Propagating through '{run['source'].name}' with {Path(weights).name}…",
            watch=[run["source"]],
            viewer=self.viewer,
        )

    def cancel(self) -> None:
        """Stop after the slice in progress; no layer is changed."""
        self.panel.cancel()

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.again_button.setEnabled(not running and self.result is not None)
        self.weakest_button.setEnabled(not running and self.result is not None)

    def _show_step(self, step) -> None:
        payload = step.payload
        source = self._pending.get("source")
        if "slice" not in payload or source not in self.viewer.layers:
            return
        s, live = payload["slice"], self._pending["live"]
        live[s] = np.fmin(live[s], payload["confidence"]) if np.isfinite(live[s]) else payload["confidence"]
        self.plot.set_values(live)
        if self._preview is None:
            prompt = self._pending["prompt"]  # its type holds every label value painted in it
            self._preview = put_output_layer(
                self.viewer,
                source,
                np.zeros(prompt.shape, prompt.dtype),
                role=PREVIEW_ROLE,
                name=f"{source.name} (propagating)",
                opacity=0.5,
            )
            self._preview.editable = False  # strokes on a layer that is dropped at the end would be lost
        plane = np.moveaxis(self._preview.data, self._pending["axis"], 0)[s]
        plane[payload["mask"]] = payload["label"]
        self._preview.refresh()
        self.preview_updated.emit(step.done)

    def _show_result(self, result: PropagationResult) -> None:
        self._drop_preview()
        source = self._pending["source"]
        if source not in self.viewer.layers:
            self.panel.set_outcome("closed", f"'{source.name}' was closed during the run; nothing was added")
            return
        corrected = (
            self.output if self._pending["corrections"] and self.output in self.viewer.layers else None
        )
        self._run, self.result = self._pending, result
        # A copy: painting on the layer must not change the result that corrections are found against.
        if corrected is not None:  # the layer the fixes were painted on: this run is its next version
            corrected.data = result.labels.copy()
            corrected.editable = True
            self.output = corrected
        else:
            self.output = put_output_layer(
                self.viewer, source, result.labels.copy(), role=ROLE, name=f"{source.name} propagated"
            )
        self.viewer.layers.selection.active = self.output  # the current output, where fixes go
        self.plot.set_values(result.slice_confidence())
        weakest = result.least_confident_slice()
        text = f"Done in {format_duration(self.panel.elapsed)}: '{self.output.name}' (selected)."
        if weakest is not None:
            text += (
                f" Least confident: slice {weakest} ({result.slice_confidence()[weakest]:.2f}). Fix slices "
                f"in '{self.output.name}', then press 'Run again with corrections'."
            )
        hint = result.confidence_stop_hint(
            {
                f"'{STOP_RATIO_LABEL}'": self.stop_ratio.value(),
                f"'{STOP_CONFIDENCE_LABEL}'": self.stop_confidence.value(),
            },
            f"'{CLASSIFIER_STOP_LABEL}'",
        )
        for note in (result.classifier_note(), hint):
            if note:
                text += " " + note
        self.panel.set_status(text)

    def _finished(self, outcome: str) -> None:
        self._drop_preview()
        if self._pending.get("corrections") and self.output is not None:
            self.output.editable = True
        if outcome != "done":  # the plot shows the last finished run again, as navigation does
            self.plot.set_values(self.result.slice_confidence() if self.result is not None else [])
        self.run_finished.emit(outcome)

    def _drop_preview(self) -> None:
        remove_owned_layers(self.viewer, [self._preview])
        self._preview = None

    # --- navigation --------------------------------------------------------------------------

    def go_to_least_confident(self) -> int | None:
        """Move the viewer to the weakest slice and select the output layer for fixing."""
        weakest = self.result.least_confident_slice() if self.result is not None else None
        if weakest is None:
            report_error(OpenSegError("no confidence yet: run a propagation first"), "Propagate")
            return None
        self.go_to_slice(weakest)
        if self.output is not None and self.output in self.viewer.layers:
            self.viewer.layers.selection.active = self.output
        return weakest

    def go_to_slice(self, index: int) -> None:
        source = self._run.get("source")
        if self.result is None or self.panel.running:
            return  # while a run goes on, the plot shows it, not the finished run navigation refers to
        if source not in self.viewer.layers:
            report_error(OpenSegError(f"'{source.name}', the image of the last run, was closed"), "Propagate")
            return
        axis = self.result.axis
        offset = self.viewer.dims.ndim - source.ndim
        point = np.asarray(source.world_to_data(np.asarray(self.viewer.dims.point)[offset:]), float)
        point[axis] = index
        self.viewer.dims.set_point(offset + axis, float(np.asarray(source.data_to_world(point))[axis]))
        self.plot.set_current(index)

    def _follow_slider(self, event=None) -> None:
        source = self._run.get("source")
        if self.result is None or source not in self.viewer.layers:
            return
        try:
            self.plot.set_current(current_slice(self.viewer, source, self.result.axis))
        except OpenSegError:
            self.plot.set_current(None)


def _propagation_note(spec: str) -> str:
    """What the Model section says about the weights in this widget."""
    if spec == DEFAULT_WEIGHTS:
        return f"Propagation runs {PROPAGATION_WEIGHTS} for {DEFAULT_WEIGHTS} (docs/propagation.md)."
    return ""

"""The weights and device choice that every widget shows: the viewer session's, in one control.

Each widget that runs a network holds a :class:`ModelPicker`; all of them show (and change) the
same :class:`~._session.Session` choice, so weights picked in Propagate are the ones Evaluate and
Segment use, and a script's ``session.set_model(...)`` shows everywhere. Nothing is loaded here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from magicgui.widgets import FileEdit
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QComboBox, QFormLayout, QLabel, QWidget

from napari_openseg._widgets._controls import Collapsible, form_row
from napari_openseg._widgets._session import connect_widget
from napari_openseg.core.device import available_devices
from napari_openseg.errors import OpenSegError
from napari_openseg.model.registry import DEFAULT_WEIGHTS, REGISTRY, is_available

WEIGHTS_FILE = "Weights file…"


class ModelPicker(QWidget):
    """Weights (a registry name or a ``.pt`` file) and device, kept equal to the session's choice.

    Parameters
    ----------
    session
        The viewer's :class:`~._session.Session`.
    explain
        Optional: a sentence about the chosen weights for this widget (for example which weights
        propagation runs with), shown under the choice.

    Signal ``changed(str)``: a one-line summary of the choice (``"openseg-default on auto"``).
    """

    changed = Signal(str)

    def __init__(self, session, explain: Callable[[str], str] | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        self.session = session
        self._explain = explain
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        self.weights_combo = form_row(form, "Weights", QComboBox(), "network weights used for the run")
        self.weights_file = FileEdit(mode="r", filter="PyTorch weights (*.pt *.pth)")
        self.weights_file.native.setToolTip("a .pt weights file")
        form.addRow("", self.weights_file.native)
        self.weights_note = QLabel()
        self.weights_note.setWordWrap(True)
        form.addRow("", self.weights_note)
        self.device_combo = form_row(form, "Device", QComboBox(), "where the network runs")
        self.device_combo.addItems(["auto", *available_devices()])

        for name in (DEFAULT_WEIGHTS, *(n for n in REGISTRY if n != DEFAULT_WEIGHTS)):
            if name == DEFAULT_WEIGHTS or is_available(name):
                self.weights_combo.addItem(name)
        self.weights_combo.addItem(WEIGHTS_FILE)
        self._show_weights(session.weights)
        if self.device_combo.findText(session.device) < 0:  # e.g. "cuda:1" from a script
            self.device_combo.addItem(session.device)
        self.device_combo.setCurrentText(session.device)
        self.weights_combo.currentIndexChanged.connect(self._choice_changed)
        self.weights_file.changed.connect(self._choice_changed)
        self.device_combo.currentIndexChanged.connect(self._choice_changed)
        connect_widget(session.model_changed, self, self._show_model)
        self._choice_changed()

    # --- showing the session's choice ----------------------------------------------------------

    def _file_text(self) -> str:
        return str(self.weights_file.line_edit.value).strip()

    def _show_weights(self, chosen: str) -> None:
        if chosen in REGISTRY:
            if self.weights_combo.findText(chosen) < 0:  # chosen by a script though not installed: show it
                self.weights_combo.insertItem(self.weights_combo.findText(WEIGHTS_FILE), chosen)
            self.weights_combo.setCurrentText(chosen)
        else:
            self.weights_combo.setCurrentText(WEIGHTS_FILE)
            self.weights_file.line_edit.value = chosen

    def _show_model(self, weights: str, device: str) -> None:
        """Show a choice made elsewhere (a script, another widget) without sending it back."""
        with self.weights_file.changed.blocked():
            for control in (self.weights_combo, self.device_combo):
                control.blockSignals(True)
            try:
                self._show_weights(weights)
                if self.device_combo.findText(device) < 0:  # e.g. "cuda:1" from a script: show what runs
                    self.device_combo.addItem(device)
                self.device_combo.setCurrentText(device)
            finally:
                for control in (self.weights_combo, self.device_combo):
                    control.blockSignals(False)
        if (self._spec(), self.device_combo.currentText()) == (weights, device):
            self._choice_changed()  # the note and the file row; the session holds this choice already

    def _spec(self) -> str:
        """The weights as shown: a name, or a file path (``~`` expanded), or ``""``."""
        if self.weights_combo.currentText() != WEIGHTS_FILE:
            return self.weights_combo.currentText()
        text = self._file_text()
        return str(Path(text).expanduser()) if text and text != "." else ""

    def _choice_changed(self, *_args) -> None:
        from_file = self.weights_combo.currentText() == WEIGHTS_FILE
        self.weights_file.native.setVisible(from_file)
        spec = self._spec()
        if spec:
            self.session.set_model(weights=spec, device=self.device_combo.currentText())
        if from_file:
            note = "" if not spec or Path(spec).is_file() else "this file does not exist"
            self.weights_note.setToolTip(spec)
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
        extra = self._explain(spec) if self._explain is not None and spec else ""
        self.weights_note.setText(" ".join(part for part in (note, extra) if part))
        self.changed.emit(self.summary())

    # --- for widgets, scripts and tests --------------------------------------------------------

    def section(self) -> Collapsible:
        """This picker folded under a "Model: <summary>" title that follows the choice."""
        section = Collapsible("Model", self)
        self.changed.connect(lambda text: section.set_title(f"Model: {text}"))
        section.set_title(f"Model: {self.summary()}")
        return section

    def summary(self) -> str:
        """``"<weights> on <device>"``, with a file shown by its name."""
        spec = self._spec() or "no weights"
        shown = Path(spec).name if self.weights_combo.currentText() == WEIGHTS_FILE else spec
        return f"{shown} on {self.device_combo.currentText()}"

    def set_weights(self, spec: str | Path) -> None:
        """Choose weights by registry name or file path."""
        spec = str(spec)
        if self.weights_combo.findText(spec) >= 0 and spec != WEIGHTS_FILE:
            self.weights_combo.setCurrentText(spec)
        else:
            with self.weights_file.changed.blocked():
                self.weights_file.line_edit.value = spec
            self.weights_combo.setCurrentText(WEIGHTS_FILE)
        self._choice_changed()

    def weights_spec(self) -> str:
        """The chosen weights as a name or a path, or an ``OpenSegError`` saying how to get some."""
        if self.weights_combo.currentText() == WEIGHTS_FILE:
            path = self._spec()
            if not path:
                raise OpenSegError("choose a weights file (the button next to Weights)")
            if not Path(path).is_file():
                raise OpenSegError(f"weights file {path} does not exist; choose another file")
            return path
        name = self.weights_combo.currentText()
        if not is_available(name):
            raise OpenSegError(
                f"the weights '{name}' are not installed in this copy of napari-openseg; choose "
                f"'{WEIGHTS_FILE}' under Weights and pick a .pt file (or reinstall napari-openseg)"
            )
        return name

    def device(self) -> str:
        return self.device_combo.currentText()

"""Dock widget: how well do the weights segment a labelled folder, next to three baselines?

The widget door of ``openseg evaluate`` (:func:`~napari_openseg.evaluation.evaluate.iter_evaluate`):
pick a folder (``images/`` + ``masks/`` or ``imagesTr/`` + ``labelsTr/``, see docs/evaluation.md),
choose S, K and the seed, run it in a worker (progress bar, Cancel) and read the Dice table; the
report can be saved as the same JSON file the command line writes. It reads and writes no layers.
Weights and device are the viewer's session choice (set in the Segment widget).
"""

from __future__ import annotations

from pathlib import Path

from qtpy.QtCore import Signal
from qtpy.QtGui import QFontDatabase
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_openseg.errors import OpenSegError
from napari_openseg.evaluation.evaluate import EvaluationReport, iter_evaluate

from ._controls import form_row, parse_label_values
from ._session import get_session, unwrap_viewer
from ._threading import WorkHandle, report_error, run_in_background


class EvaluateWidget(QWidget):
    """Evaluate the session's weights and the baselines on a labelled folder.

    Signal ``run_finished(str)``: ``"done"``, ``"cancelled"`` or ``"failed"``.
    """

    run_finished = Signal(str)

    def __init__(self, napari_viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = unwrap_viewer(napari_viewer)
        self.session = get_session(self.viewer)
        self.report: EvaluationReport | None = None
        self._handle: WorkHandle | None = None
        self._outcome = "failed"

        form = QFormLayout()
        folder_row = QHBoxLayout()
        self.folder = QLineEdit()
        self.folder.setPlaceholderText("folder with images/ + masks/ or imagesTr/ + labelsTr/")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        folder_row.addWidget(self.folder)
        folder_row.addWidget(browse)
        holder = QWidget()
        holder.setLayout(folder_row)
        form_row(form, "Labelled folder", holder, "2D pictures paired by stem, or NIfTI volumes (MSD layout)")
        self.support_size = self._spin(form, "Support size S", 1, 256, 16, "support entries per prediction")
        self.ensemble = self._spin(form, "Ensemble K", 1, 32, 1, "support subsets combined per prediction")
        self.seed = self._spin(form, "Seed", 0, 2**31 - 1, 0, "seed of the support subsets and query samples")
        self.max_queries = self._spin(form, "Queries per task", 0, 100000, 20,
                                      "a seeded sample of at most this many query slices per task (0: all)")
        self.support_split = form_row(
            form, "Support from", QComboBox(),
            "cases the support entries come from (a folder with one case is split by slices instead)")
        self.support_split.addItems(["val", "train+val"])
        self.label_values = form_row(form, "Label values", QLineEdit(),
                                     "comma-separated label values to evaluate (empty: every one in the folder)")

        self.run_button = QPushButton("Evaluate")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.save_button = QPushButton("Save JSON…")
        self.save_button.setEnabled(False)
        self.save_button.clicked.connect(self._save_dialog)
        buttons = QHBoxLayout()
        for button in (self.run_button, self.cancel_button, self.save_button):
            buttons.addWidget(button)
        self.output = QPlainTextEdit()
        self.output.setReadOnly(True)
        self.output.setFont(QFontDatabase.systemFont(QFontDatabase.FixedFont))
        self.output.setPlaceholderText("Dice per task (mean ± std over query slices) appears here")

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.output)

    @staticmethod
    def _spin(form: QFormLayout, label: str, low: int, high: int, value: int, tip: str) -> QSpinBox:
        spin = form_row(form, label, QSpinBox(), tip)
        spin.setRange(low, high)
        spin.setValue(value)
        return spin

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Labelled folder")
        if folder:
            self.folder.setText(folder)

    def run(self) -> WorkHandle | None:
        """Start the evaluation in the background; the table replaces the text when it is done."""
        folder = self.folder.text().strip()
        if self._handle is not None and self._handle.running:
            report_error(OpenSegError("an evaluation is running: wait for it or press Cancel"), "Evaluate")
            return None
        try:
            if not folder:
                raise OpenSegError("choose a labelled folder first")
            label_values = parse_label_values(self.label_values.text())
        except OpenSegError as err:
            report_error(err, "Evaluate")
            self.run_finished.emit("failed")
            return None
        settings = dict(
            label_values=label_values,
            support_size=self.support_size.value(), ensemble=self.ensemble.value(), seed=self.seed.value(),
            support_split=self.support_split.currentText(), max_queries=self.max_queries.value() or None,
            device=self.session.device,  # the Segment widget's choice, as docs/evaluation.md says
        )
        weights = self.session.weights
        self._outcome = "failed"
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.save_button.setEnabled(False)
        self.output.setPlainText(f"evaluating {folder} with {weights} ...")
        self._handle = run_in_background(
            lambda: iter_evaluate(folder, weights, **settings), "Evaluate", self._show, on_finished=self._finished
        )
        return self._handle

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._outcome = "cancelled"

    def _show(self, report: EvaluationReport) -> None:
        self.report = report
        self._outcome = "done"
        self._show_report()

    def _show_report(self) -> None:
        """The last finished report's table (what Save JSON writes), or nothing."""
        report = self.report
        if report is None:
            self.output.setPlainText("")
            self.output.setToolTip("")
            return
        s = report.settings
        header = (f"{Path(s['folder']).name}: S={s['support_size']} K={s['ensemble']} seed={s['seed']}, "
                  f"weights {Path(str(s['weights'])).name}\n{report.split_note()}")
        self.output.setPlainText(header + "\n" + report.table())
        self.output.setToolTip(f"folder: {s['folder']}\nweights: {s['weights']}")

    def _finished(self) -> None:
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.save_button.setEnabled(self.report is not None)
        self._handle = None
        if self._outcome != "done":  # a failed or cancelled run leaves the last report on show
            self._show_report()
        self.run_finished.emit(self._outcome)

    def _save_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save the report", "evaluation.json", "JSON (*.json)")
        if path:  # the dialog has asked before replacing a file
            self.save(path, overwrite=True)

    def save(self, path: str | Path, overwrite: bool = False) -> Path | None:
        """Write the last report as JSON (the format of ``openseg evaluate --json``)."""
        if self.report is None:
            report_error(OpenSegError("nothing to save yet: run an evaluation first"), "Save report")
            return None
        try:
            return self.report.write_json(path, overwrite=overwrite)
        except OpenSegError as err:
            report_error(err, "Save report")
            return None

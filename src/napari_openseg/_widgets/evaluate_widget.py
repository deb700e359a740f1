"""Dock widget: how well do the weights segment a labelled folder, next to three baselines?

The widget door of ``openseg evaluate`` (:func:`~napari_openseg.evaluation.evaluate.iter_evaluate`):
pick a folder (``images/`` + ``masks/`` or ``imagesTr/`` + ``labelsTr/``, see docs/evaluation.md),
choose S, K and the seed, run it in a worker (:mod:`._run`: progress bar with the time left, Cancel)
and read the Dice table (one row per task, one column per method); the report can be saved as the
same JSON file the command line writes. It reads and writes no layers. Weights and device are the
viewer's session choice, shown (and changed) in the Model section. The fields and the table are
magicgui widgets.
"""

from __future__ import annotations

from pathlib import Path

from magicgui.widgets import ComboBox, Container, FileEdit, LineEdit, SpinBox, Table
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QFileDialog, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from napari_openseg._widgets._controls import Collapsible, dock_layout, parse_label_values
from napari_openseg._widgets._model_picker import ModelPicker
from napari_openseg._widgets._run import RunPanel
from napari_openseg._widgets._session import get_session, unwrap_viewer
from napari_openseg._widgets._threading import WorkHandle, report_error
from napari_openseg.core.engine_settings import DEFAULT_ENSEMBLE, DEFAULT_SUPPORT_SIZE
from napari_openseg.errors import OpenSegError
from napari_openseg.evaluation.evaluate import EvaluationReport, iter_evaluate

#: Rows the table shows before it scrolls (it never pushes the dock past a small screen).
TABLE_MIN_HEIGHT = 90


class EvaluateWidget(QWidget):
    """Evaluate the session's weights and the baselines on a labelled folder.

    Signal ``run_finished(str)``: ``"done"``, ``"cancelled"`` or ``"failed"`` (a run that did not
    start, for a missing folder say, emits nothing: its message is shown).
    """

    run_finished = Signal(str)

    def __init__(self, napari_viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = unwrap_viewer(napari_viewer)
        self.session = get_session(self.viewer)
        self.report: EvaluationReport | None = None

        self.folder = FileEdit(
            mode="d",
            label="Labelled folder",
            tooltip="2D pictures paired by stem (images/ + masks/), or NIfTI volumes "
            "(imagesTr/ + labelsTr/, MSD layout)",
        )
        self.folder.line_edit.native.setPlaceholderText("images/ + masks/ or imagesTr/ + labelsTr/")
        folder_form = Container(widgets=[self.folder], labels=True)
        folder_form.margins = (0, 0, 0, 0)
        settings = self._settings_form()
        self.settings_section = Collapsible("Settings", settings.native)
        for field in (self.support_size, self.ensemble, self.max_queries):
            field.changed.connect(self._title_settings)
        self._title_settings()
        self.picker = ModelPicker(self.session)
        self.model_section = self.picker.section()

        self.run_button = QPushButton("Evaluate")
        self.run_button.clicked.connect(self.run)
        self.save_button = QPushButton("Save JSON…")
        self.save_button.setEnabled(False)
        self.save_button.clicked.connect(self._save_dialog)
        buttons = QHBoxLayout()
        for button in (self.run_button, self.save_button):
            buttons.addWidget(button)
        self.caption = QLabel("Dice per task (mean ± std over query slices) appears here.")
        self.caption.setWordWrap(True)
        self.table = Table()
        self.table.read_only = True
        self.table.native.setMinimumHeight(TABLE_MIN_HEIGHT)
        self.panel = RunPanel("Evaluate", host=self, unit="batches")
        self.status = self.panel.status

        layout = QVBoxLayout()
        layout.addWidget(folder_form.native)
        layout.addWidget(self.settings_section)
        layout.addWidget(self.model_section)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addWidget(self.caption)
        layout.addWidget(self.table.native, stretch=1)
        dock_layout(self, layout, footer=self.panel)
        self.panel.running_changed.connect(self._set_running)
        self.panel.finished.connect(self._finished)

    def _settings_form(self) -> Container:
        """The fields under Settings: S, K, the seed, the queries per task, the support split and
        the label values."""
        self.support_size = SpinBox(
            value=DEFAULT_SUPPORT_SIZE,
            min=1,
            max=256,
            label="Support size S",
            tooltip="support entries per prediction",
        )
        self.ensemble = SpinBox(
            value=DEFAULT_ENSEMBLE,
            min=1,
            max=32,
            label="Ensemble K",
            tooltip="support subsets combined per prediction (K times slower)",
        )
        self.seed = SpinBox(
            value=0,
            min=0,
            max=2**31 - 1,
            label="Seed",
            tooltip="seed of the support subsets and query samples",
        )
        self.max_queries = SpinBox(
            value=20,
            min=0,
            max=100000,
            label="Queries per task",
            tooltip="a seeded sample of at most this many query slices per task (0: all)",
        )
        self.support_split = ComboBox(
            choices=["val", "train+val"],
            value="val",
            label="Support from",
            tooltip="cases the support entries come from (a folder with one case is split by slices instead)",
        )
        self.label_values = LineEdit(
            label="Label values",
            tooltip="comma-separated label values to evaluate (empty: every one in the folder)",
        )
        settings = Container(
            widgets=[
                self.support_size,
                self.ensemble,
                self.seed,
                self.max_queries,
                self.support_split,
                self.label_values,
            ],
            labels=True,
        )
        settings.margins = (0, 0, 0, 0)
        return settings

    @property
    def cancel_button(self) -> QPushButton:
        return self.panel.cancel_button

    def _title_settings(self, *_args) -> None:
        queries = self.max_queries.value or "all"
        self.settings_section.set_title(
            f"Settings: S={self.support_size.value}, K={self.ensemble.value}, {queries} queries per task"
        )

    def run(self) -> WorkHandle | None:
        """Start the evaluation in the background; the table shows the report when it is done."""
        if self.panel.running:
            self.panel.refuse("an evaluation is running: wait for it or press Cancel")
            return None
        try:
            folder = str(self.folder.line_edit.value).strip()
            if not folder:
                raise OpenSegError("choose a labelled folder first")
            label_values = parse_label_values(self.label_values.value)
            weights = self.picker.weights_spec()
        except OpenSegError as err:
            self.panel.refuse(err)
            return None
        settings = dict(
            label_values=label_values,
            support_size=self.support_size.value,
            ensemble=self.ensemble.value,
            seed=self.seed.value,
            support_split=self.support_split.value,
            max_queries=self.max_queries.value or None,
            device=self.picker.device(),
        )
        return self.panel.start(
            lambda: iter_evaluate(folder, weights, **settings),
            on_done=self._show,
            message=f"Evaluating {Path(folder).name} with {Path(weights).name}…",
        )

    def cancel(self) -> None:
        self.panel.cancel()

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.save_button.setEnabled(not running and self.report is not None)

    def _show(self, report: EvaluationReport) -> None:
        self.report = report
        self._show_report()

    def _show_report(self) -> None:
        """The last finished report (what Save JSON writes) as a table, or an empty table."""
        report = self.report
        if report is None:
            self.table.value = {"data": [], "index": [], "columns": []}
            return
        s = report.settings
        self.caption.setText(
            f"{Path(s['folder']).name}: S={s['support_size']} K={s['ensemble']} seed={s['seed']}, weights "
            f"{Path(str(s['weights'])).name}. Dice per task, mean ± std over query slices. {report.split_note()}"
        )
        self.caption.setToolTip(f"folder: {s['folder']}\nweights: {s['weights']}")
        columns, index, data = report_table(report)
        self.table.value = {"data": data, "index": index, "columns": columns}
        self.table.native.resizeColumnsToContents()

    def _finished(self, outcome: str) -> None:
        self.save_button.setEnabled(self.report is not None)
        self.run_finished.emit(outcome)

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


def report_table(report: EvaluationReport) -> tuple[list[str], list[str], list[list[str]]]:
    """``(columns, index, data)`` of a report: one row per task and one for the mean over tasks, a
    column for the number of query slices and one per method (``"mean ± std"``, text: the table
    shows it as written)."""
    summary = report.summary()
    methods = list(summary)
    index, data = [], []
    for key in report.tasks:
        scores = report.task_scores(key)
        index.append(key)
        data.append(
            [str(scores[methods[0]]["n"])]
            + [f"{scores[m]['mean']:.3f} ± {scores[m]['std']:.2f}" for m in methods]
        )
    index.append("mean over tasks")  # mean ± std over the tasks' means
    data.append([""] + [f"{summary[m]['mean']:.3f} ± {summary[m]['std']:.2f}" for m in methods])
    return ["n", *methods], index, data

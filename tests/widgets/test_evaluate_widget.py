"""The evaluation widget: runs `iter_evaluate` on a folder with the session's weights, shows the table,
saves the JSON report, refuses a missing folder, and can be cancelled."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_openseg._widgets._session import get_session
from napari_openseg._widgets.evaluate_widget import EvaluateWidget

pytestmark = pytest.mark.qt
iio = pytest.importorskip("imageio.v3")
pytest.importorskip("sklearn")


def picture_folder(root, with_second_label: bool = False):
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(6):
        labels = np.zeros((24, 24), np.uint8)
        labels[6:16, 5 + i % 2 : 15 + i % 2] = 1
        if with_second_label:
            labels[18:22, 4:20] = 2
        image = (60 + 120 * labels + 10 * rng.standard_normal(labels.shape)).clip(0, 255).astype(np.uint8)
        iio.imwrite(root / "images" / f"c{i}.png", image)
        iio.imwrite(root / "masks" / f"c{i}.png", labels)
    return root


@pytest.fixture
def folder(tmp_path):
    return picture_folder(tmp_path / "pictures")


@pytest.fixture
def widget(viewer, qtbot, tiny_weights):
    get_session(viewer).set_model(weights=str(tiny_weights), device="cpu")
    w = EvaluateWidget(viewer)
    qtbot.addWidget(w)
    return w


def test_evaluates_a_folder_and_saves_the_report(widget, folder, tmp_path, inline):
    widget.folder.setText(str(folder))
    widget.support_size.setValue(2)
    widget.max_queries.setValue(0)
    finished = []
    widget.run_finished.connect(finished.append)
    widget.run()
    assert finished == ["done"]
    text = widget.output.toPlainText()
    assert "label_1" in text and "pixel_classifier" in text and "S=2" in text
    assert text.startswith("pictures: S=2") and str(folder) not in text  # the folder's name, not its path
    assert "support from the val cases" in text
    assert widget.report.settings["weights"].endswith("tiny.pt")
    assert widget.report.task_scores("label_1")["pixel_classifier"]["mean"] > 0.8
    out = widget.save(tmp_path / "report.json")
    assert json.loads(out.read_text())["tasks"]["label_1"]["label_prior"]["n"] == 1
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()


def test_label_values_choose_the_tasks(widget, tmp_path, inline, errors):
    widget.folder.setText(str(picture_folder(tmp_path / "two", with_second_label=True)))
    widget.support_size.setValue(2)
    widget.label_values.setText("2")
    widget.run()
    assert set(widget.report.to_dict()["tasks"]) == {"label_2"}
    widget.label_values.setText("")
    widget.run()
    assert set(widget.report.to_dict()["tasks"]) == {"label_1", "label_2"}
    widget.label_values.setText("1, two")
    assert widget.run() is None and "whole numbers" in errors[-1]


def test_missing_folder_is_reported(widget, inline, errors):
    finished = []
    widget.run_finished.connect(finished.append)
    widget.run()
    assert finished == ["failed"] and "choose a labelled folder" in errors[0]
    widget.folder.setText("/no/such/folder")
    widget.run()
    assert "is not a folder" in errors[-1] and widget.report is None
    assert widget.save("/tmp/never.json") is None and "nothing to save" in errors[-1]


def test_a_failed_run_leaves_the_last_report_on_show(widget, folder, inline, errors):
    widget.folder.setText(str(folder))
    widget.support_size.setValue(2)
    widget.run()
    shown = widget.output.toPlainText()
    assert shown.startswith("pictures:")
    widget.folder.setText("/no/such/folder")
    finished = []
    widget.run_finished.connect(finished.append)
    widget.run()
    assert finished == ["failed"] and "is not a folder" in errors[-1]
    assert widget.output.toPlainText() == shown and widget.save_button.isEnabled()  # Save writes what is shown


def test_cancel_in_a_worker(widget, folder, qtbot, threaded):
    widget.folder.setText(str(folder))
    with qtbot.waitSignal(widget.run_finished, timeout=60000) as blocker:
        widget.run()
        widget.cancel()
    assert blocker.args == ["cancelled"] and widget.report is None


def test_the_session_device_is_used_as_chosen_auto_included(viewer, widget, folder, inline, monkeypatch):
    from napari_openseg._widgets import evaluate_widget

    seen = []

    def record(folder, weights, **settings):
        seen.append(settings["device"])
        raise RuntimeError("stop here")
        yield

    monkeypatch.setattr(evaluate_widget, "iter_evaluate", record)
    get_session(viewer).set_model(device="auto")  # "auto" became "cpu": a GPU was never used
    widget.folder.setText(str(folder))
    widget.run()
    assert seen == ["auto"]

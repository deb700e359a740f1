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
    widget.folder.value = str(folder)
    widget.support_size.value = 2
    widget.max_queries.value = 0
    finished = []
    widget.run_finished.connect(finished.append)
    widget.run()
    assert finished == ["done"]
    caption = widget.caption.text()
    assert (
        caption.startswith("pictures: S=2") and str(folder) not in caption
    )  # the folder's name, not its path
    assert "support from the val cases" in caption
    table = widget.table.to_dict("split")  # a real table: a row per task, a column per method
    assert list(table["index"]) == ["label_1", "mean over tasks"]
    columns = list(table["columns"])
    methods = list(widget.report.task_scores("label_1"))
    assert columns == ["n", *methods] and {"model", "label_prior", "pixel_classifier"} <= set(methods)
    pixel = widget.report.task_scores("label_1")["pixel_classifier"]
    assert table["data"][0][columns.index("pixel_classifier")] == f"{pixel['mean']:.3f} ± {pixel['std']:.2f}"
    assert widget.report.settings["weights"].endswith("tiny.pt")
    assert widget.report.task_scores("label_1")["pixel_classifier"]["mean"] > 0.8
    out = widget.save(tmp_path / "report.json")
    assert json.loads(out.read_text())["tasks"]["label_1"]["label_prior"]["n"] == 1
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()


def test_label_values_choose_the_tasks(widget, tmp_path, inline, errors):
    widget.folder.value = str(picture_folder(tmp_path / "two", with_second_label=True))
    widget.support_size.value = 2
    widget.label_values.value = "2"
    widget.run()
    assert set(widget.report.to_dict()["tasks"]) == {"label_2"}
    widget.label_values.value = ""
    widget.run()
    assert set(widget.report.to_dict()["tasks"]) == {"label_1", "label_2"}
    widget.label_values.value = "1, two"
    assert widget.run() is None and "whole numbers" in errors[-1]


def test_missing_folder_is_reported(widget, inline, errors):
    finished = []
    widget.run_finished.connect(finished.append)
    assert widget.run() is None  # an input mistake: no run, so no outcome, and the message is shown
    assert finished == [] and "choose a labelled folder" in errors[0]
    assert "choose a labelled folder" in widget.status.text()
    widget.folder.value = "/no/such/folder"
    widget.run()  # found by the run itself: a failed run
    assert finished == ["failed"] and "is not a folder" in errors[-1] and widget.report is None
    assert widget.status.text().startswith("Failed: Evaluate: ") and "is not a folder" in widget.status.text()
    assert widget.save("/tmp/never.json") is None and "nothing to save" in errors[-1]


def test_a_failed_run_leaves_the_last_report_on_show(widget, folder, inline, errors):
    widget.folder.value = str(folder)
    widget.support_size.value = 2
    widget.run()
    shown = widget.table.to_dict("split")
    assert shown["index"][0] == "label_1"
    widget.folder.value = "/no/such/folder"
    finished = []
    widget.run_finished.connect(finished.append)
    widget.run()
    assert finished == ["failed"] and "is not a folder" in errors[-1]
    assert (
        widget.table.to_dict("split") == shown and widget.save_button.isEnabled()
    )  # Save writes what is shown


def test_cancel_in_a_worker(widget, folder, qtbot, threaded):
    widget.folder.value = str(folder)
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
    widget.folder.value = str(folder)
    widget.run()
    assert seen == ["auto"]

"""The propagation widget: run, output layer (never the painted one), confidence plot, "Go to least
confident slice", the correction loop, Cancel and errors."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from napari_openseg._widgets import propagate_widget
from napari_openseg._widgets._layers import current_slice, owner_info
from napari_openseg._widgets._session import get_session
from napari_openseg._widgets.propagate_widget import PropagationWidget
from napari_openseg.core.propagate.settings import (
    DEFAULT_CLASSIFIER_STOP,
    DEFAULT_STOP_CONFIDENCE,
    DEFAULT_STOP_RATIO,
)
from tests._blobs import disc_volume, largest_slice, one_thread

pytestmark = [pytest.mark.qt, pytest.mark.usefixtures(one_thread.__name__)]


@pytest.fixture
def scene(viewer, qtbot, tiny_weights):
    """A disc volume with geometry, a painted prompt on its largest slice, and the widget."""
    image, truth = disc_volume((14, 24, 28), first=2, last=11)
    z = largest_slice(truth)
    painted = np.zeros_like(truth)
    painted[z] = truth[z]
    geometry = {"scale": (2.0, 0.5, 0.5), "translate": (4.0, 0.0, 0.0)}
    image_layer = viewer.add_image(image, name="vol", **geometry)
    painted_layer = viewer.add_labels(painted.copy(), name="painted", **geometry)
    get_session(viewer).set_model(weights=str(tiny_weights), device="cpu")
    widget = PropagationWidget(viewer)
    qtbot.addWidget(widget)
    widget.image_combo.select(image_layer)
    widget.prompt_combo.select(painted_layer)
    widget.axis_combo.setCurrentText("0")
    widget.bank_size.setValue(4)
    return widget, image_layer, painted_layer, painted, z


def run_and_wait(qtbot, widget: PropagationWidget, corrections: bool = False) -> str:
    with qtbot.waitSignal(widget.run_finished, timeout=60_000) as blocker:
        assert widget.run(corrections=corrections) is not None
    return blocker.args[0]


def names(viewer) -> list[str]:
    return [layer.name for layer in viewer.layers]


def test_run_writes_a_new_labels_layer_and_plots_the_confidence(viewer, qtbot, scene, threaded):
    widget, image_layer, painted_layer, painted, z = scene
    shown = []
    widget.preview_updated.connect(shown.append)
    assert run_and_wait(qtbot, widget) == "done"
    assert names(viewer) == ["vol", "painted", "vol propagated"]  # the preview is gone
    output = viewer.layers["vol propagated"]
    assert owner_info(output)["role"] == "propagation"
    assert output.data.shape == painted.shape and np.array_equal(output.data[z], painted[z])
    assert np.allclose(output.scale, image_layer.scale) and np.allclose(
        output.translate, image_layer.translate
    )
    assert np.array_equal(painted_layer.data, painted)  # the user's layer is untouched
    assert shown and shown == sorted(shown)
    values = widget.plot.values
    assert values.shape == (14,) and np.isnan(values[z]) and np.isfinite(values).sum() >= 2
    weakest = widget.result.least_confident_slice()
    assert widget.plot.weakest() == weakest
    assert f"Least confident: slice {weakest}" in widget.status.text()
    # the bright disc passes the half-split test: its pixel classifier joined, and the status says so
    assert widget.pixel_classifier.currentText() == "auto" and widget.result.classifier_joined == [1]
    assert "Pixel classifier: label 1: joined the network" in widget.status.text()


def test_the_pixel_classifier_can_be_left_out(viewer, qtbot, scene, inline):
    widget = scene[0]
    widget.pixel_classifier.setCurrentText("never")
    assert run_and_wait(qtbot, widget) == "done"
    assert widget.result.classifier_dice == {} and "Pixel classifier" not in widget.status.text()


def test_stop_confidence_control_ends_objects_at_the_painted_slice(viewer, qtbot, scene, inline):
    widget, _, _, painted, _ = scene
    assert widget.stop_confidence.value() == pytest.approx(DEFAULT_STOP_CONFIDENCE)
    assert widget.stop_ratio.value() == pytest.approx(DEFAULT_STOP_RATIO)
    title = (
        f"Settings: bank 4, stop below 0.70 x first slice, classifier agreement {DEFAULT_CLASSIFIER_STOP:.2f}"
    )
    assert widget.settings_section.button.text() == title
    widget.stop_ratio.setValue(0.0)
    widget.stop_confidence.setValue(1.0)  # every prediction is doubtful: each front ends, undone
    widget.classifier_stop.setValue(0.0)  # (the disc's classifier joins: keep the confidence rule)
    assert widget.settings_section.button.text() == "Settings: bank 4, stop below 1.00"
    assert run_and_wait(qtbot, widget) == "done"
    assert np.array_equal(viewer.layers["vol propagated"].data, painted)
    assert "Fronts ended on low confidence" in widget.status.text()
    assert "lower 'Stop below confidence' and run again" in widget.status.text()  # the one in use


def test_the_classifier_stop_control_ends_objects_where_the_classifier_disagrees(
    viewer, qtbot, scene, inline
):
    widget, _, _, painted, _ = scene
    assert widget.classifier_stop.value() == pytest.approx(DEFAULT_CLASSIFIER_STOP)
    widget.pixel_classifier.setCurrentText("never")  # no classifier: the title leaves its stop out
    assert widget.settings_section.button.text() == "Settings: bank 4, stop below 0.70 x first slice"
    widget.pixel_classifier.setCurrentText("auto")
    widget.classifier_stop.setValue(0.99)  # the two masks never agree that well: each front ends, undone
    assert run_and_wait(qtbot, widget) == "done"
    assert widget.result.classifier_joined == [1] and widget.result.confidence_stops == {}
    assert np.array_equal(viewer.layers["vol propagated"].data, painted)
    assert "pixel classifier disagreed with the network" in widget.status.text()
    assert "lower 'Stop below classifier agreement'" in widget.status.text()


def test_go_to_least_confident_slice_then_correct_it_and_run_again(viewer, qtbot, scene, inline, errors):
    widget, image_layer, painted_layer, painted, z = scene
    assert run_and_wait(qtbot, widget) == "done"
    output = widget.output
    assert widget.run(corrections=True) is None  # nothing was fixed yet
    assert "no slice of 'vol propagated' was changed" in errors[-1]

    weakest = widget.go_to_least_confident()
    assert current_slice(viewer, image_layer, 0) == weakest
    assert viewer.layers.selection.active is output and widget.plot.current == weakest
    fixed = np.zeros(output.data.shape[1:], output.data.dtype)
    fixed[5:12, 6:14] = 1
    output.data[weakest] = fixed  # the user's fix, painted on the output layer
    assert run_and_wait(qtbot, widget, corrections=True) == "done"
    assert widget.result.complete_slices == [weakest]
    assert widget.result.prompt_slices == {1: sorted({z, weakest})}
    # the corrected run replaces the layer the fixes were painted on: one output, selected, fixes kept
    assert widget.output is output and names(viewer) == ["vol", "painted", "vol propagated"]
    assert viewer.layers.selection.active is output and output.editable
    assert np.array_equal(output.data, widget.result.labels)
    assert np.array_equal(widget.output.data[weakest], fixed)
    assert np.isnan(widget.plot.values[weakest])
    assert np.array_equal(painted_layer.data, painted)


def test_a_slice_corrected_once_can_be_corrected_again(viewer, qtbot, scene, inline, errors):
    """The second fix of a slice used to be refused: the set of complete slices did not grow."""
    widget, *_ = scene
    # The tiny network is equally unsure (0.41) everywhere: a relative stop never ends its fronts
    # and it fills whole slices; an absolute one ends them next to the prompt and leaves slice 3 empty.
    widget.stop_ratio.setValue(0.0)
    widget.stop_confidence.setValue(0.6)
    assert run_and_wait(qtbot, widget) == "done"
    widget.output.paint((3, 5, 5), 1, refresh=False)
    assert run_and_wait(qtbot, widget, corrections=True) == "done"
    assert widget.result.complete_slices == [3]
    widget.output.paint((3, 15, 15), 1, refresh=False)
    assert run_and_wait(qtbot, widget, corrections=True) == "done"
    assert widget.output.data[3, 15, 15] == 1 and widget.result.complete_slices == [3]
    assert [name for name in names(viewer) if "propagated" in name] == ["vol propagated"]  # no "[1]", "[2]"


def test_label_values_beyond_32_bits_run_with_a_preview(viewer, qtbot, scene, threaded):
    widget, _, painted_layer, painted, z = scene
    painted_layer.data = np.where(painted > 0, np.int64(2**33), 0)
    shown = []
    widget.preview_updated.connect(shown.append)
    assert run_and_wait(qtbot, widget) == "done"  # the preview was uint32: OverflowError
    assert shown and set(np.unique(viewer.layers["vol propagated"].data)) <= {0, 2**33}


def test_clicking_the_plot_moves_the_slider(viewer, qtbot, scene, inline):
    widget, image_layer, *_ = scene
    assert run_and_wait(qtbot, widget) == "done"
    widget.plot.slice_clicked.emit(3)
    assert current_slice(viewer, image_layer, 0) == 3
    viewer.dims.set_point(0, image_layer.data_to_world((9, 0, 0))[0])
    assert widget.plot.current == 9


def test_cancel_changes_nothing(viewer, qtbot, scene, threaded, monkeypatch):
    widget, _, painted_layer, painted, _ = scene
    release = threading.Event()
    real = propagate_widget.iter_propagate

    def gated(*args, **kwargs):
        for step in real(*args, **kwargs):
            yield step
            if step.payload:
                release.wait(10)

    monkeypatch.setattr(propagate_widget, "iter_propagate", gated)

    def on_preview(done):
        widget.cancel()
        release.set()

    widget.preview_updated.connect(on_preview)
    assert run_and_wait(qtbot, widget) == "cancelled"
    assert names(viewer) == ["vol", "painted"]
    assert np.array_equal(painted_layer.data, painted)
    assert widget.result is None and "Cancelled" in widget.status.text()
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()


def test_a_cancelled_run_on_another_image_keeps_the_last_finished_run(viewer, qtbot, scene, threaded):
    widget, image_layer, *_ = scene
    assert run_and_wait(qtbot, widget) == "done"
    first = widget.result
    other = viewer.add_image(np.zeros((16, 24, 28), np.float32), name="other")
    prompt = viewer.add_labels(np.zeros((16, 24, 28), np.uint8), name="other prompt")
    prompt.data[8, 5:10, 5:10] = 1
    widget.image_combo.select(other)
    widget.prompt_combo.select(prompt)
    cancel_at_once = lambda done: widget.cancel()  # noqa: E731
    widget.preview_updated.connect(cancel_at_once)
    assert run_and_wait(qtbot, widget) == "cancelled" and widget.result is first
    widget.preview_updated.disconnect(cancel_at_once)
    widget.go_to_slice(3)  # still the first run's image
    assert current_slice(viewer, image_layer, 0) == 3
    widget.image_combo.select(image_layer)
    widget.output.data[3] = 0
    widget.output.data[3, 5:9, 5:9] = 1
    assert run_and_wait(qtbot, widget, corrections=True) == "done"
    assert 3 in widget.result.complete_slices


def test_the_preview_cannot_be_painted_or_chosen_as_labels(viewer, qtbot, scene, threaded):
    from napari_openseg._widgets.support_widget import SupportSetWidget

    widget, *_ = scene
    support = SupportSetWidget(viewer)
    qtbot.addWidget(support)
    seen = []

    def check(done):
        preview = widget._preview
        seen.append((preview.editable, preview in support.labels_combo.layers()))

    widget.preview_updated.connect(check)
    assert run_and_wait(qtbot, widget) == "done"
    assert seen and all(editable is False and offered is False for editable, offered in seen)


def test_closing_the_image_during_a_run_cancels_it(viewer, qtbot, scene, threaded):
    widget, image_layer, *_ = scene
    closed, steps = [], []

    def close_once(done):
        steps.append(done)
        if not closed:
            closed.append(done)
            viewer.layers.remove(image_layer)

    widget.preview_updated.connect(close_once)
    assert run_and_wait(qtbot, widget) == "cancelled"
    assert "Cancelled ('vol' was closed during the run); nothing was changed." in widget.status.text()
    assert "vol propagated" not in viewer.layers and widget.result is None
    assert len(steps) <= 2  # it stopped at the next slice, not at the end of the volume


def test_after_the_output_or_the_image_is_closed_the_messages_say_so(viewer, qtbot, scene, inline, errors):
    widget, image_layer, *_ = scene
    assert run_and_wait(qtbot, widget) == "done"
    viewer.layers.remove(widget.output)
    assert widget.run(corrections=True) is None and "output layer of the last run was closed" in errors[-1]
    viewer.layers.remove(image_layer)
    widget.go_to_slice(3)
    assert "the image of the last run, was closed" in errors[-1]


def test_an_output_painted_on_becomes_a_prompt_to_choose(viewer, qtbot, scene, inline):
    widget, *_ = scene
    assert run_and_wait(qtbot, widget) == "done"
    output = widget.output
    assert output not in widget.prompt_combo.layers()
    output.paint((5, 5, 5), 2, refresh=False)  # the user takes it over (2: a change whatever was there)
    widget.prompt_combo.refresh()
    assert output in widget.prompt_combo.layers()


def test_errors_are_notified(viewer, qtbot, scene, inline, errors):
    widget, *_ = scene
    widget.label_values.setText("1, x")
    assert widget.run() is None and "whole numbers" in errors[-1]
    widget.label_values.setText("4")
    assert run_and_wait(qtbot, widget) == "failed"
    assert "label 4 is not painted" in errors[-1]
    widget.label_values.setText("")
    assert widget.go_to_least_confident() is None and "run a propagation first" in errors[-1]
    viewer.layers.remove("painted")
    assert widget.run() is None and "paint the object" in errors[-1]


def test_docked_from_the_plugin_menu_it_runs_on_the_real_layers(viewer, qtbot, tiny_weights, inline):
    _, widget = viewer.window.add_plugin_dock_widget("napari-openseg", "Propagate")
    assert widget.session is get_session(viewer)
    image, truth = disc_volume((8, 20, 20), first=1, last=6)
    painted = np.zeros_like(truth)
    painted[4] = truth[4]
    image_layer = viewer.add_image(image, name="vol")
    viewer.add_labels(painted, name="painted")
    assert widget.image_combo.current() is image_layer
    get_session(viewer).set_model(weights=str(tiny_weights), device="cpu")
    assert run_and_wait(qtbot, widget) == "done"
    assert widget.output is viewer.layers["vol propagated"]

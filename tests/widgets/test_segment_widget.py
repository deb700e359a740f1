"""The segmentation widget: the painted-labels workflow, Cancel, batch mode, outputs and errors."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from napari_openseg._widgets import _model_picker
from napari_openseg._widgets._layers import owner_info
from napari_openseg._widgets._session import get_session
from napari_openseg._widgets.segment_widget import BATCH, SegmentationWidget
from napari_openseg._widgets.support_widget import SupportSetWidget
from napari_openseg.core.engine_settings import SegmentSettings
from napari_openseg.core.segment import inference
from napari_openseg.core.support import build_support_set
from tests.widgets.conftest import disc_volume

pytestmark = pytest.mark.qt


def run_and_wait(qtbot, widget: SegmentationWidget) -> str:
    with qtbot.waitSignal(widget.run_finished, timeout=60_000) as blocker:
        assert widget.run() is not None
    return blocker.args[0]


def make_segmenter(viewer, qtbot, weights) -> SegmentationWidget:
    widget = SegmentationWidget(viewer)
    qtbot.addWidget(widget)
    widget.set_weights(weights)
    return widget


def names(viewer) -> list[str]:
    return [layer.name for layer in viewer.layers]


def test_the_settings_start_at_the_defaults_and_follow_the_controls(viewer, qtbot):
    widget = SegmentationWidget(viewer)
    qtbot.addWidget(widget)
    assert widget.settings() == SegmentSettings()
    widget.threshold.setValue(0.7)
    widget.method_combo.setCurrentText("network")
    widget.extent_combo.setCurrentText("auto")
    assert widget.settings() == SegmentSettings(threshold=0.7, method="network", extent="auto")


def test_workflow_paint_two_slices_build_support_segment(viewer, qtbot, tiny_weights, threaded):
    image, mask = disc_volume(depth=12, size=32)
    painted = np.zeros_like(mask)
    painted[3], painted[8] = mask[3], mask[8]
    before = painted.copy()
    image_layer = viewer.add_image(image, name="vol", scale=(2.5, 0.5, 0.5), translate=(10.0, 0.0, 0.0))
    labels_layer = viewer.add_labels(
        painted, name="painted", scale=(2.5, 0.5, 0.5), translate=(10.0, 0.0, 0.0)
    )

    support_widget = SupportSetWidget(viewer)
    qtbot.addWidget(support_widget)
    with qtbot.waitSignal(get_session(viewer).support_changed, timeout=30_000):
        support_widget.add_all_slices()
    assert [e.slice_index for e in get_session(viewer).support.entries] == [3, 8]

    widget = make_segmenter(viewer, qtbot, tiny_weights)
    widget.query_combo.select(image_layer)
    viewer.mouse_over_canvas = True  # so that the status bar names the layer under the cursor
    assert run_and_wait(qtbot, widget) == "done"

    assert names(viewer) == ["vol", "painted", "vol openseg"]
    assert "vol openseg" in str(viewer.status) and "(running)" not in str(viewer.status)
    assert "2 examples: too few to cross-validate" in widget.estimate.text()  # two painted slices
    output = viewer.layers["vol openseg"]
    assert output.data.shape == image.shape and output.data.dtype == np.uint8
    assert set(np.unique(output.data)) <= {0, 1}
    np.testing.assert_array_equal(output.scale, image_layer.scale)
    np.testing.assert_array_equal(output.translate, image_layer.translate)
    np.testing.assert_array_equal(output.affine.affine_matrix, image_layer.affine.affine_matrix)
    np.testing.assert_array_equal(labels_layer.data, before)  # the painted layer is untouched
    assert owner_info(output)["role"] == "segmentation"

    # running again replaces the layer the plugin made, and only that one
    first = output.data
    assert run_and_wait(qtbot, widget) == "done"
    assert names(viewer) == ["vol", "painted", "vol openseg"]
    assert viewer.layers["vol openseg"] is output and output.data is not first

    # once the user paints on the output it is theirs: the next run makes a new layer
    output.paint((0, 0, 0), 3, refresh=False)  # a value no run produces
    edited = output.data.copy()
    assert run_and_wait(qtbot, widget) == "done"
    assert len(viewer.layers) == 4
    np.testing.assert_array_equal(viewer.layers["vol openseg"].data, edited)
    np.testing.assert_array_equal(labels_layer.data, before)


@pytest.mark.parametrize("earlier_output", [False, True], ids=["first-run", "rerun"])
def test_cancel_stops_within_a_batch_and_changes_nothing(
    viewer, qtbot, tiny_weights, threaded, monkeypatch, earlier_output
):
    image, mask = disc_volume(depth=40, size=32)
    image_layer = viewer.add_image(image, name="vol")
    get_session(viewer).replace_support(build_support_set(image, mask, slice_indices=[5, 30]))
    earlier = viewer.add_labels(np.full(image.shape, 7, np.uint8), name="earlier")
    widget = make_segmenter(viewer, qtbot, tiny_weights)
    widget.query_combo.select(image_layer)
    widget.support_size.setValue(16)  # 1 slice per CPU batch -> 40 batches
    output = None
    if earlier_output:
        assert run_and_wait(qtbot, widget) == "done"
        output = viewer.layers["vol openseg"]
        output.name = "my result"  # renamed by the user: still the plugin's to replace
        kept = output.data
        kept_values = kept.copy()
    before = names(viewer)

    # hold the worker after each batch until the main thread has seen it, so the test is exact
    release = threading.Event()
    batches = []
    real = inference.iter_segment_with  # what the job's SegmentTask runs per image

    def gated(*args, **kwargs):
        for step in real(*args, **kwargs):
            yield step
            if step.payload:
                batches.append(step.payload["stop"])
                release.wait(10)

    monkeypatch.setattr(inference, "iter_segment_with", gated)
    seen_preview = []

    def on_preview(done):
        widget.cancel()
        release.set()
        preview = viewer.layers["vol (running)"]
        seen_preview.append((done, preview.editable, preview is output))

    widget.preview_updated.connect(on_preview)
    assert run_and_wait(qtbot, widget) == "cancelled"
    # one batch shown, in a read-only layer: the old output itself on a rerun
    assert seen_preview == [(1, False, earlier_output)]
    assert len(batches) <= 2  # the batch in flight when Cancel came, at most one more
    assert names(viewer) == before  # no preview left, no output made
    assert np.all(earlier.data == 7)
    if earlier_output:
        assert output.data is kept and output.editable  # the earlier result is back, untouched
        np.testing.assert_array_equal(output.data, kept_values)
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()
    assert "Cancelled" in widget.status.text()


def test_batch_mode_one_output_per_open_image(viewer, qtbot, tiny_weights, threaded):
    a, mask = disc_volume(depth=6, size=32, seed=1)
    b, _ = disc_volume(depth=9, size=40, seed=2)
    c = a[2]
    viewer.add_image(a, name="a", scale=(2.0, 1.0, 1.0))
    viewer.add_image(b, name="b")
    viewer.add_image(c, name="c 2d")
    viewer.add_labels(mask, name="reference")  # labels are never queries
    get_session(viewer).replace_support(build_support_set(a, mask, slice_indices=[1, 4]))

    widget = make_segmenter(viewer, qtbot, tiny_weights)
    widget.query_combo.select(BATCH)
    widget.probabilities.setChecked(True)
    totals = []
    widget.preview_updated.connect(totals.append)
    assert run_and_wait(qtbot, widget) == "done"

    for name, shape in (("a", a.shape), ("b", b.shape), ("c 2d", c.shape)):
        output = viewer.layers[f"{name} openseg"]
        assert output.data.shape == shape
        np.testing.assert_array_equal(output.scale, viewer.layers[name].scale)
        probability = viewer.layers[f"{name} p(label 1)"]
        assert probability.data.shape == shape and probability.data.dtype == np.float32
        assert 0.0 <= probability.data.min() and probability.data.max() <= 1.0
    assert totals[-1] == 6 + 9 + 1  # progress counts slices over all images
    assert totals == sorted(totals)
    assert not any("(running)" in name for name in names(viewer))  # the preview is gone
    # probability maps are not queries next time, and running again adds nothing new
    count = len(viewer.layers)
    assert widget.query_combo.layers() == [viewer.layers[n] for n in ("a", "b", "c 2d")]
    assert run_and_wait(qtbot, widget) == "done"
    assert len(viewer.layers) == count


def test_batch_after_a_single_run_leaves_no_preview_and_follows_moved_sources(
    viewer, qtbot, tiny_weights, threaded
):
    a, mask = disc_volume(depth=6, size=32, seed=1)
    b, _ = disc_volume(depth=6, size=32, seed=2)
    layer_a = viewer.add_image(a, name="A")
    layer_b = viewer.add_image(b, name="B")
    get_session(viewer).replace_support(build_support_set(a, mask, slice_indices=[1, 4]))
    widget = make_segmenter(viewer, qtbot, tiny_weights)
    widget.query_combo.select(layer_b)
    assert run_and_wait(qtbot, widget) == "done"  # B has an output; A not yet
    layer_b.scale, layer_b.translate = (3.0, 0.5, 0.5), (10.0, 2.0, 2.0)  # B moved since
    widget.query_combo.select(BATCH)
    assert run_and_wait(qtbot, widget) == "done"
    assert sorted(names(viewer)) == ["A", "A openseg", "B", "B openseg"]  # no "(running)" left
    output = viewer.layers["B openseg"]
    np.testing.assert_allclose(output.scale, layer_b.scale)
    np.testing.assert_allclose(output.translate, layer_b.translate)
    assert np.allclose(viewer.layers["A openseg"].scale, layer_a.scale)


def test_a_duplicated_output_is_the_users_and_a_rerun_leaves_it_alone(viewer, qtbot, tiny_weights, threaded):
    from napari.layers._layer_actions import _duplicate_layer

    from napari_openseg._widgets._controls import is_user_labels

    image, mask = disc_volume(depth=4, size=24)
    viewer.add_image(image, name="vol")
    get_session(viewer).replace_support(build_support_set(image, mask, slice_indices=[1, 2]))
    widget = make_segmenter(viewer, qtbot, tiny_weights)
    assert run_and_wait(qtbot, widget) == "done"
    output = viewer.layers["vol openseg"]
    viewer.layers.selection = {output}
    _duplicate_layer(viewer.layers)  # Layer > Duplicate Layer: the copy shares the output's metadata
    copy = viewer.layers["vol openseg copy"]
    copy.paint((0, 0, 0), 9, refresh=False)  # the user's fix, on the copy
    assert owner_info(copy) is None and is_user_labels(copy)
    viewer.layers.remove(output)
    assert run_and_wait(qtbot, widget) == "done"
    assert (copy.data == 9).any() and "vol openseg" in names(viewer)  # a new output; the copy kept its fix


def test_an_output_follows_a_source_moved_during_the_run(viewer, qtbot, tiny_weights, threaded):
    image, mask = disc_volume(depth=8, size=24)
    source = viewer.add_image(image, name="vol")
    get_session(viewer).replace_support(build_support_set(image, mask, slice_indices=[1, 5]))
    widget = make_segmenter(viewer, qtbot, tiny_weights)
    moved = []

    def move(done):
        if not moved:
            moved.append(done)
            source.scale, source.translate = (3.0, 2.0, 2.0), (5.0, 1.0, 1.0)

    widget.preview_updated.connect(move)
    assert run_and_wait(qtbot, widget) == "done" and moved
    output = viewer.layers["vol openseg"]
    np.testing.assert_allclose(output.scale, source.scale)
    np.testing.assert_allclose(output.translate, source.translate)


def test_batch_mode_leaves_out_images_that_are_not_2d_or_3d(viewer, qtbot, tiny_weights, threaded):
    a, mask = disc_volume(depth=6, size=32, seed=1)
    viewer.add_image(a, name="A")
    viewer.add_image(np.stack([a, a]), name="time series")
    get_session(viewer).replace_support(build_support_set(a, mask, slice_indices=[1, 4]))
    widget = make_segmenter(viewer, qtbot, tiny_weights)
    widget.query_combo.select(BATCH)
    assert run_and_wait(qtbot, widget) == "done"
    assert "A openseg" in names(viewer) and "time series openseg" not in names(viewer)
    assert "left out, neither 2D nor 3D: time series" in widget.status.text()


def test_a_rerun_removes_probability_maps_it_no_longer_makes(viewer, qtbot, tiny_weights, threaded):
    a, mask = disc_volume(depth=6, size=32, seed=1)
    two = mask.astype(np.uint8)
    two[:, :4, :4] = 2
    viewer.add_image(a, name="A")
    get_session(viewer).replace_support(build_support_set(a, two, slice_indices=[1, 4]))
    widget = make_segmenter(viewer, qtbot, tiny_weights)
    widget.probabilities.setChecked(True)
    assert run_and_wait(qtbot, widget) == "done"
    assert {"A p(label 1)", "A p(label 2)"} <= set(names(viewer))
    get_session(viewer).replace_support(build_support_set(a, mask, slice_indices=[1, 4]))  # label 1 only
    assert run_and_wait(qtbot, widget) == "done"
    assert "A p(label 1)" in names(viewer) and "A p(label 2)" not in names(viewer)
    widget.probabilities.setChecked(False)
    assert run_and_wait(qtbot, widget) == "done"
    assert not any("p(label" in name for name in names(viewer))


def test_a_second_segment_widget_keeps_the_chosen_device(viewer, qtbot, tiny_weights):
    first = make_segmenter(viewer, qtbot, tiny_weights)
    first.picker.device_combo.setCurrentText("cpu")
    assert get_session(viewer).device == "cpu"
    second = SegmentationWidget(viewer)
    qtbot.addWidget(second)
    assert second.picker.device_combo.currentText() == "cpu" and get_session(viewer).device == "cpu"


def test_a_model_chosen_by_a_script_shows_in_the_widget(viewer, qtbot, tiny_weights):
    widget = make_segmenter(viewer, qtbot, "openseg-default")
    get_session(viewer).set_model(weights=str(tiny_weights), device="cpu")
    assert widget.weights_spec() == str(tiny_weights) and widget.picker.device_combo.currentText() == "cpu"
    assert get_session(viewer).weights == str(tiny_weights)  # nothing was sent back
    get_session(viewer).set_model(weights="openseg-default")
    assert (
        widget.picker.weights_combo.currentText() == "openseg-default"
        and "bundled" in widget.picker.weights_note.text()
    )
    get_session(viewer).set_model(
        weights="universeg-v1", device="cuda"
    )  # neither is here: shown, not ignored
    assert (widget.picker.weights_combo.currentText(), widget.picker.device_combo.currentText()) == (
        "universeg-v1",
        "cuda",
    )
    assert "not installed" in widget.picker.weights_note.text()


def test_a_weights_path_with_a_tilde_is_a_file(viewer, qtbot, tiny_weights, monkeypatch):
    monkeypatch.setenv("HOME", str(tiny_weights.parent))
    widget = make_segmenter(viewer, qtbot, f"~/{tiny_weights.name}")
    assert widget.picker.weights_note.text() == "" and get_session(viewer).weights == str(tiny_weights)


def test_a_second_segment_run_on_the_same_image_is_refused_while_the_first_runs(
    viewer, qtbot, tiny_weights, threaded, errors, monkeypatch
):
    image, mask = disc_volume(depth=6, size=32)
    layer = viewer.add_image(image, name="vol")
    get_session(viewer).replace_support(build_support_set(image, mask, slice_indices=[1, 4]))
    first, second = make_segmenter(viewer, qtbot, tiny_weights), make_segmenter(viewer, qtbot, tiny_weights)
    for widget in (first, second):
        widget.query_combo.select(layer)
    release = threading.Event()
    real = inference.iter_segment_with  # what the job's SegmentTask runs per image

    def gated(*args, **kwargs):
        release.wait(10)  # the first run holds here until the second has been refused
        return (yield from real(*args, **kwargs))

    monkeypatch.setattr(inference, "iter_segment_with", gated)
    with qtbot.waitSignal(first.run_finished, timeout=60_000):
        assert first.run() is not None
        assert second.run() is None and "another Segment run is writing to vol" in errors[-1]
        release.set()
    assert names(viewer) == ["vol", "vol openseg"] and viewer.layers["vol openseg"].editable
    assert run_and_wait(qtbot, second) == "done"  # free again once the first run ended


def test_slice_axis_choice(viewer, qtbot, tiny_weights, inline):
    image, mask = disc_volume(depth=8, size=32)
    viewer.add_image(image, name="vol")
    get_session(viewer).replace_support(build_support_set(image, mask, axis=2, slice_indices=[10, 20]))
    widget = make_segmenter(viewer, qtbot, tiny_weights)
    widget.axis_combo.setCurrentText("2")
    counts = []
    widget.preview_updated.connect(counts.append)
    assert run_and_wait(qtbot, widget) == "done"
    assert counts[-1] == 32  # 32 slices along axis 2
    assert viewer.layers["vol openseg"].data.shape == image.shape


def test_errors_are_notified(viewer, qtbot, tiny_weights, inline, errors, monkeypatch, tmp_path):
    image, mask = disc_volume(depth=6, size=32)
    widget = make_segmenter(viewer, qtbot, tiny_weights)
    assert widget.run() is None
    assert "no support set yet" in errors[-1] and "Add current slice" in errors[-1]

    get_session(viewer).replace_support(build_support_set(image, mask))
    assert widget.run() is None
    assert "open an image" in errors[-1]

    viewer.add_image(np.zeros((4, 16, 16, 3), np.uint8), name="rgb volume", rgb=True)
    assert widget.run() is None
    assert "is an RGB volume" in errors[-1]
    viewer.layers.clear()
    viewer.add_image(image, name="vol")

    monkeypatch.setattr(_model_picker, "is_available", lambda name: False)
    widget.picker.weights_combo.setCurrentText("openseg-default")
    assert widget.run() is None
    assert "are not installed" in errors[-1] and "Weights file" in errors[-1]
    assert "not installed" in widget.picker.weights_note.text()

    widget.set_weights(tmp_path / "nowhere.pt")
    assert widget.run() is None
    assert "does not exist" in errors[-1]

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a weights file")
    widget.set_weights(bad)
    assert run_and_wait(qtbot, widget) == "failed"
    assert "not a loadable weights file" in errors[-1]
    assert names(viewer) == ["vol"]
    assert widget.run_button.isEnabled()


def test_session_records_the_model_choice(viewer, qtbot, tiny_weights):
    widget = make_segmenter(viewer, qtbot, tiny_weights)
    session = get_session(viewer)
    assert session.weights == str(tiny_weights)
    widget.picker.device_combo.setCurrentText("cpu")
    assert session.device == "cpu"
    # Both bundled weights are offered by name; choosing one records its name, not a path.
    names = [widget.picker.weights_combo.itemText(i) for i in range(widget.picker.weights_combo.count())]
    assert names[:2] == ["openseg-default", "openseg-propagate"]
    widget.set_weights("openseg-propagate")
    assert session.weights == "openseg-propagate" and "bundled" in widget.picker.weights_note.text()


def test_run_waits_for_a_support_set_and_says_what_to_expect(viewer, qtbot, tiny_weights, inline):
    image, mask = disc_volume(depth=6, size=32)
    viewer.add_image(image, name="vol")
    widget = make_segmenter(viewer, qtbot, tiny_weights)
    assert not widget.run_button.isEnabled() and "build a support set first" in widget.run_button.toolTip()
    get_session(viewer).replace_support(build_support_set(image, mask, slice_indices=[1, 4]))
    assert widget.run_button.isEnabled()
    assert widget.expected.text().endswith("per slice on one CPU thread (measured)")
    messages = []
    widget.panel.bar.valueChanged.connect(lambda _v: messages.append(widget.status.text()))
    assert run_and_wait(qtbot, widget) == "done"
    assert messages[0].startswith("Segmenting 1 image: expected about ") and "for 6 slices" in messages[0]
    get_session(viewer).clear_support()
    assert not widget.run_button.isEnabled()


def test_the_expected_time_follows_the_method_and_the_size_of_the_query_slices(viewer, qtbot, tiny_weights):
    from napari_openseg.core.segment.expected_time import format_duration, seconds_per_slice

    image, mask = disc_volume(depth=6, size=32)
    small = viewer.add_image(image, name="small")
    large = viewer.add_image(np.zeros((3, 512, 512), np.float32), name="large")
    widget = make_segmenter(viewer, qtbot, tiny_weights)
    get_session(viewer).replace_support(build_support_set(image, mask, slice_indices=[1, 2, 3, 4]))
    counts = get_session(viewer).support.counts()
    widget.method_combo.setCurrentText("pixel-classifier")
    for layer, pixels in ((small, 32 * 32), (large, 512 * 512)):
        widget.query_combo.select(layer)  # the line follows the chosen image
        per_slice = seconds_per_slice(counts, widget.support_size.value(), 1, "pixel-classifier", pixels)
        assert widget.expected.text().startswith(f"about {format_duration(per_slice)} per slice")
    assert seconds_per_slice(counts, 16, 1, "pixel-classifier", 512 * 512) > 5 * seconds_per_slice(
        counts, 16, 1, "pixel-classifier", 32 * 32
    )


def test_closing_the_query_image_during_a_run_cancels_it(viewer, qtbot, tiny_weights, threaded):
    image, mask = disc_volume(depth=30, size=32)
    layer = viewer.add_image(image, name="vol")
    get_session(viewer).replace_support(build_support_set(image, mask, slice_indices=[5, 20]))
    widget = make_segmenter(viewer, qtbot, tiny_weights)
    widget.support_size.setValue(16)  # one slice per batch: 30 batches
    shown = []

    def close_it(done):
        shown.append(done)
        if layer in viewer.layers:
            viewer.layers.remove(layer)

    widget.preview_updated.connect(close_it)
    assert run_and_wait(qtbot, widget) == "cancelled"
    assert "Cancelled ('vol' was closed during the run)" in widget.status.text()
    assert names(viewer) == [] and shown == [shown[0]]  # no preview left
    assert widget.panel.bar.value() <= 3 < 30  # it stopped within a batch or two, not at the end


def test_the_slice_range_defaults_to_the_painted_slices_plus_a_margin(
    viewer, qtbot, tiny_weights, inline, errors
):
    from napari_openseg.core.support import entries_from_arrays

    image, mask = disc_volume(depth=30, size=32)
    layer = viewer.add_image(image, name="vol")
    widget = make_segmenter(viewer, qtbot, tiny_weights)
    widget.query_combo.select(layer)
    assert widget.whole_volume.isChecked()  # nothing painted on 'vol' yet: the whole volume
    painted = np.zeros_like(mask)
    painted[[10, 18]] = 1
    get_session(viewer).add_entries(entries_from_arrays(image, painted, source="vol"))
    # Painted slices 10 and 18: their range (8 slices) widened by a quarter of it on each side: 8 to 20.
    assert not widget.whole_volume.isChecked()
    assert (widget.range_from.value(), widget.range_to.value()) == (8, 20)
    widget.axis_combo.setCurrentText("0")
    counts = []
    widget.preview_updated.connect(counts.append)
    assert run_and_wait(qtbot, widget) == "done"
    assert counts[-1] == 13  # slices 8..20
    output = viewer.layers["vol openseg"].data
    assert not output[:8].any() and not output[21:].any()
    widget.whole_volume.setChecked(True)
    assert not widget.range_from.isEnabled()
    assert run_and_wait(qtbot, widget) == "done"
    assert counts[-1] == 30
    widget.whole_volume.setChecked(False)
    widget.range_from.setValue(20)
    widget.range_to.setValue(12)
    assert widget.run() is None and "'to' must be at least 'from'" in errors[-1]


def test_the_expected_dice_and_method_are_shown_and_cleared_with_the_support(
    viewer, qtbot, tiny_weights, inline
):
    image, mask = disc_volume(depth=10, size=32)
    viewer.add_image(image, name="vol")
    session = get_session(viewer)
    session.add_entries(build_support_set(image, mask, slice_indices=[1, 3, 5, 7]).entries)
    widget = make_segmenter(viewer, qtbot, tiny_weights)
    assert widget.method_combo.currentText() == "auto"
    widget.method_combo.setCurrentText("pixel-classifier")
    assert run_and_wait(qtbot, widget) == "done"
    text = widget.estimate.text()
    assert text.startswith("label 1: expected Dice ") and text.endswith(
        "from 4 examples, method: pixel-classifier"
    )
    assert (
        0.8 < float(text.split("Dice ")[1].split()[0]) <= 1.0
    )  # a bright disc: the pixel classifier finds it
    session.clear_support()
    assert widget.estimate.text() == ""

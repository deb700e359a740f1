"""The support-set widget: adding slices from painted labels, tasks, gallery, save/load, errors."""

from __future__ import annotations

import numpy as np
import pytest
from qtpy.QtCore import Qt

from napari_openseg._widgets._session import get_session
from napari_openseg._widgets.support_widget import SupportSetWidget, present_values
from napari_openseg.core.support import SupportSet
from tests.widgets.conftest import disc_volume

pytestmark = pytest.mark.qt


@pytest.fixture
def painted(viewer):
    image, mask = disc_volume()
    painted = np.zeros_like(mask)
    painted[3] = mask[3]
    painted[8] = mask[8] * 2
    image_layer = viewer.add_image(image, name="vol", scale=(3.0, 1.0, 1.0))
    labels_layer = viewer.add_labels(painted, name="painted", scale=(3.0, 1.0, 1.0))
    return image_layer, labels_layer


def test_add_current_slice_follows_the_viewer(viewer, painted, inline, qtbot):
    image_layer, labels_layer = painted
    widget = SupportSetWidget(viewer)
    qtbot.addWidget(widget)
    assert widget.image_combo.current() is image_layer
    assert widget.labels_combo.current() is labels_layer
    assert widget.chosen_values() == [1, 2]

    viewer.dims.set_point(0, 3 * 3.0)  # world coordinates: slice 3 at scale 3
    widget.add_current_slice()
    support = get_session(viewer).support
    assert [(e.label, e.slice_index, e.axis, e.source) for e in support.entries] == [(1, 3, 0, "vol")]
    np.testing.assert_array_equal(support.entries[0].mask, labels_layer.data[3] == 1)
    assert widget.gallery.count() == 1
    assert "1 entries from 1 image (label 1: 1)" in widget.counts_label.text()

    viewer.dims.set_point(0, 5 * 3.0)  # nothing painted here
    widget.add_current_slice()
    assert len(support) == 1


def test_add_current_slice_refuses_an_axis_the_viewer_does_not_show(viewer, painted, inline, qtbot, errors):
    widget = SupportSetWidget(viewer)
    qtbot.addWidget(widget)
    viewer.dims.set_point(0, 3 * 3.0)
    widget.axis_combo.setCurrentText("1")  # the viewer slices along axis 0
    assert widget.add_current_slice() is None
    assert (
        "the viewer shows slices along axis 0 (array order: the NIfTI file's third axis), not along axis 1"
        in errors[-1]
    )
    assert len(get_session(viewer).support) == 0
    widget.axis_combo.setCurrentText("0")
    widget.add_current_slice()
    assert [e.slice_index for e in get_session(viewer).support.entries] == [3]


def test_a_slice_added_twice_is_one_entry_and_says_so(viewer, painted, inline, qtbot, monkeypatch):
    from napari_openseg._widgets import support_widget

    said = []
    monkeypatch.setattr(support_widget, "show_info", said.append)
    widget = SupportSetWidget(viewer)
    qtbot.addWidget(widget)
    viewer.dims.set_point(0, 3 * 3.0)
    widget.add_current_slice()
    assert said == []
    widget.add_current_slice()  # the same slice again
    assert len(said) == 1 and "nothing was added" in said[0]
    assert "slice 3 along axis 0" in said[0] and "already in the support set" in said[0]
    widget.add_all_slices()  # slices 3 (again) and 8
    support = get_session(viewer).support
    assert sorted((e.slice_index, e.label) for e in support.entries) == [(3, 1), (8, 2)]
    assert "1 entries added; 1 entry of this image is already" in said[-1]


def test_a_2d_image_added_twice_is_one_entry(viewer, inline, qtbot):
    image = np.random.default_rng(0).random((20, 24)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[4:10, 4:10] = 1
    viewer.add_image(image, name="picture")
    viewer.add_labels(labels, name="paint")
    widget = SupportSetWidget(viewer)
    qtbot.addWidget(widget)
    widget.add_current_slice()
    widget.add_all_slices()
    widget.add_all_slices()
    assert get_session(viewer).support.counts() == {1: 1}  # was 3: 2D entries name no slice


def test_add_all_labelled_slices_with_chosen_tasks(viewer, painted, inline, qtbot):
    widget = SupportSetWidget(viewer)
    qtbot.addWidget(widget)
    widget.set_values([2])
    widget.add_all_slices()
    support = get_session(viewer).support
    assert [(e.label, e.slice_index) for e in support.entries] == [(2, 8)]
    widget.set_values([1, 2])
    widget.add_all_slices()
    assert support.counts() == {1: 1, 2: 1}  # slice 8's label 2 was in already


def test_transposed_view_slices_along_the_slider_axis(viewer, inline, qtbot):
    image, mask = disc_volume(depth=10, size=32)
    painted = np.zeros_like(mask)
    painted[:, 12, :] = mask[:, 12, :]  # painted in an axis-1 slice
    viewer.add_image(image, name="vol")
    viewer.add_labels(painted, name="painted")
    viewer.dims.order = (1, 0, 2)  # the slider now moves along axis 1
    viewer.dims.set_point(1, 12)
    widget = SupportSetWidget(viewer)
    qtbot.addWidget(widget)
    widget.add_current_slice()
    entry = get_session(viewer).support.entries[0]
    assert (entry.axis, entry.slice_index, entry.image.shape) == (1, 12, (10, 32))


def test_a_transposed_view_across_the_painted_slices_is_refused(viewer, painted, inline, qtbot, errors):
    image_layer, labels_layer = painted  # label 1 painted on slice 3, label 2 on slice 8, along axis 0
    viewer.dims.order = (2, 0, 1)  # the slider now moves along axis 2, across the painted slices
    viewer.dims.set_point(2, 12)
    widget = SupportSetWidget(viewer)
    qtbot.addWidget(widget)
    assert widget.add_current_slice() is not None
    assert len(get_session(viewer).support) == 0  # no entry whose mask is a line one voxel wide
    assert "slice 12 along axis 2" in errors[-1] and "cuts across your painting" in errors[-1]
    assert "painted on slices 3 along axis 0" in errors[-1] and "Add all labelled slices" in errors[-1]
    widget.axis_combo.setCurrentText("0")  # what the message suggests
    widget.add_all_slices()
    assert sorted(e.slice_index for e in get_session(viewer).support.entries) == [3, 8]


def test_entries_from_several_images_and_2d_rgb(viewer, painted, inline, qtbot):
    widget = SupportSetWidget(viewer)
    qtbot.addWidget(widget)
    widget.add_all_slices()
    rgb = np.zeros((24, 20, 3), np.uint8)
    rgb[5:15, 4:12] = 200
    picture = viewer.add_image(rgb, name="picture", rgb=True)
    picture_labels = viewer.add_labels((rgb[..., 0] > 0).astype(np.uint8), name="picture labels")
    widget.image_combo.select(picture)
    widget.labels_combo.select(picture_labels)
    widget.add_current_slice()
    support = get_session(viewer).support
    assert sorted({e.source for e in support.entries}) == ["picture", "vol"]
    assert support.entries[-1].image.shape == (24, 20) and support.entries[-1].slice_index is None
    assert "from 2 images" in widget.counts_label.text()


def test_gallery_remove_clear_and_session_sync(viewer, painted, inline, qtbot):
    widget = SupportSetWidget(viewer)
    qtbot.addWidget(widget)
    widget.add_all_slices()
    session = get_session(viewer)
    assert widget.gallery.count() == 2
    widget.gallery.item(0).setSelected(True)
    widget.remove_selected()
    assert [e.label for e in session.support.entries] == [2]
    assert widget.gallery.count() == 1
    widget.gallery.item(0).setSelected(True)
    qtbot.keyClick(widget.gallery, Qt.Key_Delete)
    assert len(session.support) == 0 and widget.gallery.count() == 0
    # a script changing the session redraws the widget
    session.replace_support(SupportSet(entries=[]))
    widget.add_all_slices()
    session.clear_support()
    assert widget.gallery.count() == 0
    assert "Empty" in widget.counts_label.text()


def test_save_and_load(viewer, painted, inline, qtbot, tmp_path, errors):
    widget = SupportSetWidget(viewer)
    qtbot.addWidget(widget)
    widget.add_all_slices()
    path = tmp_path / "support.npz"
    assert widget.save_to(path) == path
    assert widget.save_to(path) is None  # never replaces a file without being told
    assert "exists" in errors[-1]
    loaded = SupportSet.load(path)
    assert loaded.counts() == {1: 1, 2: 1}
    get_session(viewer).clear_support()
    assert widget.load_from(path) == 2
    assert widget.gallery.count() == 2
    assert widget.load_from(path) == 0 and widget.gallery.count() == 2  # held already: none added
    assert widget.load_from(tmp_path / "missing.npz") == 0
    assert "no such support-set file" in errors[-1]


def test_errors_are_notified_and_nothing_is_added(viewer, inline, qtbot, errors):
    image, mask = disc_volume()
    viewer.add_image(image, name="vol")
    widget = SupportSetWidget(viewer)
    qtbot.addWidget(widget)
    widget.add_current_slice()
    assert "choose an image layer and the labels layer" in errors[-1]

    empty = viewer.add_labels(np.zeros_like(mask), name="empty")
    widget.labels_combo.select(empty)
    widget.add_all_slices()
    assert "has no checked label value: paint the structure" in errors[-1]

    wrong = viewer.add_labels(np.ones((12, 30, 30), np.uint8), name="wrong shape")
    widget.labels_combo.select(wrong)
    widget.add_all_slices()
    assert (
        "do not match the image" in errors[-1] and "pick the labels layer painted on this image" in errors[-1]
    )

    volume_rgb = viewer.add_image(np.zeros((4, 16, 16, 3), np.uint8), name="rgb volume", rgb=True)
    widget.image_combo.select(volume_rgb)
    widget.add_all_slices()
    assert "is an RGB volume" in errors[-1]
    assert len(get_session(viewer).support) == 0


def test_values_follow_painting(viewer, painted, qtbot):
    _, labels_layer = painted
    widget = SupportSetWidget(viewer)
    qtbot.addWidget(widget)
    qtbot.waitUntil(lambda: widget.values_list.count() == 2, timeout=5000)  # read in the background
    widget.set_values([1])
    labels_layer.data = np.where(labels_layer.data > 0, labels_layer.data, 0).astype(np.uint8)
    labels_layer.data[0, 0, 0] = 5
    labels_layer.events.data(value=labels_layer.data)
    qtbot.waitUntil(lambda: widget.values_list.count() == 3, timeout=5000)
    assert widget.chosen_values() == [1, 5]  # 2 stays unticked, the new value is ticked


def test_present_values():
    assert present_values(np.array([[0, 3], [3, 1]], np.uint8)) == [1, 3]
    assert present_values(np.array([0, 70000, 2], np.int64)) == [2, 70000]
    assert present_values(np.zeros((2, 2), bool)) == []


def test_docked_widgets_share_the_viewer_session(viewer, qtbot):
    """napari hands plugin widgets a proxy of the viewer; both widgets must still share one session."""
    _, support_widget = viewer.window.add_plugin_dock_widget("napari-openseg", "Support set")
    _, segment_widget = viewer.window.add_plugin_dock_widget("napari-openseg", "Segment")
    assert support_widget.session is segment_widget.session is get_session(viewer)
    image, _ = disc_volume()
    layer = viewer.add_image(image, name="vol")
    assert support_widget.image_combo.current() is layer
    assert segment_widget.query_combo.layers() == [layer]


def test_a_background_label_makes_strokes_and_masks_like_strokes_get_a_warning(
    viewer, inline, qtbot, monkeypatch
):
    from napari_openseg._widgets import support_widget as module

    warnings: list[str] = []
    monkeypatch.setattr(module, "show_warning", warnings.append)
    image, mask = disc_volume()
    strokes = np.zeros_like(mask)
    idx = np.arange(12, 20)
    strokes[3, idx, idx - 3] = 1  # a diagonal stroke across the disc
    strokes[3, 2, :] = 2  # background along the top
    viewer.add_image(image, name="vol")
    viewer.add_labels(strokes, name="strokes")
    widget = SupportSetWidget(viewer)
    qtbot.addWidget(widget)
    assert [widget.background_combo.itemText(i) for i in range(widget.background_combo.count())] == [
        "none (whole masks)",
        "label 1",
        "label 2",
    ]
    widget.add_all_slices()  # no background label: label 2 is a structure, label 1 looks like strokes
    support = get_session(viewer).support
    assert support.labels == [1, 2] and all(e.known is None for e in support.entries)
    assert len(warnings) == 1 and "label 1 on 1 slice" in warnings[0] and "background label" in warnings[0]
    get_session(viewer).clear_support()
    widget.set_background_label(2)
    widget.add_all_slices()
    (entry,) = get_session(viewer).support.entries
    assert entry.label == 1 and np.array_equal(entry.known, strokes[3] != 0) and len(warnings) == 1
    widget.refresh_values()  # the choice survives re-reading the painted values
    assert widget.background_label() == 2

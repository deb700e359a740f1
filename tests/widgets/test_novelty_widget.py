"""The novelty widget: train (loss shown, Cancel), load/save, seed, compute layers, live threshold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_openseg._widgets import novelty_widget
from napari_openseg._widgets._layers import owner_info
from napari_openseg._widgets._session import get_session
from napari_openseg._widgets.novelty_widget import FREE, NO_SEED, TRAINED, NoveltyWidget
from napari_openseg.core.novelty.model import NoveltyModel
from napari_openseg.core.novelty.settings import NoveltySettings
from napari_openseg.core.support import build_support_set
from napari_openseg.training.novelty.train import train_novelty
from tests._novelty_data import sphere_volume, tiny_settings

pytestmark = pytest.mark.qt


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.set_num_threads(2)
    image, labels = sphere_volume()
    path = tmp_path_factory.mktemp("novelty_widget") / "model.pt"
    return train_novelty([image], [labels], tiny_settings(), device="cpu").model.save(path)


@pytest.fixture
def scene(viewer, qtbot, monkeypatch):
    image, labels = sphere_volume()
    image_layer = viewer.add_image(image, name="vol", scale=(2.0, 1.0, 1.0))
    labels_layer = viewer.add_labels(labels.copy(), name="known", scale=(2.0, 1.0, 1.0))
    seed_layer = viewer.add_labels((image > 0.9).astype(np.uint8), name="seed", scale=(2.0, 1.0, 1.0))
    get_session(viewer).set_model(device="cpu")
    monkeypatch.setattr(novelty_widget, "NoveltyTrainSettings", tiny_settings)
    widget = NoveltyWidget(viewer)
    qtbot.addWidget(widget)
    widget.image_combo.select(image_layer)
    widget.labels_combo.select(labels_layer)
    widget.seed_combo.select(seed_layer)
    return widget, image_layer, labels_layer, labels


def run(qtbot, action) -> str:
    widget = action.__self__
    with qtbot.waitSignal(widget.run_finished, timeout=120_000) as blocker:
        assert action() is not None
    return blocker.args[0]


def test_train_shows_the_loss_and_keeps_the_model(scene, qtbot, inline, tmp_path):
    widget, *_ = scene
    widget.epochs.setValue(1)
    assert run(qtbot, widget.train) == "train done"
    assert widget.model is not None and widget.model.class_values == [0, 1, 2]
    assert len(widget.losses) == 1 and "loss" in widget.status.text()
    path = widget.save_model(str(tmp_path / "saved.pt"))
    assert NoveltyModel.load(path).class_values == [0, 1, 2]
    assert widget.model.info["settings"]["flips"] is False


def test_random_flips_checkbox_reaches_the_training_settings(scene, qtbot, inline):
    widget, *_ = scene
    widget.epochs.setValue(1)
    widget.flips.setChecked(True)
    assert run(qtbot, widget.train) == "train done"
    assert widget.model.info["settings"]["flips"] is True


def test_cancel_stops_training_without_a_model(scene, qtbot, threaded):
    widget, *_ = scene
    widget.epochs.setValue(50)
    with qtbot.waitSignal(widget.run_finished, timeout=120_000) as blocker:
        assert widget.train() is not None
        widget.cancel()
    assert blocker.args[0] == "train cancelled" and widget.model is None
    assert "Cancelled" in widget.status.text()


def test_compute_shows_one_heat_map_and_an_outline_named_after_the_image(
    scene, qtbot, inline, model_path, viewer
):
    widget, image_layer, *_ = scene
    assert widget.load_model(str(model_path))
    before = len(viewer.layers)
    assert run(qtbot, widget.compute) == "compute done"
    added = [layer.name for layer in viewer.layers][before:]
    assert added == ["vol novelty", "vol novel region"]  # nothing else by default
    assert viewer.layers["vol novel region"].contour > 0  # drawn as an outline, the heat map shows through
    assert widget.maps.appearance is not None  # the intensity map is part of the fused map
    widget.side.setCurrentText("unlike every class only")
    assert run(qtbot, widget.compute) == "compute done" and widget.maps.appearance is None


def test_compute_adds_heat_map_regions_and_segmentation_and_the_slider_moves_the_threshold(
    scene, qtbot, inline, model_path, viewer
):
    widget, image_layer, labels_layer, labels = scene
    assert widget.load_model(str(model_path))
    widget.extra_maps.setChecked(True)
    assert run(qtbot, widget.compute) == "compute done"
    heat = viewer.layers["vol novelty"]
    assert owner_info(heat)["role"] == "novelty" and heat.colormap.name == "inferno"
    assert tuple(heat.contrast_limits) == (0.0, 1.0) and heat.data.shape == labels.shape
    assert np.allclose(heat.scale, image_layer.scale)
    for name in (
        "vol novelty (unlike every class)",
        "vol novelty (far from all classes)",
        "vol novelty (unlike its own class)",
        "vol known classes",
        "vol novel region",
    ):
        assert name in viewer.layers
    assert not viewer.layers["vol novelty (unlike every class)"].visible  # on request, and hidden at first
    regions = viewer.layers["vol novel region"]
    start = widget.threshold.value() / 1000  # the slider starts at the default level
    assert start == pytest.approx(widget.maps.threshold, abs=1e-3) == pytest.approx(0.7)
    assert np.array_equal(regions.data.astype(bool), widget.maps.novel_regions(start))
    widget.threshold.setValue(950)  # a higher threshold flags fewer voxels, at once
    assert np.array_equal(regions.data.astype(bool), widget.maps.novel_regions(0.95))
    widget.threshold.setValue(0)
    assert regions.data.sum() >= widget.maps.novel_regions(0.95).sum()
    assert np.array_equal(labels_layer.data, labels)  # the user's layer is untouched


def test_the_slider_never_overwrites_regions_the_user_painted(scene, qtbot, inline, model_path, viewer):
    widget, *_ = scene
    assert widget.load_model(str(model_path))
    assert run(qtbot, widget.compute) == "compute done"
    regions = viewer.layers["vol novel region"]
    regions.paint((5, 10, 10), 9, refresh=False)  # the user's own mark, through napari's paint
    painted = np.array(regions.data)
    widget.threshold.setValue(950)
    assert np.array_equal(regions.data, painted)  # kept as the user left it
    fresh = widget._novel_layer
    assert fresh is not regions and owner_info(fresh)["role"] == "novelty:regions"
    assert np.array_equal(fresh.data.astype(bool), widget.maps.novel_regions(0.95))


def test_closing_the_image_during_compute_says_so(scene, qtbot, threaded, model_path, viewer, monkeypatch):
    widget, image_layer, *_ = scene
    assert widget.load_model(str(model_path))
    real = novelty_widget.NoveltyWidget._show_maps

    def close_first(self, maps):
        viewer.layers.remove(image_layer)
        real(self, maps)

    monkeypatch.setattr(novelty_widget.NoveltyWidget, "_show_maps", close_first)
    assert run(qtbot, widget.compute) == "compute closed"
    assert "'vol' was closed during the run; nothing was added" in widget.status.text()
    assert "vol novelty" not in viewer.layers


def test_rgb_images_are_refused_and_unchecked_extra_maps_are_removed(
    scene, qtbot, inline, model_path, viewer, errors
):
    widget, *_ = scene
    assert widget.load_model(str(model_path))
    widget.extra_maps.setChecked(True)
    assert run(qtbot, widget.compute) == "compute done"
    extra = {"vol novelty (unlike every class)", "vol novelty (far from all classes)", "vol known classes"}
    assert extra <= {layer.name for layer in viewer.layers}
    widget.extra_maps.setChecked(False)
    widget.adapt.setValue(2)  # the loaded model has no unknown prototype: adapting does nothing
    assert run(qtbot, widget.compute) == "compute done"
    assert not extra & {layer.name for layer in viewer.layers}
    assert "'Refine example' did nothing" in widget.status.text()
    rgb = viewer.add_image(np.zeros((16, 16, 3), np.uint8), rgb=True, name="photo")
    widget.image_combo.select(rgb)
    assert widget.compute() is None and "is an RGB image" in errors[-1]


def test_training_pairs_check_shapes_and_follow_closed_layers(scene, viewer, errors):
    widget, image_layer, labels_layer, _ = scene
    other = viewer.add_labels(np.zeros((3, 4, 5), np.uint8), name="other")
    widget.labels_combo.select(other)
    widget.add_pair()
    assert "pick the labels painted on this image" in errors[-1] and widget.pairs == []
    widget.labels_combo.select(labels_layer)
    widget.add_pair()
    assert widget.pair_list.count() == 1
    viewer.layers.remove(labels_layer)
    assert widget.pairs == [] and widget.pair_list.count() == 0


def test_seed_unknown_then_compute_uses_it(scene, qtbot, inline, model_path):
    widget, *_ = scene
    assert widget.load_model(str(model_path))
    assert run(qtbot, widget.seed_unknown) == "seed done"
    assert widget.model.bank.unknown is not None
    assert run(qtbot, widget.compute) == "compute done" and widget.maps.used_unknown


def test_the_settings_start_at_the_defaults_and_follow_the_controls(scene):
    widget = scene[0]
    assert widget.settings() == NoveltySettings()
    widget.side.setCurrentText("unlike every class only")
    widget.adapt.setValue(4)
    assert widget.settings() == NoveltySettings(side=None, adapt_unknown=4)


def test_training_free_mode_uses_the_session_support_set(
    scene, qtbot, inline, tiny_weights, viewer, monkeypatch
):
    from napari_openseg.core.novelty import free as novelty_free

    # Sample every slice and pixel: on this tiny grid the default strides keep too few blob pixels
    # for the unknown prototype to win any (it would then not move).
    monkeypatch.setattr(novelty_free, "ADAPT_SLICE_STRIDE", 1)
    monkeypatch.setattr(novelty_free, "ADAPT_STRIDE", 1)
    widget, _, _, labels = scene
    image, _ = sphere_volume()
    session = get_session(viewer)
    session.set_model(weights=str(tiny_weights), device="cpu")
    session.replace_support(build_support_set(image, labels, axis=0))
    widget.mode.setCurrentText(FREE)
    assert run(qtbot, widget.compute) == "compute done"
    assert viewer.layers["vol novelty"].data.shape == labels.shape and widget.maps.used_unknown
    seeded = widget.maps.fused.copy()
    widget.adapt.setValue(3)  # the seeded unknown prototype adapts on the volume
    assert run(qtbot, widget.compute) == "compute done" and widget.maps.used_unknown
    assert viewer.layers["vol novelty"].data.shape == labels.shape and not np.array_equal(
        widget.maps.fused, seeded
    )


def test_no_labels_layer_is_a_seed_unless_chosen(viewer, qtbot, inline, tiny_weights):
    """Opening a labels layer (say, the sample's) must not make it the unknown seed behind the user's back."""
    image, labels = sphere_volume()
    viewer.add_image(image, name="vol")
    widget = NoveltyWidget(viewer)
    qtbot.addWidget(widget)
    seed_layer = viewer.add_labels(labels.copy(), name="some labels")
    assert widget.seed_combo.currentText() == NO_SEED and widget._seed_layer() is None
    session = get_session(viewer)
    session.set_model(weights=str(tiny_weights), device="cpu")
    session.replace_support(build_support_set(image, labels, axis=0))
    widget.mode.setCurrentText(FREE)
    assert run(qtbot, widget.compute) == "compute done" and not widget.maps.used_unknown
    widget.seed_combo.select(seed_layer)
    viewer.layers.remove(seed_layer)  # a chosen seed that goes away falls back to none
    assert widget.seed_combo.currentText() == NO_SEED


def test_training_controls_follow_the_mode(scene):
    widget, *_ = scene
    training = (
        widget.train_button,
        widget.load_button,
        widget.add_pair_button,
        widget.labels_combo,
        widget.epochs,
        widget.flips,
    )
    assert all(control.isEnabled() for control in training)
    widget.mode.setCurrentText(FREE)
    assert not any(control.isEnabled() for control in training)
    assert widget.compute_button.isEnabled() and widget.seed_combo.isEnabled() and widget.adapt.isEnabled()
    widget.mode.setCurrentText(TRAINED)
    assert all(control.isEnabled() for control in training)


def test_switching_mode_during_training_keeps_the_controls_locked(scene, qtbot, threaded):
    widget, *_ = scene
    widget.epochs.setValue(50)
    with qtbot.waitSignal(widget.run_finished, timeout=120_000):
        assert widget.train() is not None
        widget.mode.setCurrentText(FREE)
        widget.mode.setCurrentText(TRAINED)
        assert not widget.train_button.isEnabled() and not widget.compute_button.isEnabled()
        widget.cancel()
    assert widget.train_button.isEnabled()


def test_mistakes_are_reported(scene, errors):
    widget, *_ = scene
    assert widget.compute() is None
    assert "train or load a model first" in errors[-1]
    assert widget.save_model("unused.pt") is None and "train or load" in errors[-1]
    assert not widget.load_model("/no/such/model.pt") and "does not exist" in errors[-1]

"""Dock widget: novelty maps from a prototype memory bank (MedOpenSeg) or, with no training, from the
support set.

Train (or Load) a model on image + labels pairs whose labels hold the known classes, then Compute
on any volume: by default two layers named after the image, "<image> novelty" (0-1 heat map) and
"<image> novel region" (its outline above a threshold that the slider moves live, starting at the
default level); on request the three score maps and the known classes. "Seed unknown" sets the
unknown prototype from one painted example of tissue that is not among the known classes. Training
and mapping run in the background (:mod:`._run`: progress bar with the time left and the loss, Cancel;
closing the image or the dock cancels a Compute). Weights (for the training-free mode) and device are
the viewer's session choice, shown in the Model section.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QPushButton,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_openseg._widgets._controls import LayerCombo, dock_layout, form_row, is_image, is_user_labels
from napari_openseg._widgets._layers import (
    find_owned_layer,
    layer_image,
    owner_info,
    put_output_layer,
    remove_owned_layers,
    slice_axis,
)
from napari_openseg._widgets._model_picker import ModelPicker
from napari_openseg._widgets._run import RunPanel
from napari_openseg._widgets._session import get_session, unwrap_viewer
from napari_openseg._widgets._threading import WorkHandle, report_error
from napari_openseg.core.axes import shape_text
from napari_openseg.core.novelty.free import iter_training_free_novelty
from napari_openseg.core.novelty.model import NoveltyModel
from napari_openseg.core.novelty.scores import NoveltyMaps
from napari_openseg.core.novelty.settings import NOVEL_THRESHOLD, NoveltySettings
from napari_openseg.core.novelty.volume_map import iter_novelty_map, unknown_seed_embeddings
from napari_openseg.core.progress import Progress
from napari_openseg.errors import OpenSegError
from napari_openseg.training.novelty.train import NoveltyTrainSettings, iter_train_novelty

TRAINED, FREE = "a trained model", "the support set (no training)"
#: The seed is optional: a labels layer is used as one only when the user picks it.
NO_SEED = "(none)"
SLIDER_STEPS = 1000
#: "Novel when" choices and the appearance side each one means (None: no intensity map).
SIDES = {
    "brighter than its class": "brighter",
    "darker than its class": "darker",
    "brighter or darker than its class": "either",
    "unlike every class only": None,
}
#: The score maps shown on request: (attribute of NoveltyMaps, role, layer name suffix).
SCORE_LAYERS = (
    ("cosine", "novelty:cosine", "novelty (unlike every class)"),
    ("distance", "novelty:distance", "novelty (far from all classes)"),
    ("appearance", "novelty:appearance", "novelty (unlike its own class)"),
)


class NoveltyWidget(QWidget):
    """Train or load a novelty model, seed its unknown prototype, and compute novelty maps.

    Signal ``run_finished(str)``: ``"<action> done"``, ``"<action> cancelled"``, ``"<action> failed"``
    or ``"compute closed"`` (the image was closed during the run).
    """

    run_finished = Signal(str)

    def __init__(self, napari_viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer = unwrap_viewer(napari_viewer)
        self.session = get_session(napari_viewer)
        self.model: NoveltyModel | None = None
        self.maps: NoveltyMaps | None = None
        self.losses: list[float] = []
        self.pairs: list[tuple] = []
        self._action = ""
        self._source = None  # the image of the compute in progress
        self._maps_source = None  # the image self.maps were computed from
        self._novel_layer = None

        form = QFormLayout()
        self.image_combo = form_row(
            form, "Image", LayerCombo(napari_viewer, is_image), "volume to train on or map"
        )
        self.labels_combo = form_row(
            form,
            "Known classes",
            LayerCombo(napari_viewer, is_user_labels),
            "labels layer with the tissue you know painted (0 = background); the map flags what looks "
            "like none of it",
        )
        self.pair_list = QListWidget()
        self.pair_list.setMaximumHeight(60)
        self.pair_list.setToolTip("training pairs; double-click one to remove it")
        self.add_pair_button = QPushButton("Add image + labels pair")
        self.epochs = form_row(
            form,
            "Epochs",
            QSpinBox(),
            "training passes (4 patches per volume each); a "
            "run stops after 300 steps, about 10 minutes on a 2-core CPU",
        )
        self.epochs.setRange(1, 10_000)
        self.epochs.setValue(20)
        self.flips = form_row(
            form,
            "",
            QCheckBox("Random flips"),
            "flip training patches along every axis: known classes segment much better on unseen parts "
            "(for example the other hemisphere), the novelty map is a little weaker (docs/novelty.md)",
        )
        self.mode = form_row(
            form,
            "Compare with",
            QComboBox(),
            "the known classes of a model trained here (MedOpenSeg), or of the support set "
            "through the in-context network (nothing to train)",
        )
        self.mode.addItems([TRAINED, FREE])
        self.side = form_row(
            form,
            "Novel when",
            QComboBox(),
            "besides looking unlike every known class, a voxel is novel when its intensity departs from "
            "the class it sits in: FLAIR and T2 lesions are brighter than the tissue around them",
        )
        self.side.addItems(list(SIDES))
        self.side.setCurrentIndex(list(SIDES.values()).index(NoveltySettings().side))
        self.seed_combo = form_row(
            form,
            "Unknown example",
            LayerCombo(napari_viewer, is_user_labels, (NO_SEED,), default_extra=NO_SEED),
            "optional: a labels layer with ONE example of tissue that is not among the known classes "
            "painted; the map then also measures how close each voxel is to it (the unknown prototype)",
        )
        self.adapt = form_row(
            form,
            "Refine example (steps)",
            QSpinBox(),
            "steps that move the unknown example's prototype towards the voxels of this "
            "volume that resemble it (no labels used); 0 = off",
        )
        self.adapt.setRange(0, 50)
        self.adapt.setValue(NoveltySettings().adapt_unknown)
        self.extra_maps = form_row(
            form,
            "",
            QCheckBox("Also show the score maps and known classes"),
            "three more heat maps: unlike every known class (cosine), far from all classes (distance sum), "
            "unlike its own class (intensity); and the known classes found in the image",
        )
        self.picker = ModelPicker(self.session)
        self.model_section = self.picker.section()
        self.panel = RunPanel("Novelty", host=self)

        self.train_button, self.load_button = QPushButton("Train"), QPushButton("Load model…")
        self.save_button, self.seed_button = QPushButton("Save model…"), QPushButton("Seed unknown")
        self.seed_button.setToolTip(
            "make the model's unknown prototype from the unknown example painted above"
        )
        self.compute_button, self.cancel_button = QPushButton("Compute"), self.panel.cancel_button
        self.threshold = QSlider(Qt.Horizontal)
        self.threshold.setRange(0, SLIDER_STEPS)
        self.threshold_label = QLabel("Novel above: -")
        self.threshold.setToolTip(
            "voxels whose novelty is above this value form the novel region; it starts at the default "
            f"level ({NOVEL_THRESHOLD:g}; the map runs from the body's 1st to its 99th percentile)"
        )
        self.status = self.panel.status
        self.status.setText("Train or load a model, or choose the support set.")

        layout = QVBoxLayout()
        layout.addLayout(form)
        layout.addWidget(self.model_section)
        layout.addWidget(QLabel("Training pairs (empty: the image and labels above)"))
        layout.addWidget(self.pair_list)
        layout.addWidget(self.add_pair_button)
        for row in (
            (self.train_button, self.load_button, self.save_button),
            (self.seed_button, self.compute_button),
        ):
            line = QHBoxLayout()
            for button in row:
                line.addWidget(button)
            layout.addLayout(line)
        layout.addWidget(self.threshold_label)
        layout.addWidget(self.threshold)
        layout.addWidget(self.status)
        layout.addStretch(1)
        dock_layout(self, layout, footer=self.panel)

        self.add_pair_button.clicked.connect(self.add_pair)
        self.pair_list.itemDoubleClicked.connect(self._remove_pair)
        napari_viewer.layers.events.removed.connect(self._show_pairs)  # a closed layer leaves the pairs
        self.destroyed.connect(lambda *_: napari_viewer.layers.events.removed.disconnect(self._show_pairs))
        self.train_button.clicked.connect(lambda: self.train())
        self.load_button.clicked.connect(lambda: self.load_model())
        self.save_button.clicked.connect(lambda: self.save_model())
        self.seed_button.clicked.connect(lambda: self.seed_unknown())
        self.compute_button.clicked.connect(lambda: self.compute())
        self.panel.running_changed.connect(self._set_running)
        self.panel.finished.connect(self._finished)
        self.threshold.valueChanged.connect(self._threshold_moved)
        self.mode.currentTextChanged.connect(lambda _text: self._set_running(self._busy))
        self._set_running(False)

    # --- inputs --------------------------------------------------------------------------------

    def _volume(self):
        source = self.image_combo.current()
        if source is None:
            raise OpenSegError("open a volume first (File > Open)")
        data, rgb = layer_image(source)
        if rgb:
            raise OpenSegError(
                f"'{source.name}' is an RGB image; novelty maps are made of single-channel "
                "volumes (split the channels and choose one)"
            )
        return source, np.asarray(data)

    def settings(self) -> NoveltySettings:
        """The map's settings as the controls show them (the others at their defaults)."""
        return NoveltySettings(adapt_unknown=self.adapt.value(), side=SIDES[self.side.currentText()])

    def _seed_layer(self):
        chosen = self.seed_combo.current()
        return None if isinstance(chosen, str) else chosen

    def add_pair(self) -> None:
        """Remember the chosen image and labels layers as one training pair."""
        image, labels = self.image_combo.current(), self.labels_combo.current()
        if image is None or labels is None:
            report_error(OpenSegError("choose an image and a labels layer first"), "Novelty")
            return
        shape = np.shape(layer_image(image)[0])
        if tuple(np.shape(labels.data)) != tuple(shape):
            report_error(
                OpenSegError(
                    f"'{labels.name}' has shape {shape_text(np.shape(labels.data))}, "
                    f"'{image.name}' {shape_text(shape)}: pick the labels painted on "
                    "this image"
                ),
                "Novelty",
            )
            return
        self.pairs.append((image, labels))
        self._show_pairs()

    def _show_pairs(self, *_args) -> None:
        """List the pairs whose layers are still open, under their current names."""
        self.pairs = [
            (i, lab) for i, lab in self.pairs if i in self.viewer.layers and lab in self.viewer.layers
        ]
        self.pair_list.clear()
        self.pair_list.addItems([f"{i.name} + {lab.name}" for i, lab in self.pairs])

    def _remove_pair(self, item) -> None:
        del self.pairs[self.pair_list.row(item)]
        self._show_pairs()

    def _training_pairs(self) -> tuple[list, list]:
        pairs = [(i, lab) for i, lab in self.pairs if i in self.viewer.layers and lab in self.viewer.layers]
        if not pairs:
            image, labels = self.image_combo.current(), self.labels_combo.current()
            if image is None or labels is None:
                raise OpenSegError("choose an image and its labels layer with the known classes painted")
            pairs = [(image, labels)]
        return ([np.asarray(layer_image(i)[0]) for i, _ in pairs], [np.asarray(lab.data) for _, lab in pairs])

    # --- actions -------------------------------------------------------------------------------

    @property
    def _busy(self) -> bool:
        return self.panel.running

    def _start(self, action: str, factory, on_done, message: str = "", watch=()) -> WorkHandle | None:
        if self._busy:
            self.panel.refuse("a run is in progress: wait for it or press Cancel")
            return None
        self._action = action
        return self.panel.start(
            factory, on_done, on_progress=self._show_step, message=message, watch=watch, viewer=self.viewer
        )

    def train(self) -> WorkHandle | None:
        """Train a new model on the training pairs (known classes only)."""
        try:
            images, labels = self._training_pairs()
            settings = NoveltyTrainSettings(epochs=self.epochs.value(), flips=self.flips.isChecked())
        except OpenSegError as err:
            self.panel.refuse(err)
            return None
        self.losses = []
        device = self.picker.device()
        return self._start(
            "train",
            lambda: iter_train_novelty(images, labels, settings, device=device),
            self._trained,
            message=f"Training on {len(images)} volume(s)…",
        )

    def load_model(self, path: str | None = None) -> bool:
        """Load a model file (asks for one when ``path`` is None)."""
        if path is None:
            path, _ = QFileDialog.getOpenFileName(self, "Load novelty model", "", "Novelty model (*.pt)")
            if not path:
                return False
        try:
            self.model = NoveltyModel.load(path)
        except OpenSegError as err:
            report_error(err, "Novelty")
            return False
        self.mode.setCurrentText(TRAINED)
        self.status.setText(f"Loaded {Path(path).name}: classes {self.model.class_values}.")
        self._set_running(False)
        return True

    def save_model(self, path: str | None = None) -> Path | None:
        if self.model is None:
            report_error(OpenSegError("train or load a model first"), "Novelty")
            return None
        if path is None:
            path, _ = QFileDialog.getSaveFileName(
                self, "Save novelty model", "novelty.pt", "Novelty model (*.pt)"
            )
            if not path:
                return None
        try:  # the dialog already asked before replacing a file
            return self.model.save(path, overwrite=True)
        except OpenSegError as err:
            report_error(err, "Novelty")
            return None

    def seed_unknown(self) -> WorkHandle | None:
        """Seed the model's unknown prototype from the structure painted in the "Unknown seed" layer."""
        try:
            if self.model is None:
                raise OpenSegError("train or load a model first; the training-free mode seeds at Compute")
            _, image = self._volume()
            seed = self._seed_layer()
            if seed is None:
                raise OpenSegError(
                    "paint one instance of the unseen structure in a labels layer and choose it "
                    "as 'Unknown seed'"
                )
            mask = np.asarray(seed.data) != 0
        except OpenSegError as err:
            self.panel.refuse(err)
            return None
        model, device = self.model, self.picker.device()

        def work():
            yield Progress(0, 1, "seeding")
            return unknown_seed_embeddings(image, mask, model, device)

        return self._start("seed", work, lambda emb: self._seeded(emb, int(mask.sum())))

    def compute(self) -> WorkHandle | None:
        """Novelty maps of the chosen image."""
        try:
            source, image = self._volume()
            if self.mode.currentText() == TRAINED:
                if self.model is None:
                    raise OpenSegError("train or load a model first, or choose 'support set (no training)'")
                model, device = self.model, self.picker.device()
                settings = self.settings()
                factory = lambda: iter_novelty_map(  # noqa: E731
                    image, model, settings=settings, device=device
                )
            else:
                support = self.session.support_snapshot()
                weights, device = self.picker.weights_spec(), self.picker.device()
                seed_layer = self._seed_layer()
                seed = (image, np.asarray(seed_layer.data) != 0) if seed_layer is not None else None
                if seed is not None and not seed[1].any():
                    seed = None
                axis = slice_axis(self.viewer, source)
                settings = self.settings()
                if seed is None:  # nothing to adapt, as for a model without an unknown prototype
                    settings = replace(settings, adapt_unknown=0)
                factory = lambda: iter_training_free_novelty(  # noqa: E731
                    image, support, weights, settings=settings, axis=axis, unknown_seed=seed, device=device
                )
        except OpenSegError as err:
            self.panel.refuse(err)
            return None
        self._source = source
        return self._start(
            "compute",
            factory,
            self._show_maps,
            message=f"Computing the novelty of '{source.name}'…",
            watch=[source],
        )

    def cancel(self) -> None:
        self.panel.cancel()

    # --- results -------------------------------------------------------------------------------

    def _show_step(self, step: Progress) -> None:
        if "loss" in step.payload:
            self.losses.append(step.payload["loss"])
            self.status.setText(f"Training: step {step.done}/{step.total}, loss {step.payload['loss']:.4f}")

    def _trained(self, result) -> None:
        self.model = result.model
        self.status.setText(
            f"Trained {result.steps} steps; final loss {result.losses[-1]:.4f}. "
            "Save the model, seed the unknown prototype, or Compute."
        )

    def _seeded(self, embeddings, voxels: int) -> None:
        self.model.bank.seed_unknown(embeddings, "painted in napari")
        self.status.setText(f"Unknown prototype seeded from {voxels} painted voxels.")

    def _show_maps(self, maps: NoveltyMaps) -> None:
        source = self._source
        if source not in self.viewer.layers:
            self.panel.set_outcome("closed", f"'{source.name}' was closed during the run; nothing was added")
            return
        self.maps, self._maps_source = maps, source
        heat = {
            "layer_type": "image",
            "colormap": "inferno",
            "contrast_limits": (0.0, 1.0),
            "blending": "additive",
        }
        put_output_layer(
            self.viewer, source, maps.fused, role="novelty", name=f"{source.name} novelty", **heat
        )
        extra = self.extra_maps.isChecked()
        stale = []  # an earlier run's layers would pass for this one's
        for attribute, role, suffix in SCORE_LAYERS:
            values = getattr(maps, attribute)
            if extra and values is not None:
                put_output_layer(
                    self.viewer,
                    source,
                    values,
                    role=role,
                    name=f"{source.name} {suffix}",
                    visible=False,
                    **heat,
                )
            else:
                stale.append(find_owned_layer(self.viewer, role, source))
        if extra and maps.segmentation is not None:
            put_output_layer(
                self.viewer,
                source,
                maps.segmentation,
                role="novelty:known",
                name=f"{source.name} known classes",
                opacity=0.4,
                visible=False,
            )
        else:
            stale.append(find_owned_layer(self.viewer, "novelty:known", source))
        remove_owned_layers(self.viewer, stale)
        self._novel_layer = self._put_regions(maps.novel_regions())
        self.threshold.blockSignals(True)
        self.threshold.setValue(int(round(maps.threshold * SLIDER_STEPS)))
        self.threshold.blockSignals(False)
        self._threshold_moved(self.threshold.value())
        if self.adapt.value() and not maps.used_unknown:
            self.status.setText(
                self.status.text() + " No unknown example was used, so 'Refine example' did "
                "nothing: paint one and seed it first."
            )
        if maps.notes:
            self.status.setText(self.status.text() + " Note: " + "; ".join(maps.notes) + ".")

    def _put_regions(self, regions: np.ndarray):
        """The novel region as a cyan outline (a colour the inferno heat map never shows)."""
        from napari.utils.colormaps import DirectLabelColormap

        layer = put_output_layer(
            self.viewer,
            self._maps_source,
            regions.astype(np.uint8),
            role="novelty:regions",
            name=f"{self._maps_source.name} novel region",
        )
        layer.contour = 2
        layer.colormap = DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", 1: "cyan"})
        return layer

    def _threshold_moved(self, value: int) -> None:
        if self.maps is None:
            return
        if self._maps_source not in self.viewer.layers:
            self.status.setText("The image of these maps was closed: compute again to see novel regions.")
            return
        level = value / SLIDER_STEPS
        regions = self.maps.novel_regions(level)
        self.threshold_label.setText(f"Novel above: {level:.3f} (default: {self.maps.threshold:.3f})")
        layer = self._novel_layer
        if layer is not None and layer in self.viewer.layers and not (owner_info(layer) or {}).get("edited"):
            layer.data = regions.astype(np.uint8)
        else:  # the user painted on it (it is kept) or closed it
            self._novel_layer = self._put_regions(regions)
        share = regions.sum() / max(1, int(self.maps.mask.sum()))
        self.status.setText(f"Novel region: {100 * share:.1f}% of the body above {level:.3f}.")

    def _finished(self, outcome: str) -> None:
        self.run_finished.emit(f"{self._action} {outcome}")

    def _set_running(self, running: bool) -> None:
        """Enable what can be used now: nothing but Cancel while running, and the training
        controls only in the trained-model mode (the training-free mode uses the support set)."""
        trained = self.mode.currentText() == TRAINED
        self.compute_button.setEnabled(not running)
        for control in (
            self.train_button,
            self.load_button,
            self.add_pair_button,
            self.labels_combo,
            self.epochs,
            self.flips,
            self.pair_list,
        ):
            control.setEnabled(not running and trained)
        self.adapt.setEnabled(not running)  # both modes adapt a seeded unknown prototype
        self.side.setEnabled(not running)
        self.save_button.setEnabled(not running and trained and self.model is not None)
        self.seed_button.setEnabled(not running and trained and self.model is not None)

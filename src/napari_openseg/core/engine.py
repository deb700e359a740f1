"""The segmentation engine: one place for what every capability does with the in-context network
and the support set, so that evaluation measures exactly what users run.

* the network (:mod:`.network`): resolution and preparation (:func:`prepare_network`), support
  encoding, the forward pass, and ensembling over K support subsets (:class:`EnsemblePredictor`);
* stacking and support cross-validation (:mod:`.stacking`): per task, the pixel classifier
  (:mod:`.pixel_classifier`) and the stacked classifier (filters + the network's probability) are
  cross-validated against the network on the support entries, and ``method="auto"`` runs the one with
  the highest estimated Dice (the stacked one for tasks with fewer than 12 entries);
* :class:`Engine`: a support set, a network and the settings; it fits every task once
  (:meth:`Engine.iter_fit`) and then predicts batches of slices (:meth:`Engine.predict`).

Segmentation (:mod:`.inference`) and evaluation run the :class:`Engine`; propagation and
training-free novelty maps use its network.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Sequence
from pathlib import Path

import numpy as np
import torch

from napari_openseg.core.engine_settings import (
    CHOICES,
    DEFAULT_METHOD,
    DEFAULT_SUPPORT_SIZE,
    METHODS,
    SegmentSettings,
)
from napari_openseg.core.estimates import Estimate
from napari_openseg.core.network import (
    ENCODED_SUPPORT_BUDGET,
    EnsemblePredictor,
    Network,
    auto_batch_size,
    draw_subsets,
    encode_tensors,
    load_network,
    prepare_network,
    probabilities,
    support_tensors,
    weights_name,
)
from napari_openseg.core.pixel_classifier import pixel_features
from napari_openseg.core.preprocess import from_grid
from napari_openseg.core.progress import Progress, run_to_end
from napari_openseg.core.stacking import StackingSettings, TaskModel, iter_fit_task
from napari_openseg.core.support import SupportEntry, SupportSet
from napari_openseg.errors import OpenSegError

__all__ = [
    "CHOICES",
    "DEFAULT_METHOD",
    "DEFAULT_SUPPORT_SIZE",
    "ENCODED_SUPPORT_BUDGET",
    "METHODS",
    "Engine",
    "SegmentSettings",
    "EnsemblePredictor",
    "Estimate",
    "Network",
    "auto_batch_size",
    "draw_subsets",
    "encode_tensors",
    "load_network",
    "prepare_network",
    "probabilities",
    "support_tensors",
    "weights_name",
]

log = logging.getLogger(__name__)


class Engine:
    """Segment slices from a support set with the network, the pixel classifier or both, per task.

    Parameters
    ----------
    support
        The support set (or its entries).
    model
        A weights name, a weights file, a ``UniverSeg`` network or a :class:`Network`; ``None`` is
        the default weights.
    label_values
        The tasks (default: every label of the support set).
    settings
        How to segment (:class:`~napari_openseg.core.engine_settings.SegmentSettings`: S, K, seed,
        threshold, method, precision, ...; default: the defaults).
    subsets
        The network's support subsets per task (default: drawn by :func:`draw_subsets`); evaluation
        passes its own so that every method sees the same draws.
    **options
        Fields of :class:`~napari_openseg.core.engine_settings.SegmentSettings`, over ``settings``
        (``support_size=8``, ``method="network"``, ...), and of
        :class:`~napari_openseg.core.stacking.StackingSettings`: ``folds``, ``classifier``
        (``"boosting"`` or ``"forest"``), ``balance``, ``max_entries``, ``fit_all`` (every method
        fitted, for evaluation, rather than only the chosen one) and ``tune`` (``False``: the
        classifiers cut at 0.5 rather than at their tuned cut).
    """

    def __init__(
        self,
        support: SupportSet | Sequence[SupportEntry],
        model=None,
        *,
        label_values: Sequence[int] | None = None,
        settings: SegmentSettings | None = None,
        device: str | torch.device = "auto",
        subsets: dict[int, list[list[SupportEntry]]] | None = None,
        **options,
    ):
        if isinstance(support, (str, Path)):
            support = SupportSet.load(support)
        elif isinstance(support, (list, tuple)) and all(isinstance(e, SupportEntry) for e in support):
            support = SupportSet(list(support))
        elif not isinstance(support, SupportSet):
            raise OpenSegError(
                "support must be a SupportSet or the path of a support-set file, "
                f"got {type(support).__name__}"
            )
        settings, stacking = SegmentSettings.split(settings, options)
        self.settings: SegmentSettings = settings
        self.stacking = StackingSettings(method=settings.method, **stacking)
        self.values = support.validate(label_values)
        self.support = support
        self.network = prepare_network(model, device, settings.precision)
        self.subsets = subsets or {
            v: draw_subsets(support.task(v), v, settings.support_size, settings.ensemble, settings.seed)
            for v in self.values
        }
        self._fitted: dict[bool, tuple[dict[int, TaskModel], EnsemblePredictor]] = {}

    @property
    def device(self) -> torch.device:
        return self.network.device

    def uses_colour(self, query_has_colour: bool) -> bool:
        """Whether the classifiers use colour: the query and every entry of the tasks have it."""
        return query_has_colour and all(
            e.colour is not None for v in self.values for e in self.support.task(v)
        )

    def iter_fit(self, colour: bool = False) -> Generator[Progress, None, dict[int, TaskModel]]:
        """Cross-validate and fit every task (once per ``colour`` choice); yields progress per fold."""
        if colour in self._fitted:
            return self._fitted[colour][0]
        models = {}
        for number, value in enumerate(self.values):
            steps = iter_fit_task(
                self.network,
                self.support.task(value),
                value,
                self.subsets[value],
                self.stacking,
                support_size=self.settings.support_size,
                seed=self.settings.seed,
                colour=colour,
                threshold=self.settings.threshold,
                aspect=self.settings.aspect,
            )
            while True:
                try:
                    step = next(steps)
                except StopIteration as stop:
                    models[value] = stop.value
                    break
                yield Progress(number * 100 + int(100 * step.fraction), 100 * len(self.values), step.stage)
        subsets = {v: model.subsets for v, model in models.items()}
        settings = self.settings
        predictor = EnsemblePredictor(
            self.network, subsets, settings.threshold, settings.aspect, settings.formulation
        )
        self._fitted[colour] = (models, predictor)
        return models

    def fit(self, colour: bool = False) -> dict[int, TaskModel]:
        """Run :meth:`iter_fit` to the end."""
        return run_to_end(self.iter_fit(colour))

    def estimates(self, colour: bool = False) -> dict[int, Estimate]:
        """Per task, its cross-validated estimate (fits first if needed)."""
        return {v: model.estimate for v, model in self.fit(colour).items()}

    def predict(self, slices: np.ndarray, colour: np.ndarray | None = None) -> np.ndarray:
        """Probabilities ``"b C H W"`` (float32, C = tasks) of normalised ``slices "b H W"`` (one
        shape; ``colour "b H W 3"`` where the classifiers use colour), each task by its method."""
        return self.predict_methods(slices, colour, [None])[None]

    def predict_methods(
        self, slices: np.ndarray, colour: np.ndarray | None, methods: Sequence[str | None]
    ) -> dict[str | None, np.ndarray]:
        """:meth:`predict` by each of ``methods`` (:data:`METHODS`; ``None``: each task's own), with
        the network and the features computed once (evaluation compares the methods so)."""
        use_colour = colour is not None and self.uses_colour(True)
        models = self.fit(use_colour)
        predictor = self._fitted[use_colour][1]
        chosen = {m: {v: m or models[v].method for v in self.values} for m in methods}
        on_network = [v for v in self.values if any(models[v].needs_network(c[v]) for c in chosen.values())]
        network = {}
        if on_network:
            query, mapping = self.network.query(slices, self.settings.aspect)
            probs = from_grid(predictor(query, on_network), mapping).clamp_(0, 1).cpu().numpy()
            network = dict(zip(on_network, probs.transpose(1, 0, 2, 3)))
        features = None
        if any(models[v].needs_features(c[v]) for c in chosen.values() for v in self.values):
            colours = colour if use_colour else [None] * len(slices)
            features = np.stack([pixel_features(s, c) for s, c in zip(slices, colours)])
        out = {}
        for m, per_task in chosen.items():
            out[m] = np.stack(
                [models[v].predict(features, network.get(v), per_task[v]) for v in self.values], axis=1
            )
        return out

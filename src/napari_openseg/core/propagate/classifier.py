"""The engine's pixel classifier in propagation: where intensity defines an object, it sharpens
what the network carries from slice to slice.

Per object, a pixel classifier (:mod:`napari_openseg.core.pixel_classifier`) is fitted to its
painted slices at full resolution. It joins the object's propagation only if it passes a test on
the painted slices themselves (:func:`half_split_dice`): fitted to one half of each painted slice
(left, right, upper or lower of the object's centre), it must segment the other half with a mean
Dice of at least ``classifier_gate``. An object defined by its brightness (a tumour on FLAIR) passes;
one defined by its shape among tissue that looks the same (the hippocampus) does not, and is
propagated by the network alone. Where it joins, the probability written on each slice is the mean
of the network's and the classifier's; the memories keep the network's own mask, and the network's
members give the slice's confidence. The stop rule reads the written mask for its area and, in place
of the confidence, the agreement of the two masks: beyond a tumour's end the network keeps drawing a
blob of the painted size, confidently, while the classifier finds nothing there.
Measured and chosen in docs/propagation.md (*The pixel classifier*).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from napari_openseg.core.metrics import dice_score
from napari_openseg.core.pixel_classifier import (
    FEATURE_CACHE_BYTES,
    PixelClassifier,
    feature_count,
    pixel_features,
    sample_pixels,
)

log = logging.getLogger(__name__)


class SliceFeatures:
    """Feature maps of the slices of a normalised ``"N H W"`` stack, computed on demand; the most
    recently used are kept up to :data:`FEATURE_CACHE_BYTES`."""

    def __init__(self, stack: np.ndarray):
        self.stack = stack
        per_slice = stack[0].size * 4 * feature_count()
        self.capacity = max(1, FEATURE_CACHE_BYTES // per_slice)
        self.maps: OrderedDict[int, np.ndarray] = OrderedDict()

    def __call__(self, s: int) -> np.ndarray:
        if s in self.maps:
            self.maps.move_to_end(s)
            return self.maps[s]
        maps = pixel_features(self.stack[s])
        self.maps[s] = maps
        if len(self.maps) > self.capacity:
            self.maps.popitem(last=False)
        return maps


def _fit(features: Sequence[np.ndarray], masks: Sequence[np.ndarray], known, seed: int) -> PixelClassifier:
    """A classifier fitted to a sample of the ``known`` pixels (``None``: all) of each map."""
    picked = sample_pixels(masks, known, np.random.default_rng(seed))
    rows = np.concatenate([f.reshape(-1, f.shape[-1])[p] for f, p in zip(features, picked)])
    labels = np.concatenate([m.reshape(-1)[p] for m, p in zip(masks, picked)])
    return PixelClassifier(seed=seed).fit(rows, labels)


def _halves(mask: np.ndarray) -> list[np.ndarray]:
    """Four halves of a slice: left, right, above and below its object's centre."""
    rows, cols = np.nonzero(mask)
    centre_row, centre_col = int(rows.mean()), int(cols.mean())
    index_rows, index_cols = np.indices(mask.shape)
    return [
        index_cols < centre_col,
        index_cols >= centre_col,
        index_rows < centre_row,
        index_rows >= centre_row,
    ]


def half_split_dice(features: Sequence[np.ndarray], masks: Sequence[np.ndarray], seed: int = 0) -> float:
    """How well a classifier fitted to half of each painted slice segments the other half: the mean
    Dice over the four splits of :func:`_halves` (the object's pixels in the held-out halves of all
    slices together)."""
    halves = [_halves(m) for m in masks]
    scores = []
    for split in range(4):
        train = [h[split] for h in halves]
        classifier = _fit(features, masks, train, seed)
        predicted = np.concatenate([(classifier.predict_map(f) >= 0.5)[~t] for f, t in zip(features, train)])
        truth = np.concatenate([m[~t] for m, t in zip(masks, train)])
        scores.append(dice_score(predicted, truth))
    return float(np.mean(scores))


@dataclass
class ObjectClassifier:
    """One object's classifier, its half-split Dice, and whether it joins the propagation."""

    classifier: PixelClassifier
    dice: float
    joins: bool

    def fuse(self, network: np.ndarray, features: np.ndarray, threshold: float) -> tuple[np.ndarray, float]:
        """The mean of the network's ``"H W"`` probabilities and the classifier's, and how well
        their masks at ``threshold`` agree (Dice; 1 when both are empty)."""
        classified = self.classifier.predict_map(features)
        agreement = dice_score(network >= threshold, classified >= threshold)
        return (network + classified) / 2, agreement


def fit_object(
    slice_features: SliceFeatures,
    slices: Sequence[int],
    masks: Sequence[np.ndarray],
    mode: str,
    gate: float,
    seed: int,
) -> ObjectClassifier | None:
    """The classifier of one object from its painted ``slices`` and their ``"H W"`` bool ``masks``,
    by ``mode`` (``"auto"``: it joins where its :func:`half_split_dice` reaches ``gate``); None
    with ``mode="never"``."""
    if mode == "never":
        return None
    features = [slice_features(s) for s in slices]
    dice = half_split_dice(features, masks, seed)
    joins = mode == "always" or dice >= gate
    return ObjectClassifier(_fit(features, masks, [None] * len(masks), seed), dice, joins)


def fit_objects(
    slice_features: SliceFeatures, prompt_stack: np.ndarray, prompt_slices: dict[int, list[int]], settings
) -> dict[int, ObjectClassifier]:
    """Each object's classifier (none with ``settings.pixel_classifier == "never"``) from its painted
    ``prompt_slices`` of ``prompt_stack "N H W"``; ``settings``: the run's ``PropagationSettings``."""
    fitted = {}
    for value, slices in prompt_slices.items():
        masks = [prompt_stack[s] == value for s in slices]
        found = fit_object(
            slice_features, slices, masks, settings.pixel_classifier, settings.classifier_gate, settings.seed
        )
        if found is not None:
            fitted[value] = found
            verdict = "joins the network" if found.joins else "left out"
            log.info("label %d: pixel classifier half-split Dice %.2f, %s", value, found.dice, verdict)
    return fitted

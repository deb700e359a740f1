"""Stacking and support cross-validation, one task (label value) at a time.

For a task with entries E (at most ``max_entries``, a seeded sample):

1. **Folds** (:func:`assign_folds`): E is split into k folds; entries of one source image stay in one
   fold when there are at least k sources, so that a neighbouring slice does not answer for its twin.
2. **Out-of-fold network**: for each fold, the network predicts that fold's entries from a support
   subset of up to S entries drawn from the *other* folds, so every entry gets a network probability
   that did not see its own mask.
3. **Classifiers**: the pixel classifier (:mod:`.pixel_classifier`) is fitted to the painted pixels of
   the other folds and predicts the fold; the stacked classifier does the same with the out-of-fold
   network probability as one more feature: it learns how far to trust the network, image by image
   and pixel by pixel.
4. **Cuts** (:func:`best_cut`, from :data:`MIN_CHOICE_ENTRIES` entries on): for the classifiers
   (:data:`TUNED_METHODS`), the threshold of :data:`CUT_GRID` with the best mean Dice of the held-out
   probabilities; their probabilities are then :func:`recalibrate`-d so that it reads as 0.5. Balanced
   classes make a classifier call too much foreground for a rare or thin structure (vessels,
   synapses), and the cut mends that; the network's probabilities stay as they are.
5. **Estimates** (:class:`Estimate`): each held-out entry's Dice, on its painted pixels only, per
   method, at its cut; mean and standard deviation over the entries.
6. **Choice** (``method="auto"``): the method with the highest estimated Dice, once the task has
   :data:`MIN_CHOICE_ENTRIES` entries; with fewer, the estimates are too noisy to choose by and
   ``auto`` runs the stacked method (which learns how far to trust the network), still reporting the
   estimates. Tasks with fewer than :data:`MIN_CV_ENTRIES` entries are not cross-validated: ``auto``
   runs the network and says so.
7. **Final fits** on every entry, for the chosen method (for every method with ``fit_all``).

Strokes: entries with a ``known`` mask (painted pixels; see :mod:`.support`) are fitted and scored on
those pixels only. The network needs whole masks, so it gets them filled (:mod:`.fill`): painted
pixels as painted, the rest from a random walk between the strokes and a classifier's probability.
In the folds the classifier is the pixel classifier fitted to the same folds; for the final model it
is the better-estimated of the pixel classifier and the stacked one, at its tuned cut.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Sequence
from dataclasses import dataclass

import numpy as np

from napari_openseg.core.cuts import CENTRE, best_cut, recalibrate
from napari_openseg.core.engine_settings import (
    CHOICES,
    DEFAULT_ASPECT,
    DEFAULT_FOLDS,
    DEFAULT_METHOD,
    DEFAULT_THRESHOLD,
    MAX_FIT_ENTRIES,
    METHODS,
    MIN_CHOICE_ENTRIES,
    MIN_CV_ENTRIES,
    TUNED_METHODS,
    check_choice,
)
from napari_openseg.core.estimates import MAX_SCORED_PIXELS, Estimate, ScoredPixels, assign_folds
from napari_openseg.core.fill import filled, walk
from napari_openseg.core.network import Network, with_masks
from napari_openseg.core.pixel_classifier import (
    DEFAULT_CLASSIFIER,
    FEATURE_CACHE_BYTES,
    PixelClassifier,
    feature_count,
    pixel_features,
    sample_pixels,
)
from napari_openseg.core.preprocess import Aspect
from napari_openseg.core.progress import Progress
from napari_openseg.core.support import SupportEntry
from napari_openseg.errors import OpenSegError

log = logging.getLogger(__name__)


@dataclass
class StackingSettings:
    """How a task is fitted: ``method`` (one of :data:`CHOICES`), folds, classifier and balance;
    ``tune``: the classifiers' cuts are tuned (:func:`best_cut`)."""

    method: str = DEFAULT_METHOD
    folds: int = DEFAULT_FOLDS
    classifier: str = DEFAULT_CLASSIFIER
    balance: bool = True
    max_entries: int = MAX_FIT_ENTRIES
    fit_all: bool = False
    tune: bool = True

    def __post_init__(self) -> None:
        check_choice("method", self.method, CHOICES)
        if self.folds < 2 or self.max_entries < MIN_CV_ENTRIES:
            raise OpenSegError(
                f"cross-validation needs >= 2 folds and >= {MIN_CV_ENTRIES} entries per task, got "
                f"{self.folds} folds and {self.max_entries} entries"
            )


@dataclass
class TaskModel:
    """What one task learned: the method that runs, its estimate, the fitted classifiers, and the
    network's support subsets (dense masks)."""

    label: int
    method: str
    estimate: Estimate
    subsets: list[list[SupportEntry]]
    colour: bool = False
    pixel: PixelClassifier | None = None
    stacked: PixelClassifier | None = None

    def needs_network(self, method: str | None = None) -> bool:
        return (method or self.method) in ("network", "stacked")

    def needs_features(self, method: str | None = None) -> bool:
        method = method or self.method
        return method == "pixel-classifier" or (method == "stacked" and self.stacked is not None)

    def predict(
        self, features: np.ndarray | None, network: np.ndarray | None, method: str | None = None
    ) -> np.ndarray:
        """Probabilities ``"b H W"`` from ``features "b H W F"`` and/or the network's ``"b H W"``."""
        method = method or self.method
        if method == "network" or (method == "stacked" and self.stacked is None and not self.estimate.dice):
            return network  # stacking needs cross-validation: with too few entries it is the network
        if method == "pixel-classifier":
            found = _require(self.pixel, method, self.label).predict_map(features)
        else:
            stacked = np.concatenate([features, network[..., None]], axis=-1)
            found = _require(self.stacked, method, self.label).predict_map(stacked)
        return recalibrate(found, self.estimate.cuts.get(method, CENTRE))


def _require(classifier: PixelClassifier | None, method: str, label: int) -> PixelClassifier:
    if classifier is None:
        raise OpenSegError(f"label {label}: the {method} was not fitted (fit with that method, or fit_all)")
    return classifier


class _Entries:
    """A task's entries with their feature maps (kept while small, else recomputed) and sampled pixels."""

    def __init__(self, entries: list[SupportEntry], colour: bool, rng: np.random.Generator):
        self.entries, self.colour = entries, colour
        self.keep = (
            sum(e.image.size for e in entries) * 4 * (feature_count(colour) + 1) <= FEATURE_CACHE_BYTES
        )
        self.maps: dict[int, np.ndarray] = {}
        self.walks: dict[int, np.ndarray | None] = {}
        self.pixels = sample_pixels([e.mask for e in entries], [e.known for e in entries], rng)
        self.rows = []
        for i, picked in enumerate(self.pixels):
            maps = self.features(i)
            self.rows.append(maps.reshape(-1, maps.shape[-1])[picked])
        self.labels = [e.mask.reshape(-1)[p] for e, p in zip(entries, self.pixels)]
        self.scored = [ScoredPixels.of(e, rng, MAX_SCORED_PIXELS) for e in entries]

    @classmethod
    def plain(cls, entries: list[SupportEntry]) -> _Entries:
        """Entries without features (nothing to fit: the network alone)."""
        data = cls.__new__(cls)
        data.entries, data.colour, data.keep, data.maps, data.walks = entries, False, False, {}, {}
        rng = np.random.default_rng(0)
        data.scored = [ScoredPixels.of(e, rng, MAX_SCORED_PIXELS) for e in entries]
        return data

    def features(self, i: int) -> np.ndarray:
        if i in self.maps:
            return self.maps[i]
        entry = self.entries[i]
        maps = pixel_features(entry.image, entry.colour if self.colour else None)
        if self.keep:
            self.maps[i] = maps
        return maps

    def fit(
        self,
        which: Sequence[int],
        settings: StackingSettings,
        seed: int,
        network: list[np.ndarray] | None = None,
    ) -> PixelClassifier:
        """A classifier fitted to the sampled pixels of entries ``which`` (plus their network
        probabilities ``network`` as a last feature: the stacked classifier)."""
        rows = [self.rows[i] for i in which]
        if network is not None:
            rows = [
                np.concatenate([r, network[i].reshape(-1)[self.pixels[i], None]], axis=1)
                for r, i in zip(rows, which)
            ]
        classifier = PixelClassifier(settings.classifier, settings.balance, seed)
        return classifier.fit(np.concatenate(rows), np.concatenate([self.labels[i] for i in which]))

    def predict(self, classifier: PixelClassifier, i: int, network: np.ndarray | None = None) -> np.ndarray:
        maps = self.features(i)
        if network is not None:
            maps = np.concatenate([maps, network[..., None]], axis=-1)
        return classifier.predict_map(maps)

    def predict_scored(
        self, classifier: PixelClassifier, i: int, network: np.ndarray | None = None
    ) -> np.ndarray:
        """Probabilities at the scored pixels of entry ``i`` only (cross-validation needs no more)."""
        maps = self.features(i)
        index = self.scored[i].index
        rows = maps.reshape(-1, maps.shape[-1])[index]
        if network is not None:
            rows = np.concatenate([rows, network.reshape(-1)[index, None]], axis=1)
        return classifier.predict(rows)

    def dense(self, which: Sequence[int], filler: _Filler | None) -> list[SupportEntry]:
        """Entries ``which`` with whole masks for the network (:mod:`.fill`; entries without
        strokes as they are)."""
        out = []
        for i in which:
            entry = self.entries[i]
            if entry.known is None or filler is None:
                out.append(entry)
                continue
            network = None if filler.network is None else filler.network[i]
            probability = recalibrate(self.predict(filler.classifier, i, network), filler.cut)
            out.append(with_masks([entry], [filled(entry, probability, self.walk(i))])[0])
        return out

    def walk(self, i: int) -> np.ndarray | None:
        """Entry ``i``'s random walk between its strokes (once per entry: every fold reads it)."""
        if i not in self.walks:
            self.walks[i] = walk(self.entries[i])
        return self.walks[i]


@dataclass
class _Filler:
    """What fills stroke entries for the network: a ``classifier`` at its ``cut``, with each entry's
    out-of-fold ``network`` probability when it is the stacked one."""

    classifier: PixelClassifier
    cut: float = CENTRE
    network: list[np.ndarray] | None = None


def _draw(entries: list, size: int, rng: np.random.Generator) -> list:
    if len(entries) <= size:
        return entries
    return [entries[i] for i in sorted(rng.choice(len(entries), size, replace=False))]


def _network_on(
    network: Network,
    entries: list[SupportEntry],
    subset: list[SupportEntry],
    threshold: float,
    aspect: Aspect,
) -> list[np.ndarray]:
    """The network's probabilities ``"H W"`` for each of ``entries`` from ``subset`` (batched by shape)."""
    out: list[np.ndarray | None] = [None] * len(entries)
    shapes: dict[tuple, list[int]] = {}
    for i, entry in enumerate(entries):
        shapes.setdefault(entry.image.shape, []).append(i)
    for members in shapes.values():
        for start in range(0, len(members), 8):
            chunk = members[start : start + 8]
            probs = network.predict(
                np.stack([entries[i].image for i in chunk]), [subset], threshold, aspect=aspect
            )
            for i, p in zip(chunk, probs):
                out[i] = p
    return out


def iter_fit_task(
    network: Network,
    entries: Sequence[SupportEntry],
    label: int,
    subsets: list[list[SupportEntry]],
    settings: StackingSettings,
    *,
    support_size: int,
    seed: int = 0,
    colour: bool = False,
    threshold: float = DEFAULT_THRESHOLD,
    aspect: Aspect = DEFAULT_ASPECT,
) -> Generator[Progress, None, TaskModel]:
    """Cross-validate and fit one task (see the module docstring); yields progress per fold.

    ``entries`` are the task's support entries; ``subsets`` the network's support subsets for
    queries (entries of ``entries``; their masks are made dense here when they are strokes).
    """
    rng = np.random.default_rng([seed, label])
    entries = list(entries)
    if len(entries) > settings.max_entries:
        entries = [entries[i] for i in sorted(rng.choice(len(entries), settings.max_entries, replace=False))]
    n, method = len(entries), settings.method
    sparse = any(e.known is not None for e in entries)
    if n < MIN_CV_ENTRIES:
        return (yield from _fit_without_cv(entries, label, subsets, settings, seed, colour, rng, sparse))
    wanted = set(METHODS) if settings.fit_all or method == "auto" else {method}
    classifiers = bool(wanted & {"pixel-classifier", "stacked"}) or sparse
    run_network = bool(wanted & {"network", "stacked"})
    data = _Entries(entries, colour, rng) if classifiers else _Entries.plain(entries)
    folds = assign_folds(entries, settings.folds, seed + label)
    k = int(folds.max()) + 1
    total = k + 1
    net_oof: list[np.ndarray | None] = [None] * n
    pixel_oof: list[np.ndarray | None] = [None] * n
    for f in range(k):
        yield Progress(f, total, f"cross-validating label {label}")
        train, held = np.flatnonzero(folds != f).tolist(), np.flatnonzero(folds == f).tolist()
        fold_pixel = data.fit(train, settings, seed) if classifiers else None
        if run_network:
            drawn = _draw(train, support_size, np.random.default_rng([seed, label, f]))
            subset = data.dense(drawn, _Filler(fold_pixel) if sparse else None)  # only those drawn
            for i, p in zip(
                held, _network_on(network, [entries[i] for i in held], subset, threshold, aspect)
            ):
                net_oof[i] = p
        for i in held if fold_pixel is not None else []:
            pixel_oof[i] = data.predict_scored(fold_pixel, i)
    held_out: dict[str, list] = {}
    if run_network:
        held_out["network"] = net_oof
    if classifiers:
        held_out["pixel-classifier"] = pixel_oof
    if "stacked" in wanted:
        stacked_oof = [None] * n
        for f in range(k):
            train, held = np.flatnonzero(folds != f).tolist(), np.flatnonzero(folds == f).tolist()
            fold_stacked = data.fit(train, settings, seed, net_oof)
            for i in held:
                stacked_oof[i] = data.predict_scored(fold_stacked, i, net_oof[i])
        held_out["stacked"] = stacked_oof
    masks, scored = [e.mask for e in entries], data.scored
    tune = settings.tune and n >= MIN_CHOICE_ENTRIES
    cuts = {m: best_cut(held_out[m], masks, scored) for m in TUNED_METHODS if tune and m in held_out}
    dice = {}
    for m, found in held_out.items():
        cut = cuts.get(m, CENTRE)
        values = [s.dice(recalibrate(p, cut), mask, threshold) for p, mask, s in zip(found, masks, scored)]
        dice[m] = (float(np.mean(values)), float(np.std(values)))
    note = _note(entries, sparse)
    if method == "auto":
        method, why = _choose(dice, n)
        note = "; ".join(filter(None, [note, why]))
    yield Progress(k, total, f"fitting label {label}")
    everything = list(range(n))
    keep_pixel = settings.fit_all or method == "pixel-classifier"
    pixel = data.fit(everything, settings, seed) if (keep_pixel or sparse) else None
    stacked = (
        data.fit(everything, settings, seed, net_oof)
        if ("stacked" in wanted and (settings.fit_all or method == "stacked"))
        else None
    )
    estimate = Estimate(label, method, n, dice, note, cuts)
    filler = None
    if sparse:
        filler = _Filler(pixel, cuts.get("pixel-classifier", CENTRE))
        if "stacked" in dice and dice["stacked"][0] > dice.get("pixel-classifier", (-1.0,))[0]:
            fitted = stacked if stacked is not None else data.fit(everything, settings, seed, net_oof)
            filler = _Filler(fitted, cuts.get("stacked", CENTRE), net_oof)
    model = TaskModel(
        label,
        method,
        estimate,
        _dense_subsets(subsets, data, filler, pixel),
        colour,
        pixel if keep_pixel else None,
        stacked,
    )
    yield Progress(total, total, f"fitted label {label}")
    log.info("label %d: %s", label, estimate.describe())
    return model


def _choose(dice: dict[str, tuple[float, float]], n: int) -> tuple[str, str]:
    """``auto``'s method for a task with ``n`` cross-validated entries (see the module docstring),
    and why, when the estimates were not used to choose it."""
    if n < MIN_CHOICE_ENTRIES:
        return "stacked", f"too few examples to choose a method by: {MIN_CHOICE_ENTRIES} or more are needed"
    return max(dice, key=lambda m: (round(dice[m][0], 6), -METHODS.index(m))), ""


def _note(entries: list[SupportEntry], sparse: bool) -> str:
    return "scored on painted pixels only" if sparse else ""


def _dense_subsets(
    subsets: list[list[SupportEntry]], data: _Entries, filler: _Filler | None, pixel: PixelClassifier | None
):
    """The network's query subsets with whole masks for stroke entries (``filler`` fills them; an
    entry left out of the fitting sample has no network probability: ``pixel`` fills it)."""
    if filler is None:
        return subsets
    index = {id(e): i for i, e in enumerate(data.entries)}
    done: dict[int, SupportEntry] = {}  # an entry in several subsets is filled once

    def whole(entry: SupportEntry) -> SupportEntry:
        if entry.known is None:
            return entry
        if id(entry) not in done:
            if id(entry) in index:
                done[id(entry)] = data.dense([index[id(entry)]], filler)[0]
            else:  # an entry left out of the fitting sample: its own features, the pixel classifier
                probability = pixel.predict_map(
                    pixel_features(entry.image, entry.colour if data.colour else None)
                )
                done[id(entry)] = with_masks([entry], [filled(entry, probability, walk(entry))])[0]
        return done[id(entry)]

    return [[whole(entry) for entry in subset] for subset in subsets]


def _fit_without_cv(entries, label, subsets, settings, seed, colour, rng, sparse):
    """A task with fewer than :data:`MIN_CV_ENTRIES` entries: no estimate; ``auto`` and ``stacked``
    run the network (which needs no fitting), the pixel classifier is fitted if asked for."""
    n = len(entries)
    yield Progress(0, 1, f"fitting label {label}")
    asked = settings.method
    method = "pixel-classifier" if asked == "pixel-classifier" else "network"
    classifiers = method == "pixel-classifier" or sparse or settings.fit_all
    data = _Entries(entries, colour, rng) if classifiers else None
    pixel = data.fit(range(n), settings, seed) if classifiers else None
    word = "example" if n == 1 else "examples"
    note = f"{n} {word}: too few to cross-validate (3 or more are needed); " + (
        "the pixel classifier as asked" if method == "pixel-classifier" else "the network alone"
    )
    estimate = Estimate(label, method, n, {}, note)
    dense = (
        _dense_subsets(subsets, data, _Filler(pixel) if sparse else None, pixel)
        if data is not None
        else subsets
    )
    yield Progress(1, 1, f"fitted label {label}")
    return TaskModel(
        label,
        method,
        estimate,
        dense,
        colour,
        pixel if (method == "pixel-classifier" or settings.fit_all) else None,
        None,
    )

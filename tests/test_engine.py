"""The engine: stacking beats the network where intensity decides and the pixel classifier where
shape decides; the cross-validation folds never let an entry see itself; strokes never count
unpainted pixels; tasks with too few entries fall back to the network and say so."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_openseg.core import stacking
from napari_openseg.core.engine import Engine, prepare_network
from napari_openseg.core.estimates import assign_folds
from napari_openseg.core.metrics import dice_score
from napari_openseg.core.preprocess import normalize_intensity
from napari_openseg.core.support import SupportEntry, build_support_set

pytest.importorskip("sklearn")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def flat_classes(rng, size=32):
    """Two flat classes (0.2 and 0.8, light noise) in random rectangles: intensity decides, shape says nothing."""
    labels = np.zeros((size, size), bool)
    for _ in range(3):
        h, w = rng.integers(3, 12, 2)
        y, x = rng.integers(0, size - h), rng.integers(0, size - w)
        labels[y : y + h, x : x + w] = True
    image = np.where(labels, 0.8, 0.2) + rng.normal(0, 0.03, labels.shape)
    return normalize_intensity(image), labels


def ring(rng, size=128):
    """A thin bright ring; the structure is the whole disc inside it: only shape says where it is."""
    yy, xx = np.mgrid[:size, :size]
    radius = rng.uniform(30, 48)
    cy, cx = rng.uniform(radius + 4, size - radius - 4, 2)
    distance = np.hypot(yy - cy, xx - cx)
    image = 0.3 + 0.5 * (np.abs(distance - radius) <= 1.5) + rng.normal(0, 0.05, (size, size))
    return normalize_intensity(image), distance <= radius


def entries(pairs, label=1):
    return [SupportEntry(image, mask, label, source=f"image {i}") for i, (image, mask) in enumerate(pairs)]


def mean_dice(probs: np.ndarray, truths) -> float:
    return float(np.mean([dice_score(p >= 0.5, t) for p, t in zip(probs, truths)]))


def test_where_intensity_decides_stacking_beats_the_network(tiny_net):
    rng = np.random.default_rng(0)
    engine = Engine(entries([flat_classes(rng) for _ in range(8)]), tiny_net, device="cpu", fit_all=True)
    queries = [flat_classes(rng) for _ in range(4)]
    found = engine.predict_methods(np.stack([q[0] for q in queries]), None, ["network", "stacked", None])
    truths = [q[1] for q in queries]
    network, stacked, auto = (mean_dice(found[m][:, 0], truths) for m in ("network", "stacked", None))
    assert stacked > 0.95 and stacked > network + 0.3
    estimate = engine.estimates()[1]
    assert estimate.method != "network" and auto > 0.95
    assert estimate.dice["stacked"][0] > estimate.dice["network"][0] + 0.3  # the estimate saw it coming


def test_where_shape_decides_stacking_beats_the_pixel_classifier():
    rng = np.random.default_rng(0)
    engine = Engine(
        entries([ring(rng) for _ in range(8)]), None, device="cpu", fit_all=True
    )  # bundled weights
    queries = [ring(rng) for _ in range(4)]
    found = engine.predict_methods(
        np.stack([q[0] for q in queries]), None, ["pixel-classifier", "stacked", None]
    )
    truths = [q[1] for q in queries]
    pixel, stacked, auto = (mean_dice(found[m][:, 0], truths) for m in ("pixel-classifier", "stacked", None))
    assert stacked > pixel + 0.1
    assert engine.estimates()[1].method != "pixel-classifier" and auto > pixel + 0.05


def test_folds_split_sources_and_never_hold_an_entry_in_its_own_training_fold(tiny_net, monkeypatch):
    rng = np.random.default_rng(1)
    pairs = [flat_classes(rng) for _ in range(10)]
    task = [
        SupportEntry(im, m, 1, source=f"volume {i // 2}", slice_index=i % 2)
        for i, (im, m) in enumerate(pairs)
    ]
    folds = assign_folds(task, 4, seed=0)
    assert sorted(set(folds.tolist())) == [0, 1, 2, 3]
    assert all(folds[i] == folds[i + 1] for i in range(0, 10, 2))  # the two slices of a volume stay together
    network_calls, fits = [], []
    run_network, fit = stacking._network_on, stacking._Entries.fit

    def spy_network(network, held, subset, threshold, aspect):
        network_calls.append(({id(e) for e in held}, {id(e) for e in subset}))
        return run_network(network, held, subset, threshold, aspect)

    def spy_fit(self, which, settings, seed, network=None):
        fits.append(({id(self.entries[i]) for i in which}, network is not None))
        return fit(self, which, settings, seed, network)

    monkeypatch.setattr(stacking, "_network_on", spy_network)
    monkeypatch.setattr(stacking._Entries, "fit", spy_fit)
    engine = Engine(task, tiny_net, device="cpu", support_size=16, fit_all=True)
    engine.fit()
    held_out = [held for held, _ in network_calls]
    assert sorted(len(h) for h in held_out) == sorted(np.bincount(folds).tolist())
    assert set().union(*held_out) == {id(e) for e in task}  # every entry is held out once
    for held, subset in network_calls:
        assert not held & subset and subset  # its own mask never in the network's support
    cross_validated = fits[:-2]  # the last two are the final fits on every entry
    for held in held_out:  # each fold's classifiers (pixel and stacked) never fitted on the fold
        assert sum(1 for which, _ in cross_validated if not which & held) == 2
    assert all(len(which) == 10 for which, _ in fits[-2:])


def strokes_of(mask: np.ndarray, rng, share: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """Labels painted as strokes: a few rows of each structure (about ``share`` of it) as 1, a few
    background rows as 2 (the background label); everything else 0 (unpainted)."""
    labels = np.zeros(mask.shape, np.uint8)
    rows = np.flatnonzero(mask.any(axis=1))
    for row in rng.choice(rows, max(1, int(share * len(rows))), replace=False):
        labels[row][mask[row]] = 1
    for row in rng.choice(mask.shape[0], 3, replace=False):
        labels[row][~mask[row]] = 2
    return labels, labels != 0


def test_strokes_never_count_unpainted_pixels(tiny_net):
    rng = np.random.default_rng(2)
    pairs = [flat_classes(rng) for _ in range(6)]
    support = []
    for i, (image, mask) in enumerate(pairs):
        labels, painted = strokes_of(mask, rng)
        found = build_support_set(image, labels, background_label=2, source=f"image {i}").entries
        assert [e.label for e in found] == [1] and np.array_equal(found[0].known, painted)
        assert not (found[0].mask & ~found[0].known).any()
        support += found
    engine = Engine(support, tiny_net, device="cpu", method="pixel-classifier")
    estimate = engine.estimates()[1]
    # Scored on painted pixels, the pixel classifier is near perfect; had the unpainted structure
    # counted as background, it would score about 2 * 0.15 / 1.15 = 0.26 and learn that bright is background.
    assert estimate.dice["pixel-classifier"][0] > 0.95
    query, truth = flat_classes(rng)
    probs = engine.predict(query[None])[0, 0]
    assert dice_score(probs >= 0.5, truth) > 0.9
    # Strokes alone (unpainted pixels as background) wreck the same classifier: the test can fail.
    whole = [SupportEntry(e.image, e.mask, 1, e.source) for e in support]
    naive = Engine(whole, tiny_net, device="cpu", method="pixel-classifier")
    assert dice_score(naive.predict(query[None])[0, 0] >= 0.5, truth) < 0.7


def a_stroke_through_each(mask: np.ndarray, rng) -> np.ndarray:
    """Labels as a user who paints every structure draws them: one row through each structure's
    middle as 1, three background rows as 2, everything else 0 (unpainted)."""
    from scipy import ndimage

    labels = np.zeros(mask.shape, np.uint8)
    for row in rng.choice(mask.shape[0], 3, replace=False):
        labels[row][~mask[row]] = 2
    found, count = ndimage.label(mask)
    for part in range(1, count + 1):
        rows = np.flatnonzero((found == part).any(axis=1))
        middle = rows[len(rows) // 2]
        labels[middle][found[middle] == part] = 1
    return labels


def test_the_network_gets_dense_masks_made_from_strokes(tiny_net):
    rng = np.random.default_rng(3)
    support = []
    truths = []
    for i in range(6):
        image, mask = flat_classes(rng)
        labels = a_stroke_through_each(mask, rng)
        support += build_support_set(image, labels, background_label=2, source=f"image {i}").entries
        truths.append(mask)
    engine = Engine(support, tiny_net, device="cpu", method="network")
    models = engine.fit()
    dense = {id(e.image): e.mask for subset in models[1].subsets for e in subset}
    for entry, truth in zip(support, truths):
        filled = dense[id(entry.image)]
        assert (filled[entry.known] == entry.mask[entry.known]).all()  # painted pixels as painted
        assert dice_score(filled, truth) > 0.9  # the rest filled in, not left as background


def test_tasks_with_one_or_two_entries_fall_back_to_the_network_and_say_so(tiny_net):
    rng = np.random.default_rng(4)
    two = entries([flat_classes(rng) for _ in range(2)])
    for method in ("auto", "stacked"):
        estimate = Engine(two, tiny_net, device="cpu", method=method).estimates()[1]
        assert estimate.method == "network" and estimate.expected is None
        assert "2 examples: too few to cross-validate" in estimate.describe()
    pixel = Engine(two[:1], tiny_net, device="cpu", method="pixel-classifier").estimates()[1]
    assert pixel.method == "pixel-classifier" and "1 example:" in pixel.describe()


def test_estimate_reads_as_the_widget_shows_it(tiny_net):
    import re

    rng = np.random.default_rng(5)
    engine = Engine(entries([flat_classes(rng) for _ in range(5)]), tiny_net, device="cpu")
    estimate = engine.estimates()[1]
    pattern = (
        r"expected Dice [01]\.\d\d \+/- 0\.\d\d from 5 examples, method: stacked "
        r"\(too few examples to choose a method by: 12 or more are needed\)"
    )
    assert re.fullmatch(pattern, estimate.describe()) and estimate.method in estimate.describe()
    assert estimate.to_dict()["expected_dice"] == round(estimate.expected[0], 4)


def test_auto_chooses_by_the_estimates_from_12_entries_and_stacks_below(tiny_net):
    rng = np.random.default_rng(6)
    pairs = [flat_classes(rng) for _ in range(12)]
    few = Engine(entries(pairs[:11]), tiny_net, device="cpu").estimates()[1]
    assert few.method == "stacked" and few.expected is not None and set(few.dice) == {*stacking.METHODS}
    assert "too few examples to choose" in few.note
    enough = Engine(entries(pairs), tiny_net, device="cpu").estimates()[1]
    best = max(enough.dice, key=lambda m: enough.dice[m][0])
    assert enough.examples == 12 and enough.method == best and enough.note == ""
    # the rule itself: below 12 the estimates are not used, from 12 on the best one wins (ties: order)
    dice = {"network": (0.9, 0.0), "pixel-classifier": (0.5, 0.0), "stacked": (0.7, 0.0)}
    assert stacking._choose(dice, stacking.MIN_CHOICE_ENTRIES - 1)[0] == "stacked"
    assert stacking._choose(dice, stacking.MIN_CHOICE_ENTRIES) == ("network", "")
    assert stacking._choose({m: (0.8, 0.0) for m in dice}, 20) == ("network", "")


def test_one_network_is_prepared_once_and_reused(tiny_net):
    network = prepare_network(tiny_net, "cpu")
    assert prepare_network(network, "cpu") is network and network.net is not tiny_net
    assert not any(p.requires_grad for p in network.net.parameters())


@pytest.mark.parametrize("method", ["network", "pixel-classifier", "stacked", "auto"])
def test_every_method_segments_a_volume_in_batches_the_same_way(tiny_net, method):
    from napari_openseg.core.segment.inference import segment

    rng = np.random.default_rng(6)
    pairs = [flat_classes(rng) for _ in range(5)]
    support = build_support_set(
        np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]).astype(np.uint8)
    )
    volume = np.stack([flat_classes(rng)[0] for _ in range(3)])
    one = segment(volume, support, tiny_net, method=method, batch_size=1, device="cpu")
    three = segment(volume, support, tiny_net, method=method, batch_size=3, device="cpu")
    assert np.allclose(one.probabilities, three.probabilities, atol=1e-5)
    assert one.estimates[1].method == (method if method != "auto" else one.estimates[1].method)


def test_scoring_a_sample_of_pixels_gives_the_whole_entrys_dice():
    from napari_openseg.core.estimates import ScoredPixels

    rng = np.random.default_rng(7)
    mask = np.zeros((300, 300), bool)
    mask[100:130, 40:90] = True  # a small structure: 1.7 % of the pixels
    prediction = np.zeros_like(mask)
    prediction[105:140, 50:95] = True
    entry = SupportEntry(rng.random(mask.shape).astype(np.float32), mask, 1)
    scored = ScoredPixels.of(entry, rng, limit=8000)
    assert (
        len(scored.index) == 8000 and mask.reshape(-1)[scored.index].sum() == mask.sum()
    )  # all of the rare class
    assert abs(scored.dice(prediction.astype(np.float32), mask, 0.5) - dice_score(prediction, mask)) < 0.04
    whole = ScoredPixels.of(SupportEntry(entry.image[:50, :50], mask[:50, :50], 1), rng, limit=4000)
    assert len(whole.index) == 2500 and np.all(whole.weight == 1)

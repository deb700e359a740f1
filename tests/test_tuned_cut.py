"""Tuned cuts: the classifiers' probabilities are recalibrated per task so that the threshold with
the best cross-validated Dice reads as 0.5 (from 12 entries on); the network's are left alone."""

from __future__ import annotations

import numpy as np
import pytest

from napari_openseg.core.cuts import CENTRE, best_cut, recalibrate
from napari_openseg.core.engine import Engine
from napari_openseg.core.estimates import ScoredPixels
from napari_openseg.core.metrics import dice_score
from napari_openseg.core.preprocess import normalize_intensity
from napari_openseg.core.support import SupportEntry

pytest.importorskip("sklearn")


def rare_spots(rng, size=64):
    """Four 3 x 3 spots a little brighter than a noisy background: balanced classes make a
    classifier call much of the background foreground at 0.5."""
    labels = np.zeros((size, size), bool)
    for _ in range(4):
        y, x = rng.integers(0, size - 3, 2)
        labels[y : y + 3, x : x + 3] = True
    image = np.where(labels, 0.6, 0.4) + rng.normal(0, 0.12, labels.shape)
    return normalize_intensity(image), labels


def test_recalibrate_makes_the_cut_the_centre_and_keeps_the_order():
    p = np.linspace(0, 1, 101, dtype=np.float32)
    out = recalibrate(p, 0.8)
    assert out[0] == 0 and out[-1] == pytest.approx(1) and out[80] == pytest.approx(CENTRE)
    assert np.all(np.diff(out) > 0)  # no two pixels swap
    assert ((out >= CENTRE) == (p >= 0.8)).all()  # thresholding at 0.5 now cuts at 0.8
    assert recalibrate(p, CENTRE) is p


def test_best_cut_is_the_one_with_the_best_dice_and_ties_go_to_the_centre():
    mask = np.zeros((4, 4), bool)
    mask[:2] = True
    scored = ScoredPixels(np.arange(16), np.ones(16))
    # foreground at 0.75, background at 0.6: every cut above 0.6 and up to 0.75 separates them
    probs = np.where(mask, 0.75, 0.6).astype(np.float32)
    assert best_cut([probs], [mask], [scored]) == 0.65  # 0.65, 0.7 and 0.75 tie: the nearest to 0.5
    # background at 0.3 and foreground at 0.45: below the usual 0.5
    low = np.where(mask, 0.45, 0.3).astype(np.float32)
    assert best_cut([low, low], [mask, mask], [scored, scored]) == 0.45
    assert best_cut([np.where(mask, 0.9, 0.1)], [mask], [scored]) == CENTRE  # already right at 0.5


def test_a_tuned_cut_mends_a_classifier_that_overcalls_a_rare_structure(tiny_net):
    rng = np.random.default_rng(0)
    pairs = [rare_spots(rng) for _ in range(12)]
    task = [SupportEntry(im, m, 1, source=f"image {i}") for i, (im, m) in enumerate(pairs)]
    queries = [rare_spots(rng) for _ in range(6)]
    slices = np.stack([q[0] for q in queries])
    found = {}
    for tune in (True, False):
        engine = Engine(task, tiny_net, device="cpu", method="pixel-classifier", tune=tune)
        probs = engine.predict(slices)[:, 0]
        found[tune] = (
            np.mean([dice_score(p >= 0.5, q[1]) for p, q in zip(probs, queries)]),
            engine.estimates()[1],
        )
    (tuned, estimate), (plain, untuned) = found[True], found[False]
    assert estimate.cuts["pixel-classifier"] > 0.7 and untuned.cuts == {}
    assert tuned > plain + 0.1  # measured 0.62 against 0.46
    assert estimate.expected[0] > untuned.expected[0]  # the estimate is of the tuned cut
    assert estimate.to_dict()["per_method"]["pixel-classifier"]["cut"] == estimate.cuts["pixel-classifier"]


def test_tasks_below_12_entries_and_the_network_keep_their_probabilities(tiny_net):
    rng = np.random.default_rng(1)
    pairs = [rare_spots(rng) for _ in range(12)]
    task = [SupportEntry(im, m, 1, source=f"image {i}") for i, (im, m) in enumerate(pairs)]
    few = Engine(task[:11], tiny_net, device="cpu", fit_all=True).estimates()[1]
    assert few.cuts == {}
    # the bundled weights' Dice-best cut on this task is 0.2: were the network tuned, it would show
    engine = Engine(task, None, device="cpu", fit_all=True)
    enough = engine.estimates()[1]
    assert "network" not in enough.cuts and set(enough.cuts) <= {"pixel-classifier", "stacked"}
    query = np.stack([rare_spots(rng)[0]])
    network = engine.predict_methods(query, None, ["network"])["network"]
    untuned = Engine(task, None, device="cpu", fit_all=True, tune=False)
    assert np.array_equal(network, untuned.predict_methods(query, None, ["network"])["network"])

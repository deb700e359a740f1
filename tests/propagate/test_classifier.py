"""The pixel classifier in propagation: the half-split test that decides whether it joins, the
fusion with the network, and a run where the network is unsure and the classifier decides."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_openseg.core.metrics import dice_score
from napari_openseg.core.pixel_classifier import pixel_features
from napari_openseg.core.propagate import classifier as module
from napari_openseg.core.propagate.classifier import SliceFeatures, fit_object, half_split_dice
from napari_openseg.core.propagate.propagation import propagate
from napari_openseg.core.propagate.settings import DEFAULT_CLASSIFIER_GATE
from napari_openseg.errors import OpenSegError
from tests._blobs import disc_volume, largest_slice, one_thread

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


def bright_disc():
    """A bright disc in noise: intensity alone says what is object."""
    image, truth = disc_volume((8, 40, 48), first=1, last=6)
    return image, truth.astype(bool)


def square_in_noise():
    """A square of the same noise as its surroundings: nothing but its outline, which no pixel
    feature sees, says what is object."""
    rng = np.random.default_rng(3)
    image = rng.normal(0.5, 0.1, (8, 40, 48)).astype(np.float32)
    truth = np.zeros(image.shape, bool)
    truth[1:7, 10:30, 12:36] = True
    return image, truth


def test_the_half_split_dice_tells_intensity_from_shape():
    for make, low, high in ((bright_disc, 0.9, 1.0), (square_in_noise, 0.0, 0.5)):
        image, truth = make()
        z = largest_slice(truth)
        dice = half_split_dice([pixel_features(image[z])], [truth[z]])
        assert low <= dice <= high, (make.__name__, dice)


def test_the_mode_and_gate_decide_whether_the_classifier_joins():
    image, truth = square_in_noise()
    features = SliceFeatures(image)
    masks = [truth[3], truth[4]]
    assert fit_object(features, [3, 4], masks, "never", 0.65, seed=0) is None
    auto = fit_object(features, [3, 4], masks, "auto", 0.65, seed=0)
    assert not auto.joins and auto.dice < 0.65
    assert fit_object(features, [3, 4], masks, "always", 0.65, seed=0).joins
    assert fit_object(features, [3, 4], masks, "auto", 0.0, seed=0).joins  # gate 0: any Dice joins
    fitted = fit_object(SliceFeatures(bright_disc()[0]), [3], [bright_disc()[1][3]], "auto", 0.65, seed=0)
    assert fitted.joins and fitted.dice >= 0.65
    network = np.full((40, 48), 0.2, np.float32)
    maps = pixel_features(bright_disc()[0][4])
    classified = fitted.classifier.predict_map(maps)
    fused, agreement = fitted.fuse(network, maps, 0.5)
    np.testing.assert_allclose(fused, (0.2 + classified) / 2, rtol=1e-6)
    assert agreement == 0.0  # the network's mask is empty, the classifier's is the disc
    fused, agreement = fitted.fuse(classified, maps, 0.5)
    assert agreement == 1.0 and dice_score(fused >= 0.5, bright_disc()[1][4]) > 0.9


def test_slice_features_are_kept_up_to_the_budget(monkeypatch):
    image = np.random.default_rng(0).random((5, 20, 20)).astype(np.float32)
    features = SliceFeatures(image)
    assert features(2) is features(2)  # kept
    np.testing.assert_array_equal(features(1), pixel_features(image[1]))
    monkeypatch.setattr(module, "FEATURE_CACHE_BYTES", 1)  # room for one slice at a time
    small = SliceFeatures(image)
    first = small(0)
    small(1)
    assert small.capacity == 1 and list(small.maps) == [1] and small(0) is not first


@pytest.fixture
def unsure_network(monkeypatch):
    """The network says 0.5 everywhere: on its own every pixel is object."""
    from napari_openseg.core.propagate import propagation

    def half(net, entries, sets, image, keep):
        return torch.full((len(sets), *image.shape[-2:]), 0.5)

    monkeypatch.setattr(propagation, "_predict", half)


def test_where_the_network_is_unsure_a_joined_classifier_decides(tiny_net, unsure_network):
    image, truth = bright_disc()
    prompt = np.zeros(truth.shape, np.uint8)
    z = largest_slice(truth)
    prompt[z] = truth[z]
    options = dict(device="cpu", stop_after=99, min_area=0.0, stop_ratio=0.0)
    alone = propagate(image, prompt, tiny_net, pixel_classifier="never", **options)
    joined = propagate(image, prompt, tiny_net, **options)  # "auto": the bright disc passes
    assert alone.classifier_joined == [] and alone.classifier_dice == {}
    others = np.arange(8) != z
    assert (alone.labels[others] == 1).all()  # the network alone draws everywhere but where painted
    assert joined.classifier_joined == [1] and joined.classifier_dice[1] > max(0.9, DEFAULT_CLASSIFIER_GATE)
    assert dice_score(joined.labels == 1, truth) > 0.9
    summary = joined.summary()["pixel_classifier"]["1"]
    assert summary["joined"] and summary["half_split_dice"] > 0.9


@pytest.fixture
def copying_network(monkeypatch):
    """The network copies its first support entry's mask, sure of itself: past the object's end
    it keeps drawing the painted blob, the failure the classifier's agreement catches."""
    from napari_openseg.core.propagate import propagation

    def copy(net, entries, sets, image, keep):
        return torch.stack([entries[row[0]].mask.float() for row in sets])

    monkeypatch.setattr(propagation, "_predict", copy)


def test_a_joined_classifier_ends_the_fronts_where_the_object_ends(tiny_net, copying_network):
    image, truth = disc_volume((16, 40, 48), first=5, last=10)
    truth = truth.astype(bool)
    z = largest_slice(truth)
    prompt = np.zeros(truth.shape, np.uint8)
    prompt[z] = truth[z]
    # Every confidence stop off: what stops the fronts is the classifier's agreement, or nothing.
    # At threshold 0.4 the mean of the network's 1 and the classifier's 0 is written.
    options = dict(
        device="cpu", threshold=0.4, stop_ratio=0.0, stop_confidence=0.0, pixel_classifier="always"
    )
    agreeing = propagate(image, prompt, tiny_net, classifier_stop=0.3, **options)
    confident = propagate(image, prompt, tiny_net, classifier_stop=0.0, **options)
    drawn = lambda result: set(np.flatnonzero((result.labels == 1).any(axis=(1, 2))))  # noqa: E731
    assert drawn(confident) == set(range(16))  # the blob, written on every slice
    assert drawn(agreeing) <= set(range(4, 12)) and set(range(6, 10)) <= drawn(agreeing)
    assert dice_score(agreeing.labels == 1, truth) > dice_score(confident.labels == 1, truth) + 0.2
    # Both fronts ended on the classifier's disagreement, at the disc's ends, and the hint says so.
    assert agreeing.confidence_stops == {} and agreeing.classifier_stops == {1: [5, 10]}
    assert agreeing.summary()["classifier_stops"] == {"1": [5, 10]}
    hint = agreeing.confidence_stop_hint({"--stop-ratio": 0.0}, "--classifier-stop")
    assert (
        "pixel classifier disagreed" in hint
        and "label 1: slice 5, 10" in hint
        and "--classifier-stop" in hint
    )
    # The confidence rule no longer ends a joined object's fronts: at stop_confidence 1 every slice
    # is doubtful by it, yet the slices where the classifier agrees are drawn.
    sure = propagate(image, prompt, tiny_net, classifier_stop=0.3, **{**options, "stop_confidence": 1.0})
    assert set(range(6, 10)) <= drawn(sure)


def test_a_classifier_that_fails_the_test_is_left_out(tiny_net, unsure_network):
    image, truth = square_in_noise()
    prompt = np.zeros(truth.shape, np.uint8)
    prompt[3] = truth[3]
    result = propagate(image, prompt, tiny_net, device="cpu", stop_after=99, min_area=0.0, stop_ratio=0.0)
    assert result.classifier_joined == [] and result.classifier_dice[1] < DEFAULT_CLASSIFIER_GATE
    others = np.arange(8) != 3
    assert (result.labels[others] == 1).all()  # the network's output as it was (the painted slice as painted)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"pixel_classifier": "sometimes"}, "pixel_classifier must be one of auto, always, never"),
        ({"classifier_gate": 1.5}, r"classifier_gate \(a Dice\) must lie in \[0, 1\]"),
        ({"classifier_stop": 1.0}, r"classifier_stop \(a Dice; 0: off\) must lie in \[0, 1\)"),
    ],
)
def test_bad_classifier_settings_say_what_is_wrong(tiny_net, options, message):
    image, truth = bright_disc()
    with pytest.raises(OpenSegError, match=message):
        propagate(image, truth.astype(np.uint8), tiny_net, device="cpu", **options)

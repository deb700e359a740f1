"""segment() / iter_segment(): shapes, axes, dtypes, ensembling, combination, cancellation, errors."""

from __future__ import annotations

import numpy as np
import pytest

from napari_openseg.core.progress import Progress
from napari_openseg.core.segment.inference import combine_tasks, iter_segment, segment
from napari_openseg.core.support import build_support_set, label_dtype
from napari_openseg.errors import OpenSegError


def volume_with_labels(shape=(8, 20, 28), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 1, shape).astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    labels[:, 4:10, 5:12] = 1
    labels[:, 12:17, 15:25] = 2
    image[labels == 1] += 3
    image[labels == 2] -= 3
    return image, labels


@pytest.fixture
def support():
    image, labels = volume_with_labels()
    return build_support_set(image, labels)


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_volume_along_each_axis_keeps_its_shape(tiny_net, support, axis):
    image, _ = volume_with_labels((6, 10, 12), seed=1)
    result = segment(image, support, tiny_net, axis=axis, support_size=4)
    assert result.labels.shape == image.shape and result.labels.dtype == np.uint8
    assert result.probabilities.shape == (2, *image.shape)
    assert result.label_values == [1, 2]
    assert set(np.unique(result.labels)) <= {0, 1, 2}
    assert np.all((result.probabilities >= 0) & (result.probabilities <= 1))


def test_slices_are_segmented_independently_of_the_axis_order(tiny_net, support):
    """Segmenting along axis 2 equals transposing, segmenting along axis 0 and transposing back."""
    image, _ = volume_with_labels((5, 9, 14), seed=2)
    along_last = segment(image, support, tiny_net, axis=2, support_size=4, method="stacked").probabilities
    moved = segment(
        np.moveaxis(image, 2, 0), support, tiny_net, axis=0, support_size=4, method="stacked"
    ).probabilities
    assert np.allclose(along_last, np.moveaxis(moved, 1, 3), atol=1e-5)


@pytest.mark.parametrize(
    "image",
    [
        (np.random.default_rng(0).random((33, 47)) * 255).astype(np.uint8),
        (np.random.default_rng(0).random((33, 47)) * 60000).astype(np.uint16),
        (np.random.default_rng(0).random((33, 47)) * 3000 - 1024).astype(np.int16),
        np.where(np.eye(33, 47) > 0, np.nan, 1.0) * np.random.default_rng(0).random((33, 47)),
        (np.random.default_rng(0).random((33, 47, 3)) * 255).astype(np.uint8),  # RGB
    ],
    ids=["uint8", "uint16", "int16-ct", "float-nan", "rgb"],
)
def test_two_dimensional_images_of_any_dtype(tiny_net, support, image):
    result = segment(image, support, tiny_net, support_size=3, method="network")
    assert result.labels.shape == (33, 47)
    assert np.all(np.isfinite(result.probabilities))


def test_batch_size_does_not_change_the_result(tiny_net, support):
    image, _ = volume_with_labels((7, 16, 16), seed=3)
    one = segment(image, support, tiny_net, support_size=4, batch_size=1, method="network").probabilities
    many = segment(image, support, tiny_net, support_size=4, batch_size=5, method="network").probabilities
    assert np.allclose(one, many, atol=1e-5)


def test_ensembling_is_seeded_and_averages_different_subsets(tiny_net, support):
    image, _ = volume_with_labels((3, 16, 16), seed=4)
    kwargs = dict(support_size=2, ensemble=3, method="network")
    first = segment(image, support, tiny_net, seed=1, **kwargs).probabilities
    again = segment(image, support, tiny_net, seed=1, **kwargs).probabilities
    other = segment(image, support, tiny_net, seed=2, **kwargs).probabilities
    single = segment(
        image, support, tiny_net, seed=1, support_size=2, ensemble=1, method="network"
    ).probabilities
    assert np.array_equal(first, again)
    assert not np.allclose(first, other)
    assert not np.allclose(first, single)


def test_ensemble_collapses_when_the_task_is_smaller_than_s(tiny_net, support):
    """With every entry in each subset, K identical predictions equal one."""
    image, _ = volume_with_labels((2, 16, 16), seed=5)
    k1 = segment(image, support, tiny_net, support_size=64, ensemble=1, method="network").probabilities
    k4 = segment(image, support, tiny_net, support_size=64, ensemble=4, method="network").probabilities
    assert np.allclose(k1, k4)


def test_tasks_combine_by_argmax_above_the_threshold():
    probs = np.array([[[[0.9, 0.2, 0.3]], [[0.6, 0.7, 0.1]]]], np.float32)  # N=1, C=2, H=1, W=3
    labels = combine_tasks(probs, [3, 300], threshold=0.5, dtype=np.uint16)
    assert labels.tolist() == [[[3, 300, 0]]]
    assert combine_tasks(probs, [3, 300], threshold=0.95, dtype=np.uint16).tolist() == [[[0, 0, 0]]]
    assert label_dtype(255) == np.uint8 and label_dtype(256) == np.uint16
    assert label_dtype(2**40) == np.int64
    with pytest.raises(OpenSegError, match="beyond 64-bit labels"):
        label_dtype(2**63)  # a uint64 label no signed output type holds (a bare OverflowError before)


def test_progress_counts_slices_and_carries_partial_labels(tiny_net, support):
    image, _ = volume_with_labels((5, 16, 16), seed=6)
    steps = list(iter_segment(image, support, tiny_net, support_size=2, batch_size=2))
    assert all(isinstance(s, Progress) for s in steps)
    fitting = [s for s in steps if s.stage != "segmenting"]  # the tasks are fitted first (cross-validation)
    assert fitting and all(s.done == 0 and s.total == 5 for s in fitting)
    assert "cross-validating label 1" in {s.stage for s in fitting}
    segmenting = steps[len(fitting) :]
    assert [s.done for s in segmenting] == [0, 2, 4, 5] and steps[-1].total == 5
    assert segmenting[1].payload["labels"].shape == (2, 16, 16)


def test_stopping_the_generator_cancels_the_run(tiny_net, support):
    image, _ = volume_with_labels((6, 16, 16), seed=7)
    generator = iter_segment(image, support, tiny_net, support_size=2, batch_size=1, method="network")
    next(generator)
    next(generator)
    generator.close()  # what a Cancel button or Ctrl-C does
    with pytest.raises(StopIteration):
        next(generator)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(support_size=0), "support size and ensemble must be >= 1"),
        (dict(threshold=1.5), "threshold must lie in"),
        (dict(label_values=[9]), "no entries for label 9"),
        (dict(axis=3), "slice axis must be"),
        (dict(device="cuda:7"), "cuda"),
        (dict(method="magic"), "method must be one of auto, network, pixel-classifier, stacked"),
    ],
)
def test_bad_options_are_explained(tiny_net, support, kwargs, message):
    image, _ = volume_with_labels((2, 16, 16))
    with pytest.raises(OpenSegError, match=message):
        segment(image, support, tiny_net, **kwargs)


def test_a_4d_image_is_refused(tiny_net, support):
    with pytest.raises(OpenSegError, match="expected a 2D image"):
        segment(np.zeros((2, 2, 16, 16)), support, tiny_net)


def test_direct_formulation_gives_the_same_result(tiny_net, support):
    image, _ = volume_with_labels((3, 20, 20), seed=8)
    fast = segment(image, support, tiny_net, support_size=3, ensemble=2, method="network").probabilities
    direct = segment(
        image, support, tiny_net, support_size=3, ensemble=2, formulation="direct", method="network"
    ).probabilities
    assert np.abs(fast - direct).max() < 1e-4

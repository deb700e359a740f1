"""Object extent in segmentation: slice ranges, the auto extent's walk on hand-made per-slice numbers
(outcomes stated before the run), finding the painted slices, and segment() with both."""

from __future__ import annotations

import numpy as np
import pytest

from napari_openseg.core.metrics import dice_score
from napari_openseg.core.preprocess import normalize_intensity
from napari_openseg.core.segment.extent import (
    ExtentTracker,
    painted_slices,
    parse_slice_range,
    resolve_slice_range,
    slice_sharpness,
    task_extent,
)
from napari_openseg.core.segment.inference import segment
from napari_openseg.core.support import build_support_set
from napari_openseg.errors import OpenSegError
from tests._blobs import disc_volume, one_thread, train_blob_net

pytestmark = pytest.mark.usefixtures(one_thread.__name__)
ABSOLUTE = {"stop_confidence": 0.8, "stop_after": 2, "min_area": 0.1, "relative": False, "margin": None}


def test_a_slice_range_reads_like_a_python_slice():
    assert parse_slice_range("40:90") == (40, 90)
    assert parse_slice_range("40:") == (40, None) and parse_slice_range(":9") == (None, 9)
    assert resolve_slice_range(None, 10) == (0, 10)
    assert resolve_slice_range("2:-2", 10) == (2, 8)  # negative bounds count from the end
    assert resolve_slice_range((3, 99), 10) == (3, 10)  # clipped to the volume
    assert resolve_slice_range(range(4, 6), 10) == (4, 6) == resolve_slice_range(slice(4, 6), 10)
    for bad, message in [
        ("4", "written A:B"),
        ("a:b", "written A:B"),
        ((5, 5), "holds no slice"),
        (slice(0, 9, 2), "step 1"),
        (7, "is \\(start, stop\\)"),
    ]:
        with pytest.raises(OpenSegError, match=message):
            resolve_slice_range(bad, 10)


def test_a_task_grows_from_its_painted_slices_until_two_slices_in_a_row_have_ended():
    confidence = np.full(12, 0.9)
    area = np.full(12, 100.0)
    confidence[[1, 2]] = 0.5  # below 0.8: slices 2 and 1 are doubtful -> the lower end is slice 3
    area[9] = 5.0  # < 10 % of 100: vanished, but slice 10 is fine again, so the run is one long
    assert task_extent(confidence, area, [5, 6], **ABSOLUTE) == (3, 12)
    # Between two painted slices nothing is cut, however doubtful.
    confidence[4] = 0.1
    assert task_extent(confidence, area, [3, 8], **ABSOLUTE) == (3, 12)  # slice 4 stays
    # A run that reaches the volume's end leaves its ended slices out: slice 0 ended, alone.
    confidence[:] = 0.9
    confidence[0] = 0.2
    assert task_extent(confidence, area, [3], **ABSOLUTE) == (1, 12)


def test_a_task_goes_at_most_its_margin_beyond_the_painted_slices():
    confidence, area = np.full(20, 0.9), np.full(20, 100.0)  # sure everywhere: only the margin stops it
    # painted 4 and 12: a range of 8, a quarter of it is 2 slices on each side
    assert task_extent(confidence, area, [4, 12], **{**ABSOLUTE, "margin": 0.25}) == (2, 15)
    assert task_extent(confidence, area, [4, 5], **{**ABSOLUTE, "margin": 0.25}) == (3, 7)  # at least one
    assert task_extent(confidence, area, [4], **{**ABSOLUTE, "margin": 0.25}) == (
        0,
        20,
    )  # one slice: no range


def test_without_painted_slices_a_task_starts_where_it_is_drawn_largest_and_surest():
    confidence = np.array([0.9, 0.9, 0.3, 0.9, 0.9, 0.95, 0.9, 0.3, 0.3, 0.9])
    area = np.array([0, 0, 50, 80, 90, 100, 90, 10, 0, 0], float)
    # starts at 5 (100 x 0.95); down: 4, 3 kept, 2 doubtful, 1 vanished -> 3; up: 6, then 7 and 8 ended
    assert task_extent(confidence, area, [], **ABSOLUTE) == (3, 7)
    assert task_extent(confidence, np.zeros(10), [], **ABSOLUTE) == (0, 0)  # drawn nowhere: no slice


def test_a_relative_stop_is_a_fraction_of_the_painted_slices_confidence():
    confidence = np.array([0.86, 0.86, 0.9, 0.9, 0.86, 0.86])
    area = np.full(6, 100.0)
    rule = {**ABSOLUTE, "stop_confidence": 0.97, "relative": True}  # 0.97 x 0.9 = 0.873 > 0.86
    assert task_extent(confidence, area, [2, 3], **rule) == (2, 4)
    assert task_extent(confidence, area, [2, 3], **{**rule, "stop_confidence": 0.95}) == (0, 6)  # 0.855


def test_sharpness_is_one_for_clear_slices_and_lower_for_hesitant_ones():
    probabilities = np.zeros((3, 4, 4), np.float32)
    probabilities[0, :2] = 1.0  # half in, half out, all sure
    probabilities[1, :2] = 0.6  # in, but barely
    probabilities[2] = 0.2  # nothing drawn, fairly sure of it
    sharp = slice_sharpness(probabilities)
    assert sharp[0] == pytest.approx(1.0)
    assert sharp[1] == pytest.approx(2 * 0.6 * 8 / (0.6 * 8 + 8))  # soft Dice of p and its mask: 0.75
    assert sharp[2] == pytest.approx(2 * 0.8 * 16 / (0.8 * 16 + 16))


def test_painted_slices_are_the_entries_taken_from_this_very_volume():
    image, truth = disc_volume((12, 24, 24), first=2, last=9)
    painted = np.zeros_like(truth)
    painted[[4, 7]] = truth[[4, 7]]
    support = build_support_set(image, painted)
    stack = normalize_intensity(image)
    assert painted_slices(support, [1], stack, 0) == {1: [4, 7]}
    other, _ = disc_volume((12, 24, 24), first=2, last=9, seed=5)  # same shape, other pixels
    assert painted_slices(support, [1], normalize_intensity(other), 0) == {1: []}
    assert painted_slices(support, [1], np.moveaxis(stack, 1, 0), 1) == {1: []}  # entries are along axis 0


def test_the_tracker_erases_each_task_outside_its_extent_only():
    tracker = ExtentTracker([1, 2], 6, {1: [1], 2: [4]})
    probabilities = np.zeros((6, 2, 4, 4), np.float32)
    labels = np.zeros((6, 4, 4), np.uint8)
    probabilities[:, 0, :2], labels[:, :2] = 0.99, 1  # task 1 everywhere, sure
    probabilities[:, 1, 2:], labels[:, 2:] = 0.99, 2  # task 2 everywhere, sure ...
    probabilities[:3, 1, 2:], labels[:3, 2:] = 0.55, 2  # ... but hesitant on slices 0-2
    tracker.add(0, probabilities[:4], labels[:4])
    tracker.add(4, probabilities[4:], labels[4:])
    kept = labels.copy()
    assert tracker.apply(kept, **ABSOLUTE) == {1: (0, 6), 2: (3, 6)}
    assert np.array_equal(kept[3:], labels[3:]) and not (kept[:3] == 2).any() and (kept[:3, :2] == 1).all()


@pytest.fixture(scope="module")
def blob_net():
    return train_blob_net()


def test_segment_keeps_to_a_slice_range_and_says_what_applies_to_volumes(blob_net):
    image, truth = disc_volume((16, 24, 24), first=2, last=13)
    support = build_support_set(image, np.where(np.arange(16)[:, None, None] == 7, truth, 0).astype(np.uint8))
    whole = segment(image, support, blob_net, device="cpu")
    part = segment(image, support, blob_net, device="cpu", slices="5:9")
    assert np.array_equal(part.labels[5:9], whole.labels[5:9])
    assert not part.labels[:5].any() and not part.labels[9:].any() and not part.probabilities[0, 9:].any()
    assert whole.extent is None and part.extent is None
    with pytest.raises(OpenSegError, match="applies to volumes"):
        segment(image[7], support, blob_net, device="cpu", slices="0:4")
    with pytest.raises(OpenSegError, match="extent must be one of all, auto"):
        segment(image, support, blob_net, device="cpu", extent="some")


def distracted_disc_volume() -> tuple[np.ndarray, np.ndarray]:
    """A disc on slices 15..24 of 40 and, on every other slice, a fainter disc somewhere else: the
    blob network draws those too, less sharply."""
    image, truth = disc_volume((40, 40, 48), first=15, last=24)
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:40, :48]
    for z in [*range(15), *range(25, 40)]:
        radius, cy, cx = 4 + 3 * rng.random(), 8 + 24 * rng.random(), 8 + 32 * rng.random()
        image[z][((yy - cy) ** 2 + (xx - cx) ** 2) <= radius**2] += 0.25
    return image, truth


def test_auto_extent_draws_an_object_on_10_of_40_slices_on_at_most_14(blob_net):
    image, truth = distracted_disc_volume()
    drawn_on = lambda labels: int(labels.reshape(40, -1).any(axis=1).sum())  # noqa: E731
    for painted_slices_ in ([20], [17, 20, 22]):  # one slice: the confidence alone stops it
        painted = np.zeros_like(truth)
        painted[painted_slices_] = truth[painted_slices_]
        support = build_support_set(image, painted)
        every = segment(image, support, blob_net, device="cpu")
        auto = segment(image, support, blob_net, device="cpu", extent="auto")
        assert drawn_on(every.labels) >= 25  # the faint discs are drawn on most slices
        assert drawn_on(auto.labels) <= 14 and dice_score(auto.labels == 1, truth == 1) >= 0.8
        first, stop = auto.extent[1]
        assert first <= min(painted_slices_) and stop > max(painted_slices_)
        assert not auto.labels[:first].any() and not auto.labels[stop:].any()
        assert not auto.probabilities[0, stop:].any()

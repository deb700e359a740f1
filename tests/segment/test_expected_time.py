"""The expected time said before a run: the measured tables (per slice, and the one-off support
check), what K costs, which methods and tasks are checked, and when a GPU is named."""

from __future__ import annotations

import numpy as np
import pytest

from napari_openseg.core.engine_settings import CHOICES, MAX_FIT_ENTRIES
from napari_openseg.core.segment import expected_time
from napari_openseg.core.segment.expected_time import (
    CHECK_RUNS_NETWORK,
    CHECK_SUPPORT_SIZE,
    CPU_CHECK_SECONDS_PER_TASK,
    CPU_CLASSIFIER_SECONDS,
    CPU_SECONDS_PER_TASK,
    GRID_PIXELS,
    check_seconds,
    check_seconds_per_task,
    classifier_seconds,
    describe_expected_time,
    format_duration,
    pixels_per_slice,
    seconds_per_slice,
    seconds_per_task,
)
from napari_openseg.errors import OpenSegError


def test_the_table_is_measured_and_grows_with_s_and_k():
    for size, row in CPU_SECONDS_PER_TASK.items():
        assert sorted(row) == [1, 2, 5] and all(seconds > 0 for seconds in row.values()), size
        assert row[1] < row[2] < row[5], size  # each member is a whole prediction
    k1 = [CPU_SECONDS_PER_TASK[size][1] for size in sorted(CPU_SECONDS_PER_TASK)]
    assert k1 == sorted(k1)


def test_between_the_rows_the_time_is_interpolated():
    low, high = CPU_SECONDS_PER_TASK[4][1], CPU_SECONDS_PER_TASK[16][1]
    assert seconds_per_task(10) == pytest.approx(low + (high - low) * 6 / 12)
    assert seconds_per_task(16, 3) == pytest.approx(
        CPU_SECONDS_PER_TASK[16][2] + (CPU_SECONDS_PER_TASK[16][5] - CPU_SECONDS_PER_TASK[16][2]) / 3
    )
    largest = max(CPU_SECONDS_PER_TASK)  # beyond the table: along its last step
    assert seconds_per_task(2 * largest) > CPU_SECONDS_PER_TASK[largest][1]


def test_k_costs_nothing_where_a_task_has_no_more_entries_than_s():
    few, many = {1: 4, 2: 3}, {1: 40, 2: 30}
    assert seconds_per_slice(few, 16, 5) == pytest.approx(seconds_per_slice(few, 16, 1))
    assert seconds_per_slice(few, 16, 1) == pytest.approx(seconds_per_task(4) + seconds_per_task(3))
    assert seconds_per_slice(many, 16, 5) == pytest.approx(2 * seconds_per_task(16, 5))
    text = describe_expected_time(10, few, 16, 5, method="network")
    assert (
        "S=16 (here 3-4), K=5" in text and "K=5 changes nothing here: no task has more than S entries" in text
    )


def test_the_sentence_names_the_slices_and_a_gpu_for_long_runs(monkeypatch):
    short = describe_expected_time(20, {1: 40}, 16, 1, method="network")
    per_slice = seconds_per_task(16)
    assert short.startswith(f"expected about {format_duration(per_slice)} per slice (1 task, S=16, K=1")
    assert f"about {format_duration(20 * per_slice)} for 20 slices" in short and "GPU" not in short
    monkeypatch.setattr(expected_time, "LONG_RUN_SECONDS", 1.0)
    long = describe_expected_time(200, {1: 40}, 16, 1, method="network")
    assert "a CUDA GPU ran this architecture about 100 times faster" in long
    assert describe_expected_time(200, {1: 40}, 16, 1, on_gpu=True).startswith("on a GPU: no measured time")


def test_auto_and_stacked_add_the_support_check_once_to_the_run():
    tasks, slices = {1: 8, 2: 8}, 10
    for method in ("auto", "stacked"):
        per_slice = seconds_per_slice(tasks, 16, 1, method)
        once = check_seconds_per_task(8, 16, method)
        assert once == pytest.approx(CPU_CHECK_SECONDS_PER_TASK[method][8]) and once > 1.0
        assert check_seconds(tasks, 16, method) == pytest.approx(2 * once)
        text = describe_expected_time(slices, tasks, 16, 1, method=method)
        assert f"about {format_duration(slices * per_slice)} for 10 slices plus about " in text
        assert f"about {format_duration(2 * once)} once to check the support (2 tasks)" in text
        assert text.endswith(f"about {format_duration(slices * per_slice + 2 * once)} in all")
    # auto is the default; a run whose tasks are fitted already (a later image) has no check
    assert describe_expected_time(slices, tasks, 16, 1) == describe_expected_time(
        slices, tasks, 16, 1, method="auto"
    )
    fitted = describe_expected_time(slices, tasks, 16, 1, fitted=True)
    per_slice = seconds_per_slice(tasks, 16, 1, "auto")
    assert "once" not in fitted and fitted.endswith(
        f"about {format_duration(slices * per_slice)} for 10 slices"
    )


def test_the_classifier_table_is_measured_and_grows_with_the_slice():
    sides = sorted(CPU_CLASSIFIER_SECONDS)
    for part in ("features", "pixel-classifier", "stacked"):
        times = [CPU_CLASSIFIER_SECONDS[side][part] for side in sides]
        assert all(t > 0 for t in times) and max(times) == times[-1] and min(times) == times[0], part
    features = [CPU_CLASSIFIER_SECONDS[side]["features"] for side in sides]
    assert features == sorted(features)  # the predictions are coarse to fine above 128 x 128
    # between rows by pixel count: a 192 x 192 slice lies between 128 x 128 and 256 x 256
    low, high = CPU_CLASSIFIER_SECONDS[128]["stacked"], CPU_CLASSIFIER_SECONDS[256]["stacked"]
    assert classifier_seconds("stacked", 192 * 192) == pytest.approx(
        low + (high - low) * (192**2 - 128**2) / (256**2 - 128**2)
    )
    assert pixels_per_slice((40, 256, 320), axis=0) == 256 * 320
    assert pixels_per_slice((40, 256, 320), axis=2) == 40 * 256
    assert pixels_per_slice((256, 320)) == 256 * 320


def test_the_time_per_slice_follows_what_each_task_runs():
    tasks, big = {1: 8, 2: 2}, 512 * 512  # task 1 is checked, task 2 is too small to be
    network = seconds_per_slice(tasks, 16, 1, "network", big)
    assert network == pytest.approx(seconds_per_task(8) + seconds_per_task(2))  # no classifier
    assert network == pytest.approx(seconds_per_slice(tasks, 16, 1, "network", GRID_PIXELS))
    features = classifier_seconds("features", big)
    # stacked (and auto, counted as stacked): the small task runs the network alone
    stacked = network + classifier_seconds("stacked", big) + features
    assert seconds_per_slice(tasks, 16, 1, "stacked", big) == pytest.approx(stacked)
    assert seconds_per_slice(tasks, 16, 1, "auto", big) == pytest.approx(stacked)
    # the pixel classifier runs no network at all, on every task, its features once
    alone = 2 * classifier_seconds("pixel-classifier", big) + features
    assert seconds_per_slice(tasks, 16, 1, "pixel-classifier", big) == pytest.approx(alone)
    # no task checked: auto runs the network only, and its time is then not an upper bound
    assert seconds_per_slice({1: 2}, 16, 1, "auto", big) == pytest.approx(seconds_per_task(2))
    assert describe_expected_time(10, {1: 2}, 16, 1).startswith("expected about ")
    # with 3-11 entries auto runs the stacked method; from 12 on it may choose a cheaper one
    assert describe_expected_time(10, tasks, 16, 1, pixels=big).startswith("expected about ")
    assert describe_expected_time(10, {1: 12}, 16, 1).startswith("expected up to about ")
    assert describe_expected_time(10, {1: 12}, 16, 1, method="stacked").startswith("expected about ")
    small = seconds_per_slice(tasks, 16, 1, "stacked", GRID_PIXELS)
    assert small < seconds_per_slice(tasks, 16, 1, "stacked", big)
    with pytest.raises(OpenSegError, match="method must be one of"):
        seconds_per_slice(tasks, 16, 1, "unet")


def test_the_check_grows_with_entries_up_to_the_fitting_sample_and_with_s():
    for method in CHOICES:
        times = [check_seconds_per_task(n, 16, method) for n in (3, 5, 8, 12, 16, 24, MAX_FIT_ENTRIES)]
        assert times == sorted(times) and times[0] > 0, method
        assert check_seconds_per_task(5 * MAX_FIT_ENTRIES, 16, method) == pytest.approx(times[-1])
    for method in CHECK_RUNS_NETWORK:  # the network's share follows the time per slice in S
        small, measured, large = (check_seconds_per_task(32, s, method) for s in (4, CHECK_SUPPORT_SIZE, 64))
        assert small < measured < large, method
        assert measured == pytest.approx(CPU_CHECK_SECONDS_PER_TASK[method][32])
    # with 3 entries the folds train on 2: any S from 2 on gives the same check
    assert check_seconds_per_task(3, 64, "auto") == pytest.approx(check_seconds_per_task(3, 2, "auto"))
    assert check_seconds_per_task(32, 64, "pixel-classifier") == check_seconds_per_task(
        32, 4, "pixel-classifier"
    )
    with pytest.raises(OpenSegError, match="method must be one of"):
        check_seconds_per_task(8, 16, "unet")


def test_tasks_with_fewer_than_three_entries_are_not_checked():
    for method in ("auto", "stacked", "network"):
        assert check_seconds_per_task(1, 16, method) == check_seconds_per_task(2, 16, method) == 0.0
        assert "once" not in describe_expected_time(10, {1: 2, 2: 1}, 16, 1, method=method)
        mixed = describe_expected_time(10, {1: 2, 2: 8}, 16, 1, method=method)
        once = check_seconds_per_task(8, 16, method)
        assert f"about {format_duration(once)} once to check the support (1 task)" in mixed
    # the pixel classifier is still fitted to them, without a check
    fit = check_seconds_per_task(2, 16, "pixel-classifier")
    assert fit == pytest.approx(CPU_CHECK_SECONDS_PER_TASK["pixel-classifier"][2]) and fit > 0
    text = describe_expected_time(10, {1: 2}, 16, 1, method="pixel-classifier")
    assert f"about {format_duration(fit)} once to fit the pixel classifier (1 task)" in text
    both = describe_expected_time(10, {1: 2, 2: 8}, 16, 1, method="pixel-classifier")
    assert "once to check the support and fit the pixel classifier (2 tasks)" in both


def test_the_network_method_checks_with_the_network_alone():
    network = check_seconds_per_task(8, 16, "network")
    assert network == pytest.approx(CPU_CHECK_SECONDS_PER_TASK["network"][8]) and network > 0
    assert network < check_seconds_per_task(8, 16, "stacked") and network < check_seconds_per_task(
        8, 16, "auto"
    )
    assert "once to check the support (1 task)" in describe_expected_time(10, {1: 8}, 16, 1, method="network")


@pytest.mark.parametrize("method", CHOICES)
@pytest.mark.parametrize("n", [2, 5])
def test_the_model_checks_what_the_engine_fits(tiny_net, monkeypatch, method, n):
    """The premises of the check's model, on the engine itself: which methods run the network on
    the held-out entries, and which tasks are fitted at all."""
    pytest.importorskip("sklearn")
    from napari_openseg.core import stacking
    from napari_openseg.core.engine import Engine
    from napari_openseg.core.support import SupportEntry

    rng = np.random.default_rng(n)
    entries = []
    for i in range(n):
        mask = np.zeros((32, 32), bool)
        mask[4 + i : 16 + i, 6:20] = True
        image = np.where(mask, 0.8, 0.2) + rng.normal(0, 0.03, mask.shape)
        entries.append(SupportEntry(image.astype(np.float32), mask, 1, source=f"image {i}"))
    predicted, fitted = [], []
    network_on, fit = stacking._network_on, stacking.PixelClassifier.fit

    def counted_network_on(net, queries, *args):
        predicted.extend(queries)
        return network_on(net, queries, *args)

    def counted_fit(classifier, *args):
        fitted.append(classifier)
        return fit(classifier, *args)

    monkeypatch.setattr(stacking, "_network_on", counted_network_on)
    monkeypatch.setattr(stacking.PixelClassifier, "fit", counted_fit)
    Engine(entries, tiny_net, device="cpu", method=method).fit()
    checked = n >= stacking.MIN_CV_ENTRIES
    assert len(predicted) == (n if checked and method in CHECK_RUNS_NETWORK else 0)
    assert (len(predicted) + len(fitted) > 0) == (check_seconds_per_task(n, 16, method) > 0)


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0.123, "0.12 s"),
        (8.46, "8.5 s"),
        (42.4, "42 s"),
        (200, "3 min 20 s"),
        (1500, "25 min"),
        (3900, "1 h 5 min"),
    ],
)
def test_durations_read_at_a_glance(seconds, text):
    assert format_duration(seconds) == text

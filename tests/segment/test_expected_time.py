"""The expected time said before a run: the measured table, what K costs, and when a GPU is named."""

from __future__ import annotations

import pytest

from napari_openseg.core.segment import expected_time
from napari_openseg.core.segment.expected_time import (
    CPU_SECONDS_PER_TASK,
    describe_expected_time,
    format_duration,
    seconds_per_slice,
    seconds_per_task,
)


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
    text = describe_expected_time(10, few, 16, 5)
    assert (
        "S=16 (here 3-4), K=5" in text and "K=5 changes nothing here: no task has more than S entries" in text
    )


def test_the_sentence_names_the_slices_and_a_gpu_for_long_runs(monkeypatch):
    short = describe_expected_time(20, {1: 40}, 16, 1)
    per_slice = seconds_per_task(16)
    assert short.startswith(f"expected about {format_duration(per_slice)} per slice (1 task, S=16, K=1")
    assert f"about {format_duration(20 * per_slice)} for 20 slices" in short and "GPU" not in short
    monkeypatch.setattr(expected_time, "LONG_RUN_SECONDS", 1.0)
    long = describe_expected_time(200, {1: 40}, 16, 1)
    assert "a CUDA GPU ran this architecture about 100 times faster" in long
    assert describe_expected_time(200, {1: 40}, 16, 1, on_gpu=True).startswith("on a GPU: no measured time")


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

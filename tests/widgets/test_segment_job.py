"""The widget's background job: several queries, slice-counted progress, the thread policy."""

from __future__ import annotations

import numpy as np
import torch

from napari_openseg._widgets import _segment_job
from napari_openseg._widgets._segment_job import Query, iter_segment_queries, leave_a_core_free
from napari_openseg.core.progress import run_to_end
from napari_openseg.core.support import build_support_set
from tests.widgets.conftest import disc_volume


def test_queries_share_one_support_set_and_count_slices(tiny_net):
    volume, mask = disc_volume(depth=5, size=32)
    support = build_support_set(volume, mask, slice_indices=[1, 3])
    queries = [Query("vol", volume, axis=0), Query("rgb", np.repeat(volume[2][..., None], 3, -1), rgb=True)]
    steps = []
    generator = iter_segment_queries(queries, support, tiny_net, device="cpu", batch_size=2)
    while True:
        try:
            steps.append(next(generator))
        except StopIteration as stop:
            results = stop.value
            break
    assert [r.labels.shape for r in results] == [(5, 32, 32), (32, 32)]
    assert steps[0].stage == "loading weights" and steps[0].total == 6
    batches = [
        (s.payload["query"], s.payload["start"], s.payload["stop"], s.done) for s in steps if s.payload
    ]
    assert batches == [(0, 0, 2, 2), (0, 2, 4, 4), (0, 4, 5, 5), (1, 0, 1, 6)]
    assert all(s.total == 6 for s in steps)


def test_leave_a_core_free(monkeypatch):
    original = torch.get_num_threads()
    try:
        monkeypatch.setattr(_segment_job.os, "cpu_count", lambda: 3)
        torch.set_num_threads(3)
        with leave_a_core_free() as threads:
            assert threads == 2 and torch.get_num_threads() == 2
        assert torch.get_num_threads() == 3
        monkeypatch.setattr(_segment_job.os, "cpu_count", lambda: 1)
        with leave_a_core_free() as threads:
            assert threads == 1
    finally:
        torch.set_num_threads(original)


def test_thread_count_is_restored_after_a_run(tiny_net):
    volume, mask = disc_volume(depth=3, size=32)
    before = torch.get_num_threads()
    run_to_end(
        iter_segment_queries([Query("v", volume)], build_support_set(volume, mask), tiny_net, device="cpu")
    )
    assert torch.get_num_threads() == before


def test_overlapping_runs_put_back_the_thread_count_from_before_both(monkeypatch):
    """Two Segment runs that overlap (A starts, B starts, A ends, B ends) used to leave torch on the
    lowered count: B recorded A's lowered count as the one to restore."""
    original = torch.get_num_threads()
    try:
        monkeypatch.setattr(_segment_job.os, "cpu_count", lambda: 3)
        torch.set_num_threads(3)
        first, second = leave_a_core_free(), leave_a_core_free()
        assert first.__enter__() == 2
        assert second.__enter__() == 2
        first.__exit__(None, None, None)
        assert torch.get_num_threads() == 2  # the second run still leaves a core free
        second.__exit__(None, None, None)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(original)

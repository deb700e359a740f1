"""The background job behind the segmentation widget: several query images, one support set.

It runs the open images through the same core path as a cohort of files
(:class:`~napari_openseg.core.cohort.tasks.SegmentTask`: one engine, its tasks fitted once, run per
image) and re-counts their progress in slices across all images; no Qt, no layers.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from napari_openseg.core.cohort.tasks import SegmentTask
from napari_openseg.core.progress import Progress
from napari_openseg.core.segment.expected_time import pixels_per_slice
from napari_openseg.core.segment.inference import SegmentationResult
from napari_openseg.core.support import SupportSet


@dataclass
class Query:
    """One image to segment: ``image`` is ``"H W"``, ``"H W 3"`` (``rgb``) or ``"Z H W"`` (any
    slice ``axis``; only the slices ``[A, B)`` if ``slices`` is given)."""

    name: str
    image: np.ndarray
    rgb: bool = False
    axis: int = 0
    slices: tuple[int, int] | None = None

    @property
    def n_slices(self) -> int:
        spatial = np.ndim(self.image) - (1 if self.rgb else 0)
        if spatial == 2:
            return 1
        return self.slices[1] - self.slices[0] if self.slices else int(np.shape(self.image)[self.axis])

    @property
    def pixels(self) -> int:
        """Pixels in one of its slices."""
        shape = np.shape(self.image)
        return pixels_per_slice(shape[:-1] if self.rgb else shape, self.axis)


def iter_segment_queries(
    queries: Sequence[Query],
    support: SupportSet,
    weights,
    **options,
) -> Generator[Progress, None, list[SegmentationResult]]:
    """Segment every query with the same support set and weights (loaded here, lazily): one
    :class:`~napari_openseg.core.engine.Engine` fits the tasks once for all of them.

    Progress counts slices over all queries; each record's ``payload`` carries the core's batch
    (``start``, ``stop``, ``labels``) plus ``query``, the index of the image it belongs to.
    ``options`` are a :class:`~napari_openseg.core.cohort.tasks.SegmentTask`'s: the engine's and
    :func:`~napari_openseg.core.segment.inference.iter_segment_with`'s keywords (device, support_size, ensemble,
    threshold, method, batch_size, keep_probabilities, ...).
    """
    total = sum(query.n_slices for query in queries)
    yield Progress(0, total, "loading weights")
    task = SegmentTask(support, weights, options)
    engine = task.prepare()
    results: list[SegmentationResult] = []
    done = 0
    with leave_a_core_free():
        for index, query in enumerate(queries):
            stage = query.name if len(queries) == 1 else f"{query.name} ({index + 1}/{len(queries)})"
            steps = task.iter_run(engine, query.image, axis=query.axis, rgb=query.rgb, slices=query.slices)
            while True:
                try:
                    step = next(steps)
                except StopIteration as stop:
                    results.append(stop.value)
                    break
                payload = dict(step.payload, query=index) if step.payload else {}
                label = stage if step.stage == "segmenting" else f"{stage}: {step.stage}"
                yield Progress(done + step.done, total, label, payload)
            done += query.n_slices
    return results


#: Runs inside :func:`leave_a_core_free` and the thread count before the first of them: overlapping
#: runs (two Segment widgets) must put back the count from before either, not the lowered one.
_core_free_runs = {"count": 0, "before": 0}
_core_free_lock = threading.Lock()


@contextlib.contextmanager
def leave_a_core_free() -> Iterator[int]:
    """Run torch's CPU work on one core fewer than the machine has while the block runs, so that
    napari's main thread (and a software OpenGL renderer) always finds a free core; the thread count
    is put back when the last overlapping run ends. On a 2-core machine this also avoids two compute
    threads fighting the display for two cores, which measured several times slower
    (docs/performance.md)."""
    import torch

    with _core_free_lock:
        if _core_free_runs["count"] == 0:
            _core_free_runs["before"] = torch.get_num_threads()
        _core_free_runs["count"] += 1
        wanted = max(1, min(_core_free_runs["before"], (os.cpu_count() or 1) - 1))
        torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        with _core_free_lock:
            _core_free_runs["count"] -= 1
            if _core_free_runs["count"] == 0:
                torch.set_num_threads(_core_free_runs["before"])

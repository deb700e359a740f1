"""Object extent in volumes: on which slices a segmentation task may draw.

A support set says what an object looks like, not where it ends: a network asked on every slice of
a volume draws a small structure on slices far from it (160 of 181 slices for a Colin27 putamen).
Two ways to bound a task along the slice axis:

* a **slice range** chosen by the user (``slices=``, ``--slices A:B``, the Segment widget's range):
  half-open like a Python slice, ``A`` included and ``B`` not; slices outside are not segmented;
* ``extent="auto"``: each task starts from the slices painted for it and grows outwards slice by
  slice, as a propagation front does (:class:`~napari_openseg.core.propagate.fronts.StopRule`): it ends after
  ``stop_after`` consecutive slices where it has vanished (less than ``min_area`` times its mean
  painted area) or is doubtful (its confidence below ``stop_confidence``), and those slices and all
  beyond are erased. Between two painted slices nothing is erased.

A task's painted slices are the support entries that came from this very volume (same axis, and the
entry's image equals the volume's slice as segmentation normalises it). A support set from other
images gives none; the task then starts from the slice where it is drawn largest with confidence.

The confidence of a task on a slice is the *sharpness* of its probabilities
(:func:`slice_sharpness`), the one confidence measure of :mod:`.confidence` that a support-set
segmentation has without extra work.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from napari_openseg.core.engine_settings import DEFAULT_THRESHOLD
from napari_openseg.core.propagate.settings import DEFAULT_MIN_AREA, DEFAULT_STOP_AFTER
from napari_openseg.errors import OpenSegError

#: The auto extent's stop rule, chosen on the validation structures of the VoxelMorph scan with the
#: openseg-default weights (``benchmarks/bench_extent.py --split val``; docs/propagation.md, *Object
#: extent in segmentation*): doubtful below 0.96 times the task's sharpness on its painted slices,
#: two slices in a row end it, and it goes at most a quarter of its painted range beyond them.
EXTENT_STOP_CONFIDENCE = 0.96
EXTENT_RELATIVE = True
EXTENT_STOP_AFTER = DEFAULT_STOP_AFTER  # as a propagation front: two slices in a row,
EXTENT_MIN_AREA = DEFAULT_MIN_AREA  # vanished below 2 % of the painted area
EXTENT_MARGIN: float | None = 0.25
#: The Segment widget's default range: the painted slices' range widened on each side by this
#: fraction of its length (at least one slice); the same margin as the auto extent's.
RANGE_MARGIN = EXTENT_MARGIN


def parse_slice_range(text: str) -> tuple[int | None, int | None]:
    """``"A:B"``, ``"A:"`` or ``":B"`` -> ``(A, B)`` (``None`` where left open)."""
    parts = str(text).split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, stop = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise OpenSegError(
            f"a slice range is written A:B (A included, B not; either may be left out), got {text!r}"
        ) from None
    return start, stop


def resolve_slice_range(slices, n_slices: int) -> tuple[int, int]:
    """A slice range (``None``, ``"A:B"``, a ``slice``, a ``range`` or ``(A, B)``) -> ``(start, stop)``
    within ``0..n_slices``; negative bounds count from the end, as in Python. An empty range is an
    error."""
    if slices is None:
        return 0, n_slices
    if isinstance(slices, str):
        start, stop = parse_slice_range(slices)
    elif isinstance(slices, slice | range):
        if slices.step not in (None, 1):
            raise OpenSegError(f"a slice range takes every slice (step 1), got step {slices.step}")
        start, stop = slices.start, slices.stop
    else:
        try:
            start, stop = slices
        except (TypeError, ValueError):
            raise OpenSegError(
                f"a slice range is (start, stop), 'A:B', a slice or a range, got {slices!r}"
            ) from None
    start, stop, _ = slice(start, stop).indices(n_slices)
    if start >= stop:
        raise OpenSegError(f"the slice range {slices!r} holds no slice of the {n_slices} along the axis")
    return start, stop


def painted_range(
    support, source: str, axis: int, n_slices: int, margin: float = RANGE_MARGIN
) -> tuple[int, int] | None:
    """The slices ``[A, B)`` from the first to the last slice of the support entries painted on the
    image named ``source`` along ``axis``, widened on each side by ``margin`` times that range's
    length (at least one slice) and clipped to ``0..n_slices``; ``None`` if none was painted there."""
    painted = [
        e.slice_index
        for e in support.entries
        if e.source == source and e.axis == axis and e.slice_index is not None
    ]
    if not painted:
        return None
    first, last = min(painted), max(painted)
    pad = max(1, int(round(margin * (last - first))))
    return max(0, first - pad), min(n_slices, last + pad + 1)


def slice_sharpness(probabilities: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """``"N H W"`` probabilities of one task -> ``"N"``: the soft Dice between each slice's
    probabilities and its own mask (1 when every pixel is clearly in or out); a slice with nothing
    drawn scores how clearly its pixels are out, as :func:`.confidence.draw_measures` does."""
    p = probabilities.reshape(probabilities.shape[0], -1).astype(np.float64)
    hard = p >= threshold
    drawn = (p * hard).sum(axis=1)
    sharp = 2 * drawn / np.maximum(p.sum(axis=1) + hard.sum(axis=1), 1e-9)
    background = 1.0 - p
    empty = 2 * background.sum(axis=1) / (background.sum(axis=1) + p.shape[1])
    return np.where(hard.any(axis=1), sharp, empty).astype(np.float32)


def task_extent(
    confidence: np.ndarray,
    area: np.ndarray,
    painted: Sequence[int],
    *,
    stop_confidence: float = EXTENT_STOP_CONFIDENCE,
    stop_after: int = EXTENT_STOP_AFTER,
    min_area: float = EXTENT_MIN_AREA,
    painted_area: float | None = None,
    relative: bool = EXTENT_RELATIVE,
    margin: float | None = EXTENT_MARGIN,
) -> tuple[int, int]:
    """The slices ``[first, stop)`` one task keeps, from its per-slice ``confidence "N"`` and drawn
    ``area "N"`` (pixels) and the slices ``painted`` for it (module docstring).

    ``painted_area`` is the task's mean painted area (default: its mean drawn area on the painted
    slices). With ``relative`` the stop confidence is a fraction of the task's mean confidence on its
    painted slices. With two or more painted slices and a ``margin``, the task goes no further than
    ``margin`` times the painted slices' range beyond them (at least one slice). With no painted
    slice the task starts from the slice of largest ``area * confidence``; a task drawn nowhere keeps
    no slice (``(0, 0)``).
    """
    confidence, area = np.asarray(confidence, np.float64), np.asarray(area, np.float64)
    n = confidence.shape[0]
    seeds = sorted({int(s) for s in painted if 0 <= int(s) < n})
    if not seeds:
        if not (area > 0).any():
            return 0, 0
        seeds = [int(np.argmax(area * np.nan_to_num(confidence)))]
    reference = painted_area if painted_area is not None else float(area[seeds].mean())
    floor = max(1.0, min_area * reference)
    if relative:
        stop_confidence = stop_confidence * float(confidence[seeds].mean())
    ended = (area < floor) | (confidence < stop_confidence)
    reach = n
    if margin is not None and len(seeds) > 1:
        reach = max(1, int(round(margin * (seeds[-1] - seeds[0]))))
    bounds = []
    for step, start in ((-1, seeds[0]), (1, seeds[-1])):
        last, run, s = start, 0, start + step
        while 0 <= s < n and run < stop_after and abs(s - start) <= reach:
            if ended[s]:
                run += 1
            else:
                last, run = s, 0
            s += step
        bounds.append(last)
    return bounds[0], bounds[1] + 1


def painted_slices(support, values: Sequence[int], stack: np.ndarray, axis: int) -> dict[int, list[int]]:
    """Per task, the slices of ``stack "N H W"`` (the normalised volume, slices along ``axis``) that
    its support entries were painted on: entries of that axis whose image is that very slice."""
    found: dict[int, list[int]] = {}
    for value in values:
        slices = set()
        for entry in support.task(value):
            s = entry.slice_index
            if entry.axis != axis or s is None or not 0 <= s < stack.shape[0]:
                continue
            if entry.image.shape == stack.shape[1:] and np.allclose(entry.image, stack[s], atol=1e-5):
                slices.add(int(s))
        found[int(value)] = sorted(slices)
    return found


class ExtentTracker:
    """Collects each task's per-slice confidence and area while a volume is segmented in batches,
    then erases every task beyond its auto extent (:func:`task_extent`).

    ``painted``: per task value, the slices painted for it (:func:`painted_slices`).
    """

    def __init__(
        self,
        values: Sequence[int],
        n_slices: int,
        painted: dict[int, list[int]],
        threshold: float = DEFAULT_THRESHOLD,
    ):
        self.values = [int(v) for v in values]
        self.painted = painted
        self.threshold = float(threshold)
        self.confidence = np.zeros((len(self.values), n_slices), np.float32)
        self.area = np.zeros((len(self.values), n_slices), np.float64)
        self.seen = np.zeros(n_slices, bool)

    def add(self, start: int, probabilities: np.ndarray, labels: np.ndarray) -> None:
        """One batch from slice ``start``: probabilities ``"b C H W"`` and the label map ``"b H W"``."""
        stop = start + probabilities.shape[0]
        for c, value in enumerate(self.values):
            self.confidence[c, start:stop] = slice_sharpness(probabilities[:, c], self.threshold)
            self.area[c, start:stop] = (labels == value).reshape(labels.shape[0], -1).sum(axis=1)
        self.seen[start:stop] = True

    def extents(self, **rule) -> dict[int, tuple[int, int]]:
        """Per task, the slices ``[first, stop)`` it keeps; slices not segmented count as ended."""
        confidence = np.where(self.seen, self.confidence, 0.0)
        return {
            value: task_extent(confidence[c], self.area[c], self.painted.get(value, []), **rule)
            for c, value in enumerate(self.values)
        }

    def apply(
        self, labels: np.ndarray, probabilities: np.ndarray | None = None, **rule
    ) -> dict[int, tuple[int, int]]:
        """Erase each task outside its extent from ``labels "N H W"`` (and ``probabilities "C N H W"``,
        if kept); returns the extents."""
        extents = self.extents(**rule)
        for c, (value, (first, stop)) in enumerate(extents.items()):
            outside = np.ones(labels.shape[0], bool)
            outside[first:stop] = False
            labels[outside] = np.where(labels[outside] == value, 0, labels[outside])
            if probabilities is not None:
                probabilities[c, outside] = 0.0
        return extents

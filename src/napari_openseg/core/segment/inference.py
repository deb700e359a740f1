"""In-context segmentation of 2D images and 3D volumes (slice by slice) from a support set.

The :class:`~napari_openseg.core.engine.Engine` fits every task (label value) once: it
cross-validates the network, the pixel classifier and the stacked classifier on the support entries
and, with ``method="auto"``, keeps the best (:mod:`.stacking`). For every task the network sees the
query slice and a support subset of S entries of that task; the predictions from K subsets drawn
independently (seeded) are combined (support-set ensembling, :mod:`.ensemble`). Tasks are combined into one label map by argmax, with voxels whose
best probability is below ``threshold`` left as background. The work is done in batches of slices;
after each batch the generator yields a :class:`~napari_openseg.core.progress.Progress` whose
payload holds that batch's labels, and that is where a consumer can stop it (cancel).
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from napari_openseg.core.engine import Engine, Estimate, auto_batch_size
from napari_openseg.core.engine_settings import DEFAULT_EXTENT, EXTENTS, SegmentSettings, check_choice
from napari_openseg.core.preprocess import colour_channels, normalize_intensity
from napari_openseg.core.progress import Progress, run_to_end
from napari_openseg.core.segment.extent import ExtentTracker, painted_slices, resolve_slice_range
from napari_openseg.core.support import SupportSet, check_image, label_dtype
from napari_openseg.errors import OpenSegError

log = logging.getLogger(__name__)


@dataclass
class SegmentationResult:
    """Label map with the image's shape, per-task probabilities ``"C *shape"`` if kept, and per
    task the cross-validated estimate of its Dice and the method that ran (:class:`Estimate`)."""

    labels: np.ndarray
    label_values: list[int]
    probabilities: np.ndarray | None = None
    estimates: dict[int, Estimate] = field(default_factory=dict)
    #: Per task, the slices ``[first, stop)`` it was kept on (``extent="auto"``; see core/segment/extent.py).
    extent: dict[int, tuple[int, int]] | None = None

    def describe_estimates(self) -> list[str]:
        """One line per task: "label 1: expected Dice 0.81 +/- 0.05 from 16 examples, method: stacked"."""
        return [
            f"label {v}: {self.estimates[v].describe()}" for v in self.label_values if v in self.estimates
        ]

    def probability(self, label: int) -> np.ndarray:
        if self.probabilities is None:
            raise OpenSegError("probabilities were not kept; run with keep_probabilities=True")
        return self.probabilities[self.label_values.index(label)]


def combine_tasks(
    probabilities: np.ndarray, label_values: Sequence[int], threshold: float, dtype: np.dtype
) -> np.ndarray:
    """``"N C H W"`` per-task probabilities -> ``"N H W"`` label map.

    Each pixel takes the label value of its most probable task, or 0 where that probability is
    below ``threshold``.
    """
    best = probabilities.argmax(axis=1)
    best_prob = np.take_along_axis(probabilities, best[:, None], axis=1)[:, 0]
    values = np.asarray(label_values, dtype)
    return np.where(best_prob >= threshold, values[best], 0).astype(dtype)


def iter_segment(
    image: np.ndarray,
    support: SupportSet | str | Path,
    model=None,
    *,
    settings: SegmentSettings | None = None,
    axis: int = 0,
    label_values: Sequence[int] | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    rgb: bool | None = None,
    keep_probabilities: bool = True,
    slices=None,
    **options,
) -> Generator[Progress, None, SegmentationResult]:
    """Segment ``image`` (``"H W"`` or a volume with slices along ``axis``) from ``support``.

    Parameters
    ----------
    model
        A weights name, a weights file path, or a ``UniverSeg`` network; ``None`` is the default
        weights.
    settings
        How to segment (:class:`~napari_openseg.core.engine_settings.SegmentSettings`; default: the
        defaults).
    **options
        Fields of :class:`~napari_openseg.core.engine_settings.SegmentSettings`, over ``settings``:
        ``support_size`` and ``ensemble`` (S entries per prediction and K predictions combined per
        task, area-matched mean, see :mod:`.ensemble`), ``threshold`` (minimum probability of the
        winning task for a voxel to be labelled), ``method`` (``"auto"``, ``"network"``,
        ``"pixel-classifier"`` or ``"stacked"``; see :class:`~napari_openseg.core.engine.Engine`),
        ``precision``, ``aspect``, ``seed``, ``formulation`` (``"fast"`` or ``"direct"``, the paper's,
        one slice at a time; same result, slower) and ``extent`` (below); and the stacking options of
        the :class:`~napari_openseg.core.engine.Engine` (folds, classifier, balance, tune).
    batch_size
        Query slices per forward pass; ``None`` picks one from S and the device.
    slices, extent
        Volumes only: the slice range to segment (``"A:B"``, ``(A, B)``, a ``slice``; A included, B
        not; indices along ``axis``, which for a NIfTI volume is the file's third axis when 0; the
        rest stays background), and ``"all"`` or ``"auto"``: each task ends where it fades out, as a
        propagation front does (:mod:`.extent`; the result's ``extent`` says where; a 2D image is its
        own extent).

    Yields progress while the tasks are fitted (``done`` 0) and then per batch (``payload``:
    ``start``, ``stop`` slice indices and ``labels``, that batch's label map ``"b H W"``); returns a
    :class:`SegmentationResult` with each task's cross-validated estimate.
    """
    settings, stacking = SegmentSettings.split(settings, options)
    _check_run(image, rgb, axis, batch_size, slices, settings.extent)
    engine = Engine(support, model, label_values=label_values, settings=settings, device=device, **stacking)
    return (
        yield from iter_segment_with(
            engine,
            image,
            axis=axis,
            rgb=rgb,
            batch_size=batch_size,
            keep_probabilities=keep_probabilities,
            slices=slices,
        )
    )


def _check_run(
    image: np.ndarray,
    rgb: bool | None,
    axis: int,
    batch_size: int | None,
    slices=None,
    extent: str = DEFAULT_EXTENT,
) -> np.ndarray:
    image = check_image(image, rgb)
    if batch_size is not None and batch_size < 1:
        raise OpenSegError(f"batch size must be >= 1 (or left out for automatic), got {batch_size}")
    if image.ndim == 3 and not -3 <= axis < 3:
        raise OpenSegError(f"slice axis must be 0, 1 or 2 for a 3D volume, got {axis}")
    check_choice("extent", extent, EXTENTS)
    if image.ndim == 2 and slices is not None:
        raise OpenSegError("a slice range applies to volumes, not to a 2D image")
    if image.ndim == 3 and slices is not None:
        resolve_slice_range(slices, image.shape[axis])  # an empty or malformed range, before any work
    return image


def iter_segment_with(
    engine: Engine,
    image: np.ndarray,
    *,
    axis: int = 0,
    rgb: bool | None = None,
    batch_size: int | None = None,
    keep_probabilities: bool = True,
    slices=None,
    extent: str | None = None,
) -> Generator[Progress, None, SegmentationResult]:
    """:func:`iter_segment` with an :class:`~napari_openseg.core.engine.Engine` made before (one
    engine segments many images and fits its tasks once); ``extent`` ``None`` is the engine's."""
    extent = engine.settings.extent if extent is None else extent
    grey = _check_run(image, rgb, axis, batch_size, slices, extent)
    colour = colour_channels(image, rgb)
    volume = normalize_intensity(grey)
    stack = volume[None] if grey.ndim == 2 else np.moveaxis(volume, axis, 0)
    colour_stack = None
    if colour is not None and engine.uses_colour(True):
        colour_stack = colour[None] if grey.ndim == 2 else np.moveaxis(colour, axis, 0)
    n_slices, height, width = stack.shape
    first, last = resolve_slice_range(slices, n_slices)
    values = engine.values
    fitting = engine.iter_fit(colour_stack is not None)
    while True:
        try:
            step = next(fitting)
        except StopIteration as stop:
            estimates = {v: model.estimate for v, model in stop.value.items()}
            break
        yield Progress(0, last - first, step.stage)
    batch = batch_size or auto_batch_size(engine.settings.support_size, engine.device)
    out_dtype = label_dtype(max(values))
    labels_out = np.zeros((n_slices, height, width), out_dtype)
    probs_out = np.zeros((len(values), n_slices, height, width), np.float32) if keep_probabilities else None
    log.info(
        "segmenting %d slice(s) of %dx%d, tasks %s (%s), S=%d, K=%d on %s",
        n_slices,
        height,
        width,
        values,
        ", ".join(e.method for e in estimates.values()),
        engine.settings.support_size,
        engine.settings.ensemble,
        engine.device,
    )
    tracker = None
    if extent == "auto" and grey.ndim == 3:
        painted = painted_slices(engine.support, values, stack, axis % 3)
        tracker = ExtentTracker(values, n_slices, painted, engine.settings.threshold)
    yield Progress(0, last - first, "segmenting")
    for start in range(first, last, batch):
        stop = min(last, start + batch)
        probs = engine.predict(stack[start:stop], None if colour_stack is None else colour_stack[start:stop])
        chunk_labels = combine_tasks(probs, values, engine.settings.threshold, out_dtype)
        labels_out[start:stop] = chunk_labels
        if probs_out is not None:
            probs_out[:, start:stop] = probs.transpose(1, 0, 2, 3)
        if tracker is not None:
            tracker.add(start, probs, chunk_labels)
        yield Progress(
            stop - first, last - first, "segmenting", {"start": start, "stop": stop, "labels": chunk_labels}
        )

    if grey.ndim == 2:
        probs_final = probs_out[:, 0] if probs_out is not None else None
        return SegmentationResult(labels_out[0], list(values), probs_final, estimates)
    extents = tracker.apply(labels_out, probs_out) if tracker is not None else None
    probs_final = np.moveaxis(probs_out, 1, axis % 3 + 1) if probs_out is not None else None
    return SegmentationResult(np.moveaxis(labels_out, 0, axis), list(values), probs_final, estimates, extents)


def segment(image: np.ndarray, support: SupportSet, model=None, **kwargs) -> SegmentationResult:
    """Run :func:`iter_segment` to the end and return its result."""
    return run_to_end(iter_segment(image, support, model, **kwargs))

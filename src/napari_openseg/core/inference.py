"""In-context segmentation of 2D images and 3D volumes (slice by slice) from a support set.

For every task (label value) the network sees the query slice and a support subset of S entries of
that task; the predictions from K subsets drawn independently (seeded) are combined (support-set
ensembling, :mod:`.ensemble`). Tasks are combined into one label map by argmax, with voxels whose
best probability is below ``threshold`` left as background. The work is done in batches of slices;
after each batch the generator yields a :class:`~napari_openseg.core.progress.Progress` whose
payload holds that batch's labels, and that is where a consumer can stop it (cancel).
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import OpenSegError
from .device import resolve_device, resolve_precision
from .ensemble import EnsembleMean
from .extent import EXTENTS, ExtentTracker, painted_slices, resolve_slice_range
from .preprocess import Aspect, from_grid, masks_to_grid, normalize_intensity, to_grid
from .progress import Progress, run_to_end
from .support import SupportEntry, SupportSet, check_image

log = logging.getLogger(__name__)

#: Memory the encoded support sets of one run may keep between batches.
ENCODED_SUPPORT_BUDGET = 2 * 1024**3


@dataclass
class SegmentationResult:
    """Label map with the image's shape, and per-task probabilities ``"C *shape"`` if kept."""

    labels: np.ndarray
    label_values: list[int]
    probabilities: np.ndarray | None = None
    #: Per task, the slices ``[first, stop)`` it was kept on (``extent="auto"``; see core/extent.py).
    extent: dict[int, tuple[int, int]] | None = None

    def probability(self, label: int) -> np.ndarray:
        if self.probabilities is None:
            raise OpenSegError("probabilities were not kept; run with keep_probabilities=True")
        return self.probabilities[self.label_values.index(label)]


def label_dtype(max_label: int) -> np.dtype:
    """Smallest unsigned type that holds every label value."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_label <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    if max_label > np.iinfo(np.int64).max:
        raise OpenSegError(f"label value {max_label} is beyond 64-bit labels; renumber the labels")
    return np.dtype(np.int64)


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


def support_tensors(
    entries: Sequence[SupportEntry], grid: int, aspect: Aspect, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries -> ``images "1 S 1 g g"`` and ``labels "1 S 1 g g"`` on the model grid."""
    images, masks = [], []
    for entry in entries:
        image = torch.from_numpy(np.ascontiguousarray(entry.image, dtype=np.float32)).to(device)
        mask = torch.from_numpy(np.ascontiguousarray(entry.mask)).to(device)
        images.append(to_grid(image[None], grid, aspect)[0])
        masks.append(masks_to_grid(mask[None], grid, aspect))
    as_batch = lambda xs: torch.cat(xs).unsqueeze(0).to(dtype)  # noqa: E731
    return as_batch(images), as_batch(masks)


def _draw_subsets(
    support: SupportSet, label: int, size: int, ensemble: int, seed: int
) -> list[list[SupportEntry]]:
    """K support subsets for one task; identical subsets (a task with <= S entries) collapse to one."""
    rng = np.random.default_rng([seed, label])
    subsets = [support.sample(label, size, rng) for _ in range(ensemble)]
    if len(support.task(label)) <= size:
        return subsets[:1]
    return subsets


def auto_batch_size(support_size: int, device: torch.device) -> int:
    """Slices per forward pass: about ``budget / S``. On a CPU larger batches were no faster (within
    the run-to-run noise) but cost 40-60 MB per slice more at S = 16 (``bench_segment.py --batch-sizes``,
    docs/performance.md), so the CPU budget is small."""
    budget = 512 if device.type == "cuda" else 4
    return int(max(1, min(64, budget // max(1, support_size))))


class _EnsemblePredictor:
    """Per-task probabilities for batches of query slices, combined over K support subsets
    (:mod:`.ensemble`).

    ``formulation="fast"`` (default) encodes each subset once and reuses it for every batch while
    the encodings fit in ``ENCODED_SUPPORT_BUDGET``; ``"direct"`` runs the paper's formulation one
    slice at a time (a reference for benchmarks and tests).
    """

    def __init__(self, net, support: SupportSet, values: list[int], support_size: int, ensemble: int,
                 seed: int, aspect: Aspect, device: torch.device, dtype: torch.dtype, formulation: str,
                 threshold: float):
        if formulation not in ("fast", "direct"):
            raise OpenSegError(f"formulation must be 'fast' or 'direct', got {formulation!r}")
        self.net, self.values, self.aspect = net, values, aspect
        self.device, self.dtype, self.formulation = device, dtype, formulation
        self.threshold = threshold
        self.subsets = {v: _draw_subsets(support, v, support_size, ensemble, seed) for v in values}
        grid = net.config.grid_size
        bytes_per_entry = net.config.encoder_channels[0] * grid * grid * torch.finfo(dtype).bits // 8
        total = sum(len(subset) * bytes_per_entry for subs in self.subsets.values() for subset in subs)
        self.keep = total <= ENCODED_SUPPORT_BUDGET
        self.cache: dict[tuple[int, int], object] = {}

    def _support(self, value: int, k: int):
        from ..model.fast import encode_support

        if (value, k) in self.cache:
            return self.cache[(value, k)]
        grid = self.net.config.grid_size
        tensors = support_tensors(self.subsets[value][k], grid, self.aspect, self.device, self.dtype)
        prepared = tensors if self.formulation == "direct" else encode_support(self.net, *tensors)
        if self.keep:
            self.cache[(value, k)] = prepared
        return prepared

    def _logits(self, query: torch.Tensor, value: int, k: int) -> torch.Tensor:
        from ..model.fast import fast_forward

        prepared = self._support(value, k)
        if self.formulation == "fast":
            return fast_forward(self.net, query, encoded=prepared)
        images, masks = prepared
        return torch.cat([self.net(query[i : i + 1], images, masks) for i in range(query.shape[0])])

    @torch.inference_mode()
    def __call__(self, query: torch.Tensor) -> torch.Tensor:
        """``query "B 1 g g"`` -> probabilities ``"B C g g"`` (float32), C = number of tasks."""
        per_task = []
        for value in self.values:
            members = EnsembleMean(self.threshold)
            for k in range(len(self.subsets[value])):
                members.add(torch.sigmoid(self._logits(query, value, k).float()))
            per_task.append(members.result())
        return torch.cat(per_task, dim=1)


def iter_segment(
    image: np.ndarray,
    support: SupportSet,
    model=None,
    *,
    axis: int = 0,
    label_values: Sequence[int] | None = None,
    support_size: int = 16,
    ensemble: int = 1,
    threshold: float = 0.5,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    precision: str = "float32",
    aspect: Aspect = "pad",
    seed: int = 0,
    rgb: bool | None = None,
    keep_probabilities: bool = True,
    formulation: str = "fast",
    slices=None,
    extent: str = "all",
) -> Generator[Progress, None, SegmentationResult]:
    """Segment ``image`` (``"H W"`` or a volume with slices along ``axis``) from ``support``.

    Parameters
    ----------
    model
        A weights name, a weights file path, or a ``UniverSeg`` network; ``None`` is the default
        weights.
    support_size, ensemble
        S entries per prediction and K predictions combined per task (area-matched mean, see
        :mod:`.ensemble`).
    threshold
        Minimum probability of the winning task for a voxel to be labelled.
    batch_size
        Query slices per forward pass; ``None`` picks one from S and the device.
    formulation
        ``"fast"`` (default) or ``"direct"`` (the paper's, one slice at a time; same result, slower).
    slices, extent
        Volumes only: the slice range to segment (``"A:B"``, ``(A, B)``, a ``slice``; A included, B
        not; the rest stays background), and ``"all"`` or ``"auto"``: each task ends where it fades
        out, as a propagation front does (:mod:`.extent`; the result's ``extent`` says where; a 2D
        image is its own extent).

    Yields progress per batch (``payload``: ``start``, ``stop`` slice indices and ``labels``, that
    batch's label map ``"b H W"``); returns a :class:`SegmentationResult`.
    """
    from ..model.fast import prepare_for_inference
    from ..model.registry import load_model
    from ..model.universeg import UniverSeg

    image = check_image(image, rgb)
    if support_size < 1 or ensemble < 1:
        raise OpenSegError(f"support size and ensemble must be >= 1, got S={support_size}, K={ensemble}")
    if batch_size is not None and batch_size < 1:
        raise OpenSegError(f"batch size must be >= 1 (or left out for automatic), got {batch_size}")
    if not 0.0 <= threshold <= 1.0:
        raise OpenSegError(f"threshold must lie in [0, 1], got {threshold}")
    if seed < 0:
        raise OpenSegError(f"the seed must be 0 or more, got {seed}")
    values = support.validate(label_values)
    torch_device = resolve_device(device)
    dtype = resolve_precision(precision, torch_device)
    if image.ndim == 3 and not -3 <= axis < 3:
        raise OpenSegError(f"slice axis must be 0, 1 or 2 for a 3D volume, got {axis}")
    if extent not in EXTENTS:
        raise OpenSegError(f"extent must be one of {', '.join(EXTENTS)}, got {extent!r}")
    if image.ndim == 2 and slices is not None:
        raise OpenSegError("a slice range applies to volumes, not to a 2D image")
    net = model if isinstance(model, UniverSeg) else load_model(model, "cpu")
    net = prepare_for_inference(net, torch_device, dtype)
    predict = _EnsemblePredictor(net, support, values, support_size, ensemble, seed, aspect,
                                 torch_device, dtype, formulation, threshold)

    volume = normalize_intensity(image)
    stack = volume[None] if image.ndim == 2 else np.moveaxis(volume, axis, 0)
    n_slices, height, width = stack.shape
    batch = batch_size or auto_batch_size(support_size, torch_device)
    out_dtype = label_dtype(max(values))
    labels_out = np.zeros((n_slices, height, width), out_dtype)
    probs_out = np.zeros((len(values), n_slices, height, width), np.float32) if keep_probabilities else None
    log.info("segmenting %d slice(s) of %dx%d, tasks %s, S=%d, K=%d on %s (%s)",
             n_slices, height, width, values, support_size, ensemble, torch_device, precision)
    first, last = resolve_slice_range(slices, n_slices)
    tracker = ExtentTracker(values, n_slices, painted_slices(support, values, stack, axis % 3), threshold) \
        if extent == "auto" and image.ndim == 3 else None
    yield Progress(0, last - first, "segmenting")
    for start in range(first, last, batch):
        stop = min(last, start + batch)
        with torch.inference_mode():
            slices = torch.from_numpy(np.ascontiguousarray(stack[start:stop])).to(torch_device)
            query, mapping = to_grid(slices, net.config.grid_size, aspect)
            query = query.to(dtype).contiguous(memory_format=torch.channels_last)
            probs = from_grid(predict(query), mapping).clamp_(0, 1).cpu().numpy()
        chunk_labels = combine_tasks(probs, values, threshold, out_dtype)
        labels_out[start:stop] = chunk_labels
        if probs_out is not None:
            probs_out[:, start:stop] = probs.transpose(1, 0, 2, 3)
        if tracker is not None:
            tracker.add(start, probs, chunk_labels)
        yield Progress(stop - first, last - first, "segmenting", {"start": start, "stop": stop, "labels": chunk_labels})

    if image.ndim == 2:
        return SegmentationResult(labels_out[0], list(values), probs_out[:, 0] if probs_out is not None else None)
    extents = tracker.apply(labels_out, probs_out) if tracker is not None else None
    probs_final = np.moveaxis(probs_out, 1, axis % 3 + 1) if probs_out is not None else None
    return SegmentationResult(np.moveaxis(labels_out, 0, axis), list(values), probs_final, extents)


def segment(image: np.ndarray, support: SupportSet, model=None, **kwargs) -> SegmentationResult:
    """Run :func:`iter_segment` to the end and return its result."""
    return run_to_end(iter_segment(image, support, model, **kwargs))


def load_support(support: SupportSet | str | Path) -> SupportSet:
    """A support set, or the one stored in a file."""
    return support if isinstance(support, SupportSet) else SupportSet.load(support)

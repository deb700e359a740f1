"""The in-context network as the engine runs it: resolution and preparation, support encoding, the
forward pass and ensembling; :mod:`.engine` is the front door that every capability calls.

* **Resolution and preparation**: :func:`prepare_network` turns a weights name, a weights file or a
  network into a :class:`Network`: a private copy on the device, in the precision, channels-last, in
  eval mode, without gradients.
* **Support encoding and the forward pass**: :meth:`Network.encode` does the query-independent work
  of a support set once (:func:`~napari_openseg.model.fast.encode_support`); :meth:`Network.probabilities`
  and :meth:`Network.features` run the fast formulation on queries placed on the model grid by
  :meth:`Network.query`.
* **Ensembling**: :class:`EnsemblePredictor` combines, per task, the predictions from K support
  subsets drawn by :func:`draw_subsets` (:mod:`.ensemble`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from napari_openseg.core.device import resolve_device, resolve_precision
from napari_openseg.core.engine_settings import (
    DEFAULT_ASPECT,
    DEFAULT_FORMULATION,
    DEFAULT_PRECISION,
    DEFAULT_THRESHOLD,
    FORMULATIONS,
    check_choice,
)
from napari_openseg.core.ensemble import EnsembleMean
from napari_openseg.core.preprocess import Aspect, GridMapping, from_grid, masks_to_grid, to_grid
from napari_openseg.core.support import SupportEntry

#: Memory the encoded support sets of one run may keep between batches.
ENCODED_SUPPORT_BUDGET = 2 * 1024**3


def load_network(model=None, *, propagation: bool = False):
    """The (shared, unprepared) network for ``model``: a weights name, a file path, a ``UniverSeg``
    network, or ``None`` for the default weights (propagation's default with ``propagation``)."""
    from napari_openseg.model.registry import load_model, propagation_weights
    from napari_openseg.model.universeg import UniverSeg

    if isinstance(model, UniverSeg):
        return model
    if isinstance(model, Network):
        return model.net
    return load_model(propagation_weights(model) if propagation else model, "cpu")


def prepare_network(
    model=None,
    device: str | torch.device = "auto",
    precision: str = DEFAULT_PRECISION,
    *,
    propagation: bool = False,
) -> Network:
    """A :class:`Network` ready for inference; see :func:`load_network` for ``model``.

    A :class:`Network` already on that device and in that precision is returned as it is."""
    from napari_openseg.model.fast import prepare_for_inference

    torch_device = resolve_device(device)
    dtype = resolve_precision(precision, torch_device)
    if isinstance(model, Network) and model.device == torch_device and model.dtype == dtype:
        return model
    net = load_network(model, propagation=propagation)
    return Network(prepare_for_inference(net, torch_device, dtype), torch_device, dtype)


def auto_batch_size(support_size: int, device: torch.device) -> int:
    """Slices per forward pass: about ``budget / S``. On a CPU larger batches were no faster (within
    the run-to-run noise) but cost 40-60 MB per slice more at S = 16 (``bench_segment.py --batch-sizes``,
    docs/performance.md), so the CPU budget is small."""
    budget = 512 if device.type == "cuda" else 4
    return int(max(1, min(64, budget // max(1, support_size))))


@dataclass
class Network:
    """A prepared in-context network (``net``) with its device and dtype, and its forward pass."""

    net: object
    device: torch.device
    dtype: torch.dtype

    @property
    def grid(self) -> int:
        return int(self.net.config.grid_size)

    @property
    def weights_info(self) -> dict:
        return dict(getattr(self.net, "weights_info", {}) or {})

    def query(self, slices: np.ndarray, aspect: Aspect = DEFAULT_ASPECT) -> tuple[torch.Tensor, GridMapping]:
        """Normalised ``"N H W"`` slices -> ``"N 1 g g"`` queries (channels-last) and the mapping back."""
        tensor = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32)).to(self.device)
        query, mapping = to_grid(tensor, self.grid, aspect)
        return query.to(self.dtype).contiguous(memory_format=torch.channels_last), mapping

    def support_tensors(
        self, entries: Sequence[SupportEntry], aspect: Aspect = DEFAULT_ASPECT
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Entries -> ``images "1 S 1 g g"`` and ``labels "1 S 1 g g"`` on the model grid."""
        return support_tensors(entries, self.grid, aspect, self.device, self.dtype)

    def encode(self, entries: Sequence[SupportEntry], aspect: Aspect = DEFAULT_ASPECT):
        """The first block's support terms of one support set (reused for every query)."""
        return encode_tensors(self.net, *self.support_tensors(entries, aspect))

    def encode_tensors(self, images: torch.Tensor, labels: torch.Tensor):
        """:meth:`encode` for ``"B' S 1 g g"`` tensors already on the grid (one set per batch item)."""
        return encode_tensors(self.net, images, labels)

    def probabilities(self, query: torch.Tensor, encoded) -> torch.Tensor:
        """``query "B 1 g g"`` -> foreground probabilities ``"B 1 g g"`` (float32)."""
        return probabilities(self.net, query, encoded)

    def features(self, query: torch.Tensor, encoded) -> torch.Tensor:
        """``query "B 1 g g"`` -> the last decoder features ``"B C g g"``."""
        from napari_openseg.model.fast import fast_features

        with torch.inference_mode():
            return fast_features(self.net, query, encoded=encoded)

    def direct_probabilities(
        self, query: torch.Tensor, images: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """The paper's formulation, one query at a time (a reference for tests and benchmarks)."""
        with torch.inference_mode():
            logits = torch.cat([self.net(query[i : i + 1], images, labels) for i in range(query.shape[0])])
        return torch.sigmoid(logits.float())

    def predict(
        self,
        slices: np.ndarray,
        subsets: Sequence[Sequence[SupportEntry]],
        threshold: float = DEFAULT_THRESHOLD,
        rule: str = "area-matched",
        aspect: Aspect = DEFAULT_ASPECT,
    ) -> np.ndarray:
        """Probabilities ``"b H W"`` of normalised slices ``"b H W"`` (one shape), combined over the
        support ``subsets`` by ``rule`` (:mod:`.ensemble`)."""
        query, mapping = self.query(slices, aspect)
        members = EnsembleMean(threshold, rule)
        for subset in subsets:
            members.add(self.probabilities(query, self.encode(subset, aspect)))
        return from_grid(members.result(), mapping)[:, 0].clamp(0, 1).cpu().numpy()


def encode_tensors(net, images: torch.Tensor, labels: torch.Tensor):
    """The first block's support terms (:func:`~napari_openseg.model.fast.encode_support`) of
    ``"B' S 1 g g"`` support images and labels on the grid of the prepared network ``net``."""
    from napari_openseg.model.fast import encode_support

    with torch.inference_mode():
        return encode_support(net, images, labels)


def probabilities(net, query: torch.Tensor, encoded) -> torch.Tensor:
    """The forward pass: ``query "B 1 g g"`` and an encoded support -> probabilities ``"B 1 g g"``
    (float32) of the prepared network ``net``."""
    from napari_openseg.model.fast import fast_forward

    with torch.inference_mode():
        return torch.sigmoid(fast_forward(net, query, encoded=encoded).float())


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


def draw_subsets(
    entries: Sequence[SupportEntry], label: int, size: int, ensemble: int, seed: int
) -> list[list[SupportEntry]]:
    """K subsets of ``size`` of one task's ``entries``, seeded by ``(seed, label)``; a task with at
    most ``size`` entries gives one subset of all of them (identical subsets would repeat work)."""
    entries = list(entries)
    if len(entries) <= size:
        return [entries]
    rng = np.random.default_rng([seed, label])
    return [
        [entries[i] for i in sorted(rng.choice(len(entries), size, replace=False))] for _ in range(ensemble)
    ]


class EnsemblePredictor:
    """Per-task network probabilities for batches of query slices, combined over each task's support
    subsets (:mod:`.ensemble`).

    ``formulation="fast"`` (default) encodes each subset once and reuses it for every batch while
    the encodings fit in ``ENCODED_SUPPORT_BUDGET``; ``"direct"`` runs the paper's formulation one
    slice at a time (a reference for benchmarks and tests).
    """

    def __init__(
        self,
        network: Network,
        subsets: dict[int, list[list[SupportEntry]]],
        threshold: float = DEFAULT_THRESHOLD,
        aspect: Aspect = DEFAULT_ASPECT,
        formulation: str = DEFAULT_FORMULATION,
        rule: str = "area-matched",
    ):
        check_choice("formulation", formulation, FORMULATIONS)
        self.network, self.subsets, self.threshold = network, subsets, threshold
        self.aspect, self.formulation, self.rule = aspect, formulation, rule
        net = network.net
        bytes_per_entry = (
            net.config.encoder_channels[0] * network.grid**2 * torch.finfo(network.dtype).bits // 8
        )
        total = sum(len(subset) * bytes_per_entry for subs in subsets.values() for subset in subs)
        self.keep = total <= ENCODED_SUPPORT_BUDGET
        self.cache: dict[tuple[int, int], object] = {}

    def _support(self, value: int, k: int):
        if (value, k) in self.cache:
            return self.cache[(value, k)]
        entries = self.subsets[value][k]
        if self.formulation == "direct":
            prepared = self.network.support_tensors(entries, self.aspect)
        else:
            prepared = self.network.encode(entries, self.aspect)
        if self.keep:
            self.cache[(value, k)] = prepared
        return prepared

    def task_probabilities(self, query: torch.Tensor, value: int) -> torch.Tensor:
        """``query "B 1 g g"`` -> task ``value``'s probabilities ``"B 1 g g"`` (float32)."""
        members = EnsembleMean(self.threshold, self.rule)
        for k in range(len(self.subsets[value])):
            prepared = self._support(value, k)
            if self.formulation == "fast":
                members.add(self.network.probabilities(query, prepared))
            else:
                members.add(self.network.direct_probabilities(query, *prepared))
        return members.result()

    def __call__(self, query: torch.Tensor, values: Sequence[int] | None = None) -> torch.Tensor:
        """``query "B 1 g g"`` -> probabilities ``"B C g g"`` (float32) of the tasks ``values``
        (default: all)."""
        values = list(self.subsets) if values is None else values
        return torch.cat([self.task_probabilities(query, value) for value in values], dim=1)


def with_masks(entries: Sequence[SupportEntry], masks: Sequence[np.ndarray]) -> list[SupportEntry]:
    """Copies of ``entries`` with other masks (dense masks made from strokes for the network)."""
    return [replace(entry, mask=np.asarray(mask, bool)) for entry, mask in zip(entries, masks, strict=True)]


def weights_name(model) -> str:
    """How a report names ``model`` (a name, a path, or the source of a network)."""
    if model is None:
        return "default"
    if isinstance(model, (str, Path)):
        return str(model)
    net = model.net if isinstance(model, Network) else model
    source = (getattr(net, "weights_info", {}) or {}).get("source")
    return str(source) if source else f"an unsaved {type(net).__name__} network"

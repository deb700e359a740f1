"""What each item of a cohort runs: a task (segmentation, novelty map) applied to one image at a time.

A task is a small picklable description (files, weights and keyword options) so that it can travel to
Dask workers. It names its outputs by ``tags`` (one file per tag and input, the first the main one)
and :meth:`~SegmentTask.outputs` gives their arrays in that order. :meth:`SegmentTask.prepare` loads
what every item shares (the support set and the network); :func:`process_item` keeps that per process,
keyed by the task's settings hash, so a worker loads it once and not per item. The napari Segment
widget runs its open images through the same :class:`SegmentTask` (:meth:`~SegmentTask.prepare` once,
:meth:`~SegmentTask.iter_run` per image).

Options are the keywords of the core function the task calls (``iter_segment``,
``iter_novelty_map``, ``iter_training_free_novelty``) and are passed through unchanged, so new
engine options reach a cohort without changes here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from napari_openseg.core.novelty.region import REGION_SUFFIX, region_volume
from napari_openseg.core.progress import Progress, run_to_end
from napari_openseg.errors import OpenSegError

log = logging.getLogger(__name__)

#: Options that say where or in what pieces a result is computed, not what it is: they are left out of
#: the settings hash, so that a cohort resumed on another device or batch size is not recomputed.
PLACEMENT_OPTIONS = frozenset({"device", "batch_size", "keep_probabilities"})
#: A segmentation's options that go to each image's run (``iter_segment_with``); the others make the engine.
RUN_OPTIONS = frozenset({"axis", "batch_size", "keep_probabilities", "slices", "extent"})


class CohortTask(Protocol):
    """What :func:`process_item` needs of a task."""

    name: ClassVar[str]
    #: One output file per tag and input (``<input>_<tag>``), the first the main one.
    tags: ClassVar[tuple[str, ...]]
    options: dict[str, Any]

    def settings(self) -> dict[str, Any]: ...

    def prepare(self, device: Any = None) -> Any: ...

    def check(self) -> None: ...

    def iter_run(self, prepared: Any, image: np.ndarray, **overrides) -> Generator[Progress, None, Any]: ...

    def outputs(self, result: Any) -> tuple[np.ndarray, ...]: ...


def digest(source: Any) -> str | None:
    """SHA-256 of a file (by content) or of an object: a support set, a network or novelty model (its
    tensors), arrays, and dicts and lists of them; ``None`` for ``None``."""
    if source is None:
        return None
    sha = hashlib.sha256()
    if isinstance(source, (str, Path)):
        with open(source, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
    else:
        _feed(sha, source)
    return sha.hexdigest()


def _feed(sha, value: Any) -> None:
    import torch

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    if isinstance(value, np.ndarray):
        sha.update(f"{value.dtype}{value.shape}".encode())
        sha.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            sha.update(str(key).encode())
            _feed(sha, value[key])
    elif isinstance(value, (list, tuple)):
        for part in value:
            _feed(sha, part)
    elif hasattr(value, "entries"):  # a SupportSet
        _feed(sha, [(entry.label, entry.image, entry.mask) for entry in value.entries])
    elif hasattr(value, "payload"):  # a NoveltyModel
        _feed(sha, value.payload())
    elif hasattr(value, "state_dict"):  # a network
        _feed(sha, value.state_dict())
    else:
        sha.update(repr(value).encode())


def _weights_digest(weights: Any) -> str:
    from napari_openseg.model.registry import resolve_weights_path

    if weights is None or isinstance(weights, (str, Path)):
        return digest(resolve_weights_path(weights))
    return digest(weights)


def settings_hash(task: CohortTask) -> str:
    """A short hash of everything that decides a task's results (files by content, options by value)."""
    text = json.dumps(task.settings(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _result_options(options: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in options.items() if key not in PLACEMENT_OPTIONS}


@dataclass
class SegmentTask:
    """Segment each image with one support set (:func:`~napari_openseg.core.segment.inference.iter_segment`).

    ``support`` is a :class:`~napari_openseg.core.support.SupportSet` or its file; ``weights`` a
    weights name, file or network (``None``: the default); ``options`` are ``iter_segment``'s
    keywords (axis, support_size, ensemble, threshold, method, device, ...). ``openseg segment``,
    ``openseg batch segment`` and the Segment widget all run through it.
    """

    support: Any
    weights: Any = None
    options: dict[str, Any] = field(default_factory=dict)

    name: ClassVar[str] = "segment"
    tags: ClassVar[tuple[str, ...]] = ("labels",)

    def settings(self) -> dict[str, Any]:
        from napari_openseg.core.support import load_support

        # the support set's entries, not its file's bytes: the same set saved again is the same setting
        return {
            "task": self.name,
            "support": digest(load_support(self.support)),
            "weights": _weights_digest(self.weights),
            "options": _result_options(self.options),
        }

    def prepare(self, device: Any = None):
        """The :class:`~napari_openseg.core.engine.Engine` of the support set, the weights and the
        task's options (on ``device`` when given, else the options' device): support set and network
        loaded and checked; its tasks are fitted on the first image and kept for the rest."""
        from napari_openseg.core.engine import Engine
        from napari_openseg.core.support import load_support

        options = {key: value for key, value in self.options.items() if key not in RUN_OPTIONS}
        if device is not None:
            options["device"] = device
        return Engine(load_support(self.support), self.weights, **options)

    def check(self) -> None:
        """Refuse a support set, weights or options that cannot be used (on the CPU, fitting nothing)."""
        self.prepare(device="cpu")

    def iter_run(self, engine, image: np.ndarray, **overrides):
        """``iter_segment_with`` of ``image`` with the task's options, ``overrides`` (axis, rgb, ...) on
        top; a ``device`` override is the engine's, set by :meth:`prepare`."""
        from napari_openseg.core.segment.inference import iter_segment_with

        # labels only, unless asked (the widget, segment --probabilities)
        options = {"keep_probabilities": False}
        options.update((key, value) for key, value in self.options.items() if key in RUN_OPTIONS)
        options.update((key, value) for key, value in overrides.items() if key != "device")
        return iter_segment_with(engine, image, **options)

    def outputs(self, result) -> tuple[np.ndarray, ...]:
        """The labels."""
        return (result.labels,)


@dataclass
class NoveltyTask:
    """Map the novelty of each volume with a trained novelty ``model`` (file or
    :class:`~napari_openseg.core.novelty.model.NoveltyModel`), or training-free from ``support`` with
    in-context ``weights`` and an optional ``unknown_seed`` ``(image file, mask file)``.

    ``options`` are the keywords of ``iter_novelty_map`` or ``iter_training_free_novelty``. Each volume
    gives the heat map and the novel region, named and thresholded as ``openseg novelty map`` does
    (:mod:`napari_openseg.core.novelty.region`).
    """

    model: Any = None
    support: Any = None
    weights: Any = None
    unknown_seed: tuple[Any, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    name: ClassVar[str] = "novelty"
    #: ``<input>_novelty_novel_region`` is ``region_path`` of ``<input>_novelty``, as `novelty map` names it
    tags: ClassVar[tuple[str, ...]] = ("novelty", f"novelty{REGION_SUFFIX}")

    def __post_init__(self) -> None:
        if (self.model is None) == (self.support is None):
            raise OpenSegError(
                "a novelty map needs a trained model or a support set (training-free), one of them"
            )
        if self.model is not None and self.unknown_seed is not None:
            raise OpenSegError(
                "an unknown seed is for the training-free map; seed a trained model with "
                "`openseg novelty seed`"
            )

    def settings(self) -> dict[str, Any]:
        from napari_openseg.core.support import load_support

        seed = [digest(part) for part in self.unknown_seed] if self.unknown_seed is not None else None
        if self.model is not None:
            source = {"model": digest(self.model)}
        else:
            source = {
                "support": digest(load_support(self.support)),
                "weights": _weights_digest(self.weights),
                "seed": seed,
            }
        return {"task": self.name, **source, "options": _result_options(self.options)}

    def prepare(self, device: Any = None) -> tuple[Any, Any, Any]:
        """``(novelty model, None, None)`` or ``(support set, network, unknown seed arrays)``; the map
        moves them to its device (``device`` comes to :meth:`iter_run` as an override)."""
        from napari_openseg.core.network import load_network
        from napari_openseg.core.novelty.model import NoveltyModel, check_seed
        from napari_openseg.core.support import load_support
        from napari_openseg.io import read_image

        if self.model is not None:
            model = self.model if isinstance(self.model, NoveltyModel) else NoveltyModel.load(self.model)
            wants_unknown = self.options.get("use_unknown", True) and not self.options.get("seed_free", False)
            if self.options.get("adapt_unknown", 0) and wants_unknown and model.bank.unknown is None:
                raise OpenSegError(
                    f"{self.model} has no unknown prototype to adapt; seed one first with "
                    "`openseg novelty seed`, or leave out --adapt-unknown"
                )
            return model, None, None
        support = load_support(self.support)
        support.validate()
        net = load_network(self.weights)
        seed = None
        if self.unknown_seed is not None:
            image, mask = (read_image(p).data if isinstance(p, (str, Path)) else p for p in self.unknown_seed)
            seed = check_seed(image, np.asarray(mask) != 0)
        return support, net, seed

    def check(self) -> None:
        """Refuse a model, support set, weights or seed that cannot be used."""
        self.prepare()

    def iter_run(
        self, prepared: tuple[Any, Any, Any], image: np.ndarray, rgb: bool | None = None, **overrides
    ):
        from napari_openseg.core.novelty.free import iter_training_free_novelty
        from napari_openseg.core.novelty.volume_map import iter_novelty_map

        if rgb:
            raise OpenSegError("novelty maps are for grey-value volumes; this image is RGB")
        options = {**self.options, **overrides}
        first, net, seed = prepared
        if net is None:
            return iter_novelty_map(image, first, **options)
        return iter_training_free_novelty(image, first, net, unknown_seed=seed, **options)

    def outputs(self, result) -> tuple[np.ndarray, ...]:
        """The fused heat map and the novel region."""
        return result.fused, region_volume(result)


@dataclass(frozen=True)
class CohortItem:
    """One input file and the files its results go to (in the order of the task's ``tags``)."""

    source: Path
    outputs: tuple[Path, ...]

    @property
    def output(self) -> Path:
        """The main output, which names the item in the manifest."""
        return self.outputs[0]


@dataclass
class ItemResult:
    """What became of one item: ``status`` is ``"done"`` or ``"failed"`` (with ``error``)."""

    item: CohortItem
    status: str
    error: str = ""
    seconds: float = 0.0
    device: str = ""


@dataclass
class CohortJob:
    """A task with its settings hash, as the workers receive it; ``torch_threads`` per task (``None``:
    as the worker's environment says), ``spread_gpus``: worker N uses GPU N."""

    task: Any
    settings_hash: str
    torch_threads: int | None = None
    spread_gpus: bool = False


#: This process's prepared task: ``{settings hash: prepared state}`` (one task at a time).
_PREPARED: dict[str, Any] = {}
_PREPARED_LOCK = threading.Lock()


def prepared_for(job: CohortJob, device: Any = None) -> Any:
    """The job's task prepared once in this process (support set read, network loaded, the engine's
    tasks fitted on its first image)."""
    with _PREPARED_LOCK:
        if job.settings_hash not in _PREPARED:
            _PREPARED.clear()
            _PREPARED[job.settings_hash] = job.task.prepare(device)
        return _PREPARED[job.settings_hash]


def _dask_worker():
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):  # not inside a Dask task
        return None


#: glibc's malloc thresholds restored in this process (once).
_MALLOC_RESTORED: list[bool] = []


def _restore_malloc_thresholds() -> None:
    """Let large blocks come from the heap again in a Dask worker.

    Dask starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also stops glibc from raising its
    mmap threshold: every tensor above 128 KiB is then a fresh ``mmap`` whose pages fault in again, and a
    hippocampus volume took 60 s instead of 33 s (docs/performance.md). Thresholds of 32 MiB (mmap) and
    64 MiB (trim) give back what glibc's own adaptive rule reaches.
    """
    if _MALLOC_RESTORED or not os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return
    _MALLOC_RESTORED.append(True)
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
        libc.mallopt(m_mmap_threshold, 32 * 2**20)
        libc.mallopt(m_trim_threshold, 64 * 2**20)
    except (OSError, AttributeError):  # not glibc: its allocator has no such thresholds
        pass


def _placement(job: CohortJob) -> dict[str, Any]:
    """Set this process's torch threads for the job and return the device override, if any.

    Without a thread count (a running cluster's workers) torch keeps the count its environment gives
    it: Dask starts workers with ``OMP_NUM_THREADS=1`` so that workers x threads cover the cores."""
    import torch

    worker = _dask_worker()
    if worker is not None:
        _restore_malloc_thresholds()
    if job.torch_threads is not None and torch.get_num_threads() != job.torch_threads:
        torch.set_num_threads(job.torch_threads)
    if job.spread_gpus and worker is not None and isinstance(worker.name, int) and torch.cuda.is_available():
        return {"device": f"cuda:{worker.name % torch.cuda.device_count()}"}
    return {}


def _device_name(device) -> str:
    """``cuda:N`` for a GPU even when chosen as ``cuda`` (the manifest says which one ran an item)."""
    import torch

    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def failure_message(err: BaseException) -> str:
    """A user's mistake says what it is; anything else says its type as well."""
    text = str(err).strip() or repr(err)
    return text if isinstance(err, OpenSegError) else f"{type(err).__name__}: {text}"


def process_item(item: CohortItem, job: CohortJob) -> ItemResult:
    """Read ``item.source``, run the job's task, write each of ``item.outputs`` (each atomically, with
    the input's geometry, once all are computed); any error of the item is returned as a failed result,
    not raised."""
    from napari_openseg.core.device import resolve_device
    from napari_openseg.io import read_image, write_image

    started = time.perf_counter()
    device = ""
    try:
        overrides = _placement(job)
        device = _device_name(resolve_device(overrides.get("device", job.task.options.get("device", "auto"))))
        prepared = prepared_for(job, overrides.get("device"))
        image = read_image(item.source)
        result = run_to_end(job.task.iter_run(prepared, image.data, rgb=image.rgb, **overrides))
        arrays = job.task.outputs(result)
        for path, array in zip(item.outputs, arrays, strict=True):
            write_image(path, array, image, overwrite=True)
    except Exception as err:  # one item's failure is recorded; the cohort goes on
        if isinstance(err, OpenSegError):
            log.info("%s failed: %s", item.source, err)
        else:  # not the user's mistake: the traceback goes to the worker's log
            log.warning("%s failed", item.source, exc_info=True)
        return ItemResult(item, "failed", failure_message(err), time.perf_counter() - started, device)
    return ItemResult(item, "done", "", time.perf_counter() - started, device)

"""The headless library: everything napari-openseg does, without Qt or napari.

Layout (each capability one subpackage; the shared modules beside them import none of them):

* ``segment``: segmentation by example (:func:`iter_segment`), ensembles' expected time, object extent;
* ``propagate``: prompt propagation (:func:`iter_propagate`), its memory bank and stop rules;
* ``novelty``: novelty maps, trained (:func:`iter_novelty_map`) or training-free
  (:func:`iter_training_free_novelty`);
* ``cohort``: one task over many files, resumable, locally or on Dask (:func:`iter_cohort`);
* shared: the engine (``engine``, ``network``, ``stacking``, ``pixel_classifier``), support sets
  (``support``), preprocessing, devices, progress records.

Each capability's settings are a small frozen dataclass in a torch-free module, with the defaults
beside it: :class:`SegmentSettings` (``engine_settings``), :class:`PropagationSettings`
(``propagate.settings``), :class:`NoveltySettings` (``novelty.settings``).

The names below are the public API; they are imported on first use, so ``import napari_openseg.core``
stays light (no torch).
"""

from __future__ import annotations

import importlib

_API = {
    "SupportSet": "napari_openseg.core.support",
    "SupportEntry": "napari_openseg.core.support",
    "entries_from_arrays": "napari_openseg.core.support",
    "load_support": "napari_openseg.core.support",
    "Engine": "napari_openseg.core.engine",
    "SegmentSettings": "napari_openseg.core.engine_settings",
    "iter_segment": "napari_openseg.core.segment.inference",
    "SegmentationResult": "napari_openseg.core.segment.inference",
    "PropagationSettings": "napari_openseg.core.propagate.settings",
    "iter_propagate": "napari_openseg.core.propagate.propagation",
    "PropagationResult": "napari_openseg.core.propagate.result",
    "NoveltySettings": "napari_openseg.core.novelty.settings",
    "iter_novelty_map": "napari_openseg.core.novelty.volume_map",
    "iter_training_free_novelty": "napari_openseg.core.novelty.free",
    "NoveltyModel": "napari_openseg.core.novelty.model",
    "iter_cohort": "napari_openseg.core.cohort.runner",
    "Progress": "napari_openseg.core.progress",
    "run_to_end": "napari_openseg.core.progress",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

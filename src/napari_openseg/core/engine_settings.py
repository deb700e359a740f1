"""Segmentation's settings and their defaults, in one torch-free place.

The command line builds its parser from these without importing torch (``openseg --help`` stays
quick); the Segment widget, :class:`~napari_openseg.core.engine.Engine`,
:func:`~napari_openseg.core.segment.inference.iter_segment` and the modules under them
(:mod:`.network`, :mod:`.stacking`, :mod:`.preprocess`, :mod:`.device`) read them from here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from napari_openseg.errors import OpenSegError

#: S: support entries per network prediction.
DEFAULT_SUPPORT_SIZE = 16
#: K: predictions from K support subsets combined per task (docs/performance.md: a larger S gains
#: more for less time).
DEFAULT_ENSEMBLE = 1
#: Minimum probability of the winning task for a voxel to be labelled.
DEFAULT_THRESHOLD = 0.5
#: How a task is segmented: the in-context network, the pixel classifier, or both stacked.
METHODS: tuple[str, ...] = ("network", "pixel-classifier", "stacked")
#: ``"auto"``: per task, the method with the best cross-validated Dice on the support set (stacked
#: for tasks with too few entries to choose by, :data:`MIN_CHOICE_ENTRIES`).
CHOICES: tuple[str, ...] = ("auto", *METHODS)
DEFAULT_METHOD = "auto"
#: Support cross-validation (:mod:`~napari_openseg.core.stacking`): folds per task; tasks with fewer
#: entries than ``MIN_CV_ENTRIES`` are not cross-validated (``auto`` runs the network alone); a task
#: fits and cross-validates on at most ``MAX_FIT_ENTRIES`` entries (a seeded sample of larger tasks).
DEFAULT_FOLDS = 4
MIN_CV_ENTRIES = 3
MAX_FIT_ENTRIES = 32
#: ``auto`` chooses by the cross-validated estimates from this many entries on (4 folds of >= 3
#: held-out entries each); below it runs the stacked method. Chosen on the task bank's validation
#: split (docs/evaluation.md): 10, 12 and 16 tie there, and 12 is the smallest with 3 entries a fold.
MIN_CHOICE_ENTRIES = 12
#: The classifiers' probabilities are recalibrated per task so that the threshold with the best
#: cross-validated Dice (one of ``CUT_GRID``) becomes 0.5, from ``MIN_CHOICE_ENTRIES`` entries on
#: (with 9 entries it cost EM axons 31 points on the val split; docs/evaluation.md). The network
#: keeps its own probabilities: propagation, extents and novelty read them.
TUNED_METHODS: tuple[str, ...] = ("pixel-classifier", "stacked")
CUT_GRID: tuple[float, ...] = tuple(round(0.2 + 0.05 * i, 2) for i in range(16))
#: The network's number format (float16 only on GPUs, see :func:`~napari_openseg.core.device.resolve_precision`).
PRECISIONS: tuple[str, ...] = ("float32", "bfloat16", "float16")
DEFAULT_PRECISION = "float32"
#: How a slice is fitted to the model grid: zero-padded to a square, or stretched (:mod:`.preprocess`).
ASPECTS: tuple[str, ...] = ("pad", "stretch")
DEFAULT_ASPECT = "pad"
#: ``"fast"`` encodes each support subset once; ``"direct"`` is the paper's (same result, slower).
FORMULATIONS: tuple[str, ...] = ("fast", "direct")
DEFAULT_FORMULATION = "fast"
#: ``"all"``: every slice (of the range); ``"auto"``: each task stops where it fades out
#: (:mod:`~napari_openseg.core.segment.extent`).
EXTENTS: tuple[str, ...] = ("all", "auto")
DEFAULT_EXTENT = "all"


def check_choice(what: str, value: Any, choices: Sequence[str]) -> None:
    """Refuse a ``value`` that is not one of ``choices``, naming them."""
    if value not in choices:
        raise OpenSegError(f"{what} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class SegmentSettings:
    """How a support set segments an image, checked on creation.

    Parameters
    ----------
    support_size, ensemble, seed
        S entries per network prediction, K subsets combined per task, and their seed.
    threshold
        Minimum probability of the winning task for a voxel to be labelled.
    method
        ``"auto"`` (per task, the method with the best cross-validated Dice; stacked below 12 entries), ``"network"``,
        ``"pixel-classifier"`` or ``"stacked"`` (:class:`~napari_openseg.core.engine.Engine`).
    precision, aspect, formulation
        The network's number format, how slices are fitted to its grid, and ``"fast"`` or
        ``"direct"`` (the paper's formulation, one slice at a time; same result, slower).
    extent
        Volumes: ``"all"`` slices, or ``"auto"``: each task ends where it fades out.

    Where a result is computed (device, batch size) and what it is computed of (image, support
    set, weights, slice axis and range, tasks) are not settings; the stacking options (folds,
    classifier, balance) are :class:`~napari_openseg.core.stacking.StackingSettings`.
    """

    support_size: int = DEFAULT_SUPPORT_SIZE
    ensemble: int = DEFAULT_ENSEMBLE
    threshold: float = DEFAULT_THRESHOLD
    method: str = DEFAULT_METHOD
    precision: str = DEFAULT_PRECISION
    aspect: str = DEFAULT_ASPECT
    seed: int = 0
    formulation: str = DEFAULT_FORMULATION
    extent: str = DEFAULT_EXTENT

    def __post_init__(self) -> None:
        if self.support_size < 1 or self.ensemble < 1:
            raise OpenSegError(
                f"support size and ensemble must be >= 1, got S={self.support_size}, K={self.ensemble}"
            )
        if not 0.0 <= self.threshold <= 1.0:
            raise OpenSegError(f"threshold must lie in [0, 1], got {self.threshold}")
        if self.seed < 0:
            raise OpenSegError(f"the seed must be 0 or more, got {self.seed}")
        check_choice("method", self.method, CHOICES)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("aspect", self.aspect, ASPECTS)
        check_choice("formulation", self.formulation, FORMULATIONS)
        check_choice("extent", self.extent, EXTENTS)

    @classmethod
    def split(
        cls, settings: SegmentSettings | None, options: Mapping[str, Any]
    ) -> tuple[SegmentSettings, dict[str, Any]]:
        """``settings`` (``None``: the defaults) with the fields that ``options`` name replaced, and
        the rest of ``options`` (the stacking options): the one place where keywords become settings."""
        if settings is None:
            settings = cls()
        elif not isinstance(settings, cls):
            raise OpenSegError(f"settings must be a SegmentSettings, got {type(settings).__name__}")
        names = {f.name for f in fields(cls)}
        given = {key: value for key, value in options.items() if key in names}
        rest = {key: value for key, value in options.items() if key not in names}
        return (replace(settings, **given) if given else settings), rest

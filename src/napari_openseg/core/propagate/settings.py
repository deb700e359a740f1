"""Propagation's settings and their defaults, in one torch-free place.

The command line builds its parser from these defaults without importing torch; the widget, the
benchmarks and :func:`~napari_openseg.core.propagate.propagation.iter_propagate` read them from here. Each
default is explained (with the measurement that chose it) in docs/propagation.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from napari_openseg.core.engine_settings import ASPECTS, DEFAULT_ASPECT, DEFAULT_THRESHOLD, check_choice
from napari_openseg.errors import OpenSegError

#: Bank policies: the published rules and the benchmark's baselines (see core/propagate/memory.py).
POLICIES: tuple[str, ...] = ("self-sorting", "fifo", "admit-all", "prompt-only")
#: Steps along the slice axis that each direction takes from a prompt.
DIRECTIONS = {"both": (-1, 1), "forward": (1,), "backward": (-1,)}

DEFAULT_CAPACITY = 16
DEFAULT_FLOOR = 0.5
DEFAULT_TEMPERATURE = 0.05
DEFAULT_SHORT_TERM = 0
#: Support sets drawn from the long-term bank per slice and entries per set. On the hippocampus
#: validation subjects 2 x 8 gave the same Dice as 3 x 16 at 2.3 times the speed.
DEFAULT_DRAWS, DEFAULT_SUPPORT_SIZE = 2, 8
#: Slices less confident than this count towards stopping a front (0: off; docs/propagation.md).
DEFAULT_STOP_CONFIDENCE = 0.0
#: Slices less confident than this many times their front's first slice count towards stopping it.
#: Chosen among ratios and absolute thresholds on five groups of validation objects with the
#: default file ``openseg-propagate`` (docs/propagation.md, *Stop rules*).
DEFAULT_STOP_RATIO = 0.7
DEFAULT_STOP_AFTER = 2
DEFAULT_MIN_AREA = 0.02
#: A predicted area more than this many times the front's last accepted area counts towards
#: stopping (an object does not double from one slice to the next; a leak into its surroundings
#: does). ``inf`` switches it off.
DEFAULT_MAX_GROWTH = math.inf
#: When an object's pixel classifier joins its propagation (core/propagate/classifier.py): "auto"
#: where its half-split Dice on the painted slices reaches ``classifier_gate``.
PIXEL_CLASSIFIER_MODES: tuple[str, ...] = ("auto", "always", "never")
DEFAULT_PIXEL_CLASSIFIER = "auto"
DEFAULT_CLASSIFIER_GATE = 0.5
#: Where an object's classifier joins, a slice whose network and classifier masks agree with a Dice
#: below this is doubtful, in place of the confidence thresholds (0: off). The gate and this were
#: chosen together on the validation objects (docs/propagation.md, *The pixel classifier*).
DEFAULT_CLASSIFIER_STOP = 0.4


@dataclass(frozen=True)
class PropagationSettings:
    """Everything that decides how objects are carried through a volume, checked on creation.

    Parameters
    ----------
    bank_size, policy, floor, temperature
        The long-term memory of each object (:class:`~napari_openseg.core.propagate.memory.MemoryBank`):
        size M, rules, the confidence a prediction needs to enter it, retrieval temperature.
    short_term
        The short-term memory of each front: its last ``short_term`` accepted slices form a
        support set of their own (0: none, the long-term bank alone).
    draws, support_size
        Support sets drawn from the long-term bank per slice and entries per set (drawn with
        replacement, so it may exceed the bank's size).
    prompt_set
        Make the last of the ``draws`` sets the painted slice most similar to the slice being
        predicted (self-sorting and admit-all banks, ``draws`` > 1).
    stop_after, min_area, stop_confidence, stop_ratio, max_growth
        A front stops after ``stop_after`` consecutive slices where its object has vanished (less
        than ``min_area`` times its mean painted area) or is doubtful: its confidence is below
        ``stop_confidence``, or below ``stop_ratio`` times the confidence of the front's first
        slice, or its area is more than ``max_growth`` times the front's last accepted area. The
        doubtful slices of that final run are left empty. 0 switches either threshold off.
    direction
        ``"both"``, ``"forward"`` (towards higher slice indices) or ``"backward"`` from each prompt.
    unordered
        Treat the slices as an unordered stack of 2D images (one-prompt segmentation).
    pixel_classifier, classifier_gate
        Whether each object's pixel classifier, fitted to its painted slices, joins the network
        (the mean of the two probabilities): ``"auto"`` where it segments held-out halves of the
        painted slices with a Dice of at least ``classifier_gate``, ``"always"``, ``"never"``.
    classifier_stop
        Where the classifier joins, a slice is doubtful when the network's mask and the
        classifier's agree with a Dice below this; the confidence thresholds then do not apply to
        that object (0: off, the confidence rule for every object).
    threshold, aspect, seed
        Probability threshold of a mask, how slices are fitted to the model grid, the draws' seed.
    """

    bank_size: int = DEFAULT_CAPACITY
    policy: str = "self-sorting"
    short_term: int = DEFAULT_SHORT_TERM
    draws: int = DEFAULT_DRAWS
    support_size: int = DEFAULT_SUPPORT_SIZE
    floor: float = DEFAULT_FLOOR
    temperature: float = DEFAULT_TEMPERATURE
    prompt_set: bool = True
    stop_after: int = DEFAULT_STOP_AFTER
    min_area: float = DEFAULT_MIN_AREA
    stop_confidence: float = DEFAULT_STOP_CONFIDENCE
    stop_ratio: float = DEFAULT_STOP_RATIO
    max_growth: float = DEFAULT_MAX_GROWTH
    direction: str = "both"
    unordered: bool = False
    pixel_classifier: str = DEFAULT_PIXEL_CLASSIFIER
    classifier_gate: float = DEFAULT_CLASSIFIER_GATE
    classifier_stop: float = DEFAULT_CLASSIFIER_STOP
    threshold: float = DEFAULT_THRESHOLD
    aspect: str = DEFAULT_ASPECT
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bank_size < 1:
            raise OpenSegError(
                f"the memory bank needs room for at least one entry, got size {self.bank_size}"
            )
        if self.policy not in POLICIES:
            raise OpenSegError(f"unknown memory policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.short_term < 0:
            raise OpenSegError(f"the short-term memory holds 0 or more slices, got {self.short_term}")
        if self.draws < 1 or self.stop_after < 1 or self.support_size < 1:
            raise OpenSegError(
                f"draws, stop_after and support size must be >= 1, "
                f"got {self.draws}, {self.stop_after}, {self.support_size}"
            )
        if self.seed < 0:
            raise OpenSegError(f"the seed must be 0 or more, got {self.seed}")
        if self.direction not in DIRECTIONS:
            raise OpenSegError(f"direction must be one of {', '.join(DIRECTIONS)}, got {self.direction!r}")
        if (
            not 0.0 <= self.min_area < 1.0
            or not 0.0 <= self.threshold <= 1.0
            or not 0.0 <= self.stop_confidence <= 1.0
        ):
            raise OpenSegError(
                f"min_area must lie in [0, 1), threshold and stop_confidence in [0, 1], "
                f"got {self.min_area}, {self.threshold}, {self.stop_confidence}"
            )
        if not 0.0 <= self.stop_ratio < 1.0:
            raise OpenSegError(
                f"stop_ratio (of the confidence of a front's first slice) must lie in [0, 1), "
                f"got {self.stop_ratio}"
            )
        if not 0.0 <= self.floor <= 1.0:
            raise OpenSegError(f"the confidence floor must lie in [0, 1], got {self.floor}")
        if not self.temperature > 0:
            raise OpenSegError(f"the retrieval temperature must be > 0, got {self.temperature}")
        if not self.max_growth > 1.0:
            raise OpenSegError(f"max_growth must be > 1 (inf: off), got {self.max_growth}")
        check_choice("aspect", self.aspect, ASPECTS)
        check_choice("pixel_classifier", self.pixel_classifier, PIXEL_CLASSIFIER_MODES)
        if not 0.0 <= self.classifier_gate <= 1.0:
            raise OpenSegError(f"classifier_gate (a Dice) must lie in [0, 1], got {self.classifier_gate}")
        if not 0.0 <= self.classifier_stop < 1.0:
            raise OpenSegError(
                f"classifier_stop (a Dice; 0: off) must lie in [0, 1), got {self.classifier_stop}"
            )

    @classmethod
    def from_options(cls, **options) -> PropagationSettings:
        """Settings from keyword options, with a clear message for an unknown one."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise OpenSegError(
                f"unknown propagation option {unknown[0]!r}; known: {', '.join(sorted(known))}"
            )
        return cls(**options)

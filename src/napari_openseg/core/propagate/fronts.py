"""The order in which propagation visits slices.

Ordered volumes: from every painted slice of an object a *front* moves away, one slice at a time, in
each chosen direction. Between two painted slices whose fronts come towards each other, each slice
belongs to the nearer front that reaches it (a tie goes to the lower slice), so they meet half-way;
a front ends at a blocked slice (another painted slice, or a complete slice where the object is
absent), and the slices past that block go to the other front. All fronts advance together: every
front's first slice, then every front's second, and so on.

Each front has a short-term memory of the last slices it accepted and stops by a :class:`StopRule`.

Unordered stacks: each object in turn takes the remaining image most similar to an entry of its
memory bank.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field

import torch

from napari_openseg.core.propagate.memory import MemoryBank, ShortTermMemory
from napari_openseg.core.propagate.settings import DIRECTIONS, PropagationSettings

__all__ = ["DIRECTIONS", "Front", "StopRule", "make_fronts", "ordered_schedule", "similarity_schedule"]


@dataclass(frozen=True)
class StopRule:
    """How one predicted slice counts towards ending its front (see :class:`Front`).

    A slice is ``"vanished"`` when its object covers less than ``min_area`` times the painted area
    (and at least one pixel), ``"doubtful"`` when it is drawn but its confidence is below
    ``stop_confidence`` or below ``stop_ratio`` times ``first_confidence`` (that of the front's
    first slice; ``None`` while the first slice itself is judged), or its area is more than
    ``max_growth`` times the front's last accepted area, and ``"accepted"`` otherwise. Where the
    object's pixel classifier joins (``classifier_agreement`` given) and ``classifier_stop`` is on,
    the two confidence thresholds give way to it: the slice is doubtful when the network's and the
    classifier's masks agree with a Dice below ``classifier_stop``.
    """

    stop_after: int
    min_area: float
    stop_confidence: float
    max_growth: float
    stop_ratio: float = 0.0
    classifier_stop: float = 0.0

    @classmethod
    def of(cls, settings: PropagationSettings) -> StopRule:
        return cls(
            settings.stop_after,
            settings.min_area,
            settings.stop_confidence,
            settings.max_growth,
            settings.stop_ratio,
            settings.classifier_stop,
        )

    def by_agreement(self, classifier_agreement: float | None) -> bool:
        """Whether a slice with this agreement (None: no classifier joined) is judged by it."""
        return classifier_agreement is not None and self.classifier_stop > 0

    def judge(
        self,
        area: float,
        confidence: float,
        painted_area: float,
        last_area: float | None,
        first_confidence: float | None = None,
        classifier_agreement: float | None = None,
    ) -> str:
        if area < max(1.0, self.min_area * painted_area):
            return "vanished"
        if self.by_agreement(classifier_agreement):
            if classifier_agreement < self.classifier_stop:
                return "doubtful"
        else:
            relative = self.stop_ratio * (confidence if first_confidence is None else first_confidence)
            if confidence < max(self.stop_confidence, relative):
                return "doubtful"
        if last_area is not None and area > self.max_growth * last_area:
            return "doubtful"
        return "accepted"


@dataclass
class Front:
    """Slices one object's front visits, in order, and its current run of failing slices.

    ``failing_run`` counts the slices in a row, up to the last one visited, where the object vanished
    or was doubtful; ``doubtful`` holds the (slice, what was written) of the doubtful ones of that run,
    whose prediction was kept because only its confidence was low: if the front stops, they are undone.
    ``recent`` is the front's short-term memory and ``last_area`` the area of the last slice it
    accepted (the painted one to begin with); ``origin`` is the painted slice it starts from;
    ``first_confidence`` the confidence of the first slice it visited (what ``stop_ratio`` is of)."""

    label: int
    slices: list[int]
    failing_run: int = 0
    stopped: bool = False
    doubtful: list = field(default_factory=list)
    recent: ShortTermMemory = field(default_factory=lambda: ShortTermMemory(0))
    last_area: float | None = None
    origin: int | None = None
    first_confidence: float | None = None

    def observe(self, slice_index: int, vanished: bool, doubtful: bool, written, stop_after: int) -> None:
        """Count one visited slice towards the stop rule: ``stop_after`` vanished or doubtful slices
        in a row stop the front. ``written`` is what to undo for a doubtful slice if it stops."""
        if vanished or doubtful:
            self.failing_run += 1
            if doubtful:
                self.doubtful.append((slice_index, written))
        else:
            self.failing_run, self.doubtful = 0, []
        self.stopped = self.failing_run >= stop_after

    @property
    def stopped_on_confidence(self) -> bool:
        """Stopped with every slice of the final run drawn but none confident (none vanished)."""
        return self.stopped and len(self.doubtful) == self.failing_run


def make_fronts(
    label: int, pinned: list[int], blocked: set[int], n_slices: int, steps: tuple[int, ...]
) -> list[Front]:
    """A front per prompt slice and direction in ``steps`` (-1, +1); each slice goes to the nearer
    prompt; blocked slices end fronts."""
    fronts = []
    for k, start in enumerate(pinned):
        for step in steps:
            # The next prompt's front comes the other way only when both directions run.
            meets = 0 <= k + step < len(pinned) and -step in steps
            neighbour = pinned[k + step] if meets else None
            # the slices the neighbour's front reaches on its way here: a blocked slice between
            # leaves the ones beyond it to this front, however near the neighbour is
            contested = set()
            if neighbour is not None:
                r = neighbour - step
                while r != start and r not in blocked:
                    contested.add(r)
                    r -= step
            slices = []
            s = start + step
            while 0 <= s < n_slices and s not in blocked:
                if s in contested:
                    mine, theirs = abs(s - start), abs(neighbour - s)
                    if mine > theirs or (mine == theirs and step < 0):
                        break
                slices.append(s)
                s += step
            if slices:
                fronts.append(Front(label, slices, origin=start))
    return fronts


def ordered_schedule(fronts: list[Front]) -> Generator[tuple[Front, int], None, None]:
    """All fronts advance together: every front's 1st slice, then every front's 2nd, ..."""
    longest = max((len(f.slices) for f in fronts), default=0)
    for t in range(longest):
        for front in fronts:
            if t < len(front.slices) and not front.stopped:
                yield front, front.slices[t]


def similarity_schedule(
    remaining: dict[int, list[int]], banks: dict[int, MemoryBank], embeddings: torch.Tensor
) -> Generator[tuple[int, int], None, None]:
    """Unordered stacks: each object in turn takes the image most similar to an entry of its bank."""
    while any(remaining.values()):
        for label, left in remaining.items():
            if not left:
                continue
            similarity = embeddings[left] @ banks[label].embeddings().T
            yield label, left.pop(int(torch.argmax(similarity.max(dim=1).values)))

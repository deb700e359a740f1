"""What support cross-validation measures: the folds (:func:`assign_folds`), the pixels a held-out
entry is scored on (:class:`ScoredPixels`) and each task's estimated Dice per method
(:class:`Estimate`). :mod:`.stacking` runs the cross-validation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from napari_openseg.core.cuts import CENTRE
from napari_openseg.core.support import SupportEntry

#: Pixels a held-out entry is scored on (a weighted sample of each class past this; see :class:`ScoredPixels`).
MAX_SCORED_PIXELS = 16_384


@dataclass
class Estimate:
    """The cross-validated Dice of one task: per method ``(mean, std)`` over ``examples`` held-out
    entries, the ``method`` that runs, a ``note`` when there is something to know, and the ``cuts``
    of the tuned methods (the probability that :func:`~.cuts.recalibrate` makes 0.5)."""

    label: int
    method: str
    examples: int
    dice: dict[str, tuple[float, float]] = field(default_factory=dict)
    note: str = ""
    cuts: dict[str, float] = field(default_factory=dict)

    @property
    def expected(self) -> tuple[float, float] | None:
        """``(mean, std)`` of the method that runs, or ``None`` when it was not cross-validated."""
        return self.dice.get(self.method)

    def describe(self) -> str:
        """One line for people, e.g. "expected Dice 0.81 +/- 0.05 from 16 examples, method: stacked"."""
        if self.expected is None:
            text = f"no estimate ({self.examples} example{'s' if self.examples != 1 else ''}), method: {self.method}"
        else:
            mean, std = self.expected
            text = (
                f"expected Dice {mean:.2f} +/- {std:.2f} from {self.examples} examples, method: {self.method}"
            )
        return f"{text} ({self.note})" if self.note else text

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "method": self.method,
            "examples": self.examples,
            "expected_dice": None if self.expected is None else round(self.expected[0], 4),
            "expected_dice_std": None if self.expected is None else round(self.expected[1], 4),
            "per_method": {
                m: {"mean": round(d[0], 4), "std": round(d[1], 4), "cut": self.cuts.get(m, CENTRE)}
                for m, d in self.dice.items()
            },
            "note": self.note,
        }


def assign_folds(entries: Sequence[SupportEntry], folds: int, seed: int) -> np.ndarray:
    """Fold index of each entry (``min(folds, len(entries))`` folds, none empty), seeded.

    Whole source images go to one fold when there are at least as many sources as folds."""
    n = len(entries)
    k = min(folds, n)
    rng = np.random.default_rng(seed)
    sources = sorted({e.source for e in entries})
    if len(sources) >= k:
        sizes = {s: sum(e.source == s for e in entries) for s in sources}
        order = sorted(rng.permutation(len(sources)), key=lambda i: -sizes[sources[i]])  # largest first
        load, fold_of_source = np.zeros(k), {}
        for i in order:  # each source to the lightest fold: folds stay about equal
            lightest = int(np.argmin(load))
            fold_of_source[sources[i]] = lightest
            load[lightest] += sizes[sources[i]]
        return np.array([fold_of_source[e.source] for e in entries])
    return np.resize(np.arange(k), n)[rng.permutation(n)]


@dataclass
class ScoredPixels:
    """The pixels one held-out entry is scored on: flat ``index`` into its image (painted pixels
    only) and ``weight`` per pixel (how many pixels of its class each stands for)."""

    index: np.ndarray
    weight: np.ndarray

    @classmethod
    def of(cls, entry: SupportEntry, rng: np.random.Generator, limit: int) -> ScoredPixels:
        """Every painted pixel, or, past ``limit``, a seeded sample of each class (the rarer class
        whole up to half of ``limit``), weighted so that the Dice stays that of the whole entry."""
        known = np.arange(entry.mask.size) if entry.known is None else np.flatnonzero(entry.known.reshape(-1))
        if len(known) <= limit:
            return cls(known, np.ones(len(known)))
        positive = entry.mask.reshape(-1)[known]
        index, weight, budget = [], [], limit
        for rank, members in enumerate(sorted((known[positive], known[~positive]), key=len)):
            take = min(len(members), budget // (2 - rank))
            index.append(rng.choice(members, take, replace=False) if take < len(members) else members)
            weight.append(np.full(take, len(members) / max(take, 1)))
            budget -= take
        return cls(np.concatenate(index), np.concatenate(weight))

    def dice(self, probabilities: np.ndarray, mask: np.ndarray, threshold: float) -> float:
        """Weighted Dice of ``probabilities`` (the entry's whole map, or already at ``index``)."""
        values = probabilities.reshape(-1)
        predicted = (values[self.index] if values.size == mask.size else values) >= threshold
        truth = mask.reshape(-1)[self.index]
        overlap = float(self.weight[predicted & truth].sum())
        total = float(self.weight[predicted].sum() + self.weight[truth].sum())
        return 1.0 if total == 0 else 2.0 * overlap / total

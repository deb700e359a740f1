"""Tuned cuts: where a classifier's probabilities are cut, chosen on its held-out support entries.

A classifier fitted with balanced classes (:mod:`.pixel_classifier`) calls too much foreground for a
rare or thin structure at 0.5. :func:`best_cut` finds the threshold of
:data:`~napari_openseg.core.engine_settings.CUT_GRID` with the best cross-validated Dice, and
:func:`recalibrate` maps the probabilities so that it reads as :data:`CENTRE`: the user's threshold
keeps its meaning (lower draws more, higher less) around the tuned cut. :mod:`.stacking` tunes the
methods of :data:`~napari_openseg.core.engine_settings.TUNED_METHODS` from
:data:`~napari_openseg.core.engine_settings.MIN_CHOICE_ENTRIES` entries on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from napari_openseg.core.engine_settings import CUT_GRID

if TYPE_CHECKING:
    from napari_openseg.core.estimates import ScoredPixels

#: The probability that a tuned cut becomes (:func:`recalibrate`).
CENTRE = 0.5


def recalibrate(probabilities: np.ndarray, cut: float) -> np.ndarray:
    """``probabilities`` mapped piecewise linearly so that ``cut`` becomes :data:`CENTRE` (0 and 1
    stay, the order of pixels stays): a classifier's Dice-best cut, read with the usual threshold."""
    if cut == CENTRE:
        return probabilities
    p = np.asarray(probabilities, dtype=np.float32)
    below = p * (CENTRE / cut)
    above = CENTRE + (p - cut) * ((1 - CENTRE) / (1 - cut))
    return np.where(p < cut, below, above).astype(np.float32)


def best_cut(
    probabilities: Sequence[np.ndarray], masks: Sequence[np.ndarray], scored: Sequence[ScoredPixels]
) -> float:
    """The cut of :data:`CUT_GRID` with the highest mean Dice of held-out ``probabilities`` over the
    entries (their ``masks``, at their ``scored`` pixels); ties go to the cut nearest :data:`CENTRE`."""
    means = {
        cut: round(float(np.mean([s.dice(p, m, cut) for p, m, s in zip(probabilities, masks, scored)])), 6)
        for cut in CUT_GRID
    }
    return max(CUT_GRID, key=lambda cut: (means[cut], -abs(cut - CENTRE)))

"""Whole masks from strokes (core/fill.py): the random walk fills what the strokes enclose, where
intensity alone cannot tell the structure from its surroundings."""

import numpy as np
import pytest
from scipy import ndimage

from napari_openseg.core.fill import WALK_MAX_SIDE, filled, walk
from napari_openseg.core.metrics import dice_score
from napari_openseg.core.support import SupportEntry


def ringed_head(size: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An ellipse whose inside looks like its outside (same grey, same noise), drawn by a bright
    rim: a fetal head in ultrasound, in brief. Returns ``(image, inside)``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    radius = np.hypot((yy - 0.5) / 0.32, (xx - 0.5) / 0.4)
    inside = radius < 1.0
    image = 0.3 + 0.03 * rng.standard_normal((size, size))
    image[(radius >= 1.0) & (radius < 1.12)] = 0.9
    return ndimage.gaussian_filter(image, 0.7).clip(0, 1).astype(np.float32), inside


def stroke_entry(image: np.ndarray, inside: np.ndarray) -> SupportEntry:
    """A centre line through the structure, and a background stroke drawn around it, near the border."""
    h, w = inside.shape
    structure = np.zeros_like(inside)
    structure[h // 2, w // 3 : 2 * w // 3] = True
    background = np.zeros_like(inside)
    background[2:4, 2:-2] = background[-4:-2, 2:-2] = True
    background[2:-2, 2:4] = background[2:-2, -4:-2] = True
    return SupportEntry(image, structure, 1, known=structure | background)


def test_the_walk_fills_what_the_strokes_enclose_where_intensity_cannot():
    image, inside = ringed_head()
    entry = stroke_entry(image, inside)
    walked = walk(entry)
    assert walked.shape == image.shape and walked.dtype == np.float32
    assert 0.0 <= walked.min() and walked.max() <= 1.0
    blind = np.full(image.shape, 0.5, np.float32)  # a classifier that cannot tell inside from out
    mask = filled(entry, blind, walked)
    assert dice_score(mask, inside) > 0.9
    assert (mask[entry.known] == entry.mask[entry.known]).all()  # painted pixels as painted
    # Without the walk the same classifier fills everything: the test can fail.
    assert dice_score(filled(entry, blind, None), inside) < 0.7


def test_the_mean_follows_a_confident_classifier_over_an_unsure_walk():
    image, inside = ringed_head(seed=1)
    entry = stroke_entry(image, inside)
    sure = np.where(inside, 0.95, 0.05).astype(np.float32)
    unsure = np.full(image.shape, 0.6, np.float32)
    assert dice_score(filled(entry, sure, unsure), inside) > 0.99


def test_no_walk_without_strokes_of_both_kinds_or_for_whole_masks():
    image, inside = ringed_head()
    entry = stroke_entry(image, inside)
    only_structure = SupportEntry(image, entry.mask, 1, known=entry.mask.copy())
    assert walk(only_structure) is None
    assert walk(SupportEntry(image, inside, 1)) is None  # a whole mask needs no filling
    flat = SupportEntry(np.full(image.shape, 0.4, np.float32), entry.mask, 1, known=entry.known)
    assert walk(flat) is None  # no edge to follow


@pytest.mark.parametrize("size", [2 * WALK_MAX_SIDE + 40, 5 * WALK_MAX_SIDE])
def test_a_large_entry_is_walked_smaller_and_given_back_at_its_own_size(size):
    image, inside = ringed_head(size)
    entry = stroke_entry(image, inside)  # one-pixel strokes: they must survive the shrinking
    walked = walk(entry)
    assert walked.shape == (size, size)
    assert dice_score(walked >= 0.5, inside) > 0.9

"""Whole masks from strokes, for the network, which reads a support mask as the whole structure.

A stroke entry (:class:`~napari_openseg.core.support.SupportEntry` with ``known``) keeps its painted
pixels. Each unpainted pixel is called structure where the mean of two probabilities is at least 0.5:

* **A random walk** (:func:`walk`; Grady's random walker, scikit-image's ``random_walker``): the
  chance that a walk set off at the pixel meets a painted structure pixel before a painted background
  one, its steps weighted down across the image's edges. It fills what the strokes enclose and stops
  at boundaries. It needs strokes of both kinds; without them only the classifier fills.
* **A classifier's probability**: :mod:`.stacking` passes, in its folds, the pixel classifier of the
  same folds; for the final model, the better-estimated of the pixel and the stacked classifier, at
  its tuned cut.

Chosen on the val split's stroke tasks (``docs/evaluation.md``): the classifier alone filled fetal
heads from their centre lines poorly (it sees intensity, not the enclosing strokes), the walk alone
weakened the network on EM axons; the mean kept the best of both.
"""

from __future__ import annotations

import warnings

import numpy as np

from napari_openseg.core.support import SupportEntry

#: How strongly the walk avoids crossing an edge (scikit-image's ``beta``; its gradients are scaled
#: by the image's spread, so this does not depend on the intensity range).
WALK_BETA = 130.0
#: Entries larger than this on a side are walked at this size (the cost grows faster than the pixels:
#: about 0.1-0.3 s of one core at 256 x 256, about 2 s at 512 x 512).
WALK_MAX_SIDE = 256


def walk(entry: SupportEntry) -> np.ndarray | None:
    """The random walk's structure probability ``"H W"`` for a stroke entry, or ``None`` when it has
    no strokes of one kind (or a flat image, where no edge guides the walk)."""
    if entry.known is None:
        return None
    structure, background = entry.known & entry.mask, entry.known & ~entry.mask
    image = np.asarray(entry.image, np.float64)
    if not structure.any() or not background.any() or float(image.std()) < 1e-6:
        return None
    shape = image.shape
    scale = min(1.0, WALK_MAX_SIDE / max(shape))
    if scale < 1.0:
        image, structure, background = _shrink(image, structure, background, scale)
    seeds = np.zeros(image.shape, np.int32)
    seeds[background] = 2
    seeds[structure] = 1
    if not (seeds == 1).any() or not (seeds == 2).any():
        return None
    from skimage.segmentation import random_walker

    with warnings.catch_warnings():  # it warns when the solver's probabilities stray past [0, 1]
        warnings.simplefilter("ignore")
        found = random_walker(image, seeds, beta=WALK_BETA, mode="bf", return_full_prob=True)[0]
    found = np.clip(found, 0.0, 1.0)
    if found.shape != shape:
        from scipy import ndimage

        found = ndimage.zoom(found, (shape[0] / found.shape[0], shape[1] / found.shape[1]), order=1)
    return found.astype(np.float32)


def _shrink(image: np.ndarray, structure: np.ndarray, background: np.ndarray, scale: float):
    """The image smoothed and sampled at ``scale``; a pixel of the small grid is painted where any
    pixel it stands for was (so thin strokes survive), and unpainted where both kinds were."""
    from scipy import ndimage

    step = int(np.ceil(1.0 / scale))
    small = ndimage.zoom(ndimage.gaussian_filter(image, 0.5 * (step - 1)), scale, order=1)
    grid = np.array(small.shape) / np.array(image.shape)
    painted = [
        ndimage.zoom(ndimage.maximum_filter(m.astype(np.uint8), size=step), grid, order=0) > 0
        for m in (structure, background)
    ]
    return small, painted[0] & ~painted[1], painted[1] & ~painted[0]


def filled(entry: SupportEntry, probability: np.ndarray, walked: np.ndarray | None) -> np.ndarray:
    """The whole mask of a stroke entry: painted pixels as painted, the rest where the mean of the
    classifier's ``probability`` and the ``walked`` one (when there is one) is at least 0.5."""
    guess = probability if walked is None else 0.5 * (probability + walked)
    return np.where(entry.known, entry.mask, guess >= 0.5)

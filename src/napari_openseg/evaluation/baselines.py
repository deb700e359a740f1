"""The label prior, a baseline that needs no network and no classifier.

The mean of the support masks, placed on the model grid and mapped back to the query's shape exactly
as the network's output is, thresholded at 0.5. Strong where the structure sits at the same place in
every image (aligned crops), weak elsewhere. The other baseline, the pixel classifier, is one of the
engine's own methods (:mod:`napari_openseg.core.pixel_classifier`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from napari_openseg.core.preprocess import from_grid, masks_to_grid, to_grid
from napari_openseg.core.support import SupportEntry


def label_prior(support: Sequence[SupportEntry], query_shape: tuple[int, int], grid: int) -> np.ndarray:
    """Mean support mask for a query of ``query_shape``, ``"H W"`` float in [0, 1]."""
    masks = [masks_to_grid(torch.from_numpy(np.ascontiguousarray(e.mask))[None], grid) for e in support]
    mean = torch.cat(masks).mean(dim=0, keepdim=True)
    _, mapping = to_grid(torch.zeros(1, *query_shape), grid)
    return from_grid(mean, mapping)[0, 0].clamp(0, 1).numpy()

"""Baselines that need no trained network: the label prior and a classical pixel classifier.

* **Label prior**: the mean of the support masks, placed on the model grid and mapped back to the
  query's shape exactly as the network's output is, thresholded at 0.5. Strong where the structure
  sits at the same place in every image (aligned crops), weak elsewhere.
* **Pixel classifier**: what ilastik and napari's APOC plugin do for a few labelled examples. Every
  pixel gets its intensity and, at several Gaussian scales, the smoothed intensity, the gradient
  magnitude, the Laplacian of Gaussian and the two Hessian eigenvalues (scale-normalised); a random
  forest (scikit-learn) is fitted to a random subsample of the support entries' pixels and predicts
  each query pixel. It needs the ``eval`` extra (``pip install napari-openseg[eval]``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..core.preprocess import from_grid, masks_to_grid, to_grid
from ..core.support import SupportEntry
from ..errors import OpenSegError

#: Gaussian scales (pixels) of the pixel-classifier features; ilastik's defaults lie in this range.
FEATURE_SIGMAS = (0.7, 1.6, 3.5, 5.0)
#: Support pixels the forest is fitted to (a uniform random subsample keeps the class balance).
MAX_TRAINING_PIXELS = 10_000
FOREST_TREES = 50
FOREST_DEPTH = 12


def label_prior(support: Sequence[SupportEntry], query_shape: tuple[int, int], grid: int) -> np.ndarray:
    """Mean support mask for a query of ``query_shape``, ``"H W"`` float in [0, 1]."""
    masks = [masks_to_grid(torch.from_numpy(np.ascontiguousarray(e.mask))[None], grid) for e in support]
    mean = torch.cat(masks).mean(dim=0, keepdim=True)
    _, mapping = to_grid(torch.zeros(1, *query_shape), grid)
    return from_grid(mean, mapping)[0, 0].clamp(0, 1).numpy()


def pixel_features(image: np.ndarray, sigmas: Sequence[float] = FEATURE_SIGMAS) -> np.ndarray:
    """``"H W"`` image -> ``"H W F"`` features (F = 1 + 5 per scale), float32."""
    from scipy import ndimage

    image = np.asarray(image, dtype=np.float32)
    features = [image]
    for sigma in sigmas:
        features.append(ndimage.gaussian_filter(image, sigma))
        features.append(ndimage.gaussian_gradient_magnitude(image, sigma) * sigma)
        features.append(ndimage.gaussian_laplace(image, sigma) * sigma**2)
        hxx = ndimage.gaussian_filter(image, sigma, order=(0, 2))
        hyy = ndimage.gaussian_filter(image, sigma, order=(2, 0))
        hxy = ndimage.gaussian_filter(image, sigma, order=(1, 1))
        centre, radius = (hxx + hyy) / 2, np.sqrt(((hxx - hyy) / 2) ** 2 + hxy**2)
        features.extend([(centre + radius) * sigma**2, (centre - radius) * sigma**2])
    return np.stack(features, axis=-1).astype(np.float32)


def _forest(seed: int):
    try:
        from sklearn.ensemble import RandomForestClassifier
    except ImportError as err:
        raise OpenSegError(
            "the pixel-classifier baseline needs scikit-learn: pip install 'napari-openseg[eval]'"
        ) from err
    return RandomForestClassifier(n_estimators=FOREST_TREES, max_depth=FOREST_DEPTH, n_jobs=1, random_state=seed)


class PixelClassifier:
    """A random forest on :func:`pixel_features`, fitted to the pixels of a support set."""

    def __init__(self, support: Sequence[SupportEntry], seed: int = 0):
        rng = np.random.default_rng(seed)
        features = np.concatenate([pixel_features(e.image).reshape(-1, 1 + 5 * len(FEATURE_SIGMAS)) for e in support])
        labels = np.concatenate([e.mask.reshape(-1) for e in support])
        if len(labels) > MAX_TRAINING_PIXELS:
            pick = rng.choice(len(labels), MAX_TRAINING_PIXELS, replace=False)
            features, labels = features[pick], labels[pick]
        self.constant = None if labels.min() != labels.max() else float(labels[0])
        if self.constant is None:
            self.forest = _forest(seed).fit(features, labels)

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Foreground probability ``"H W"`` of a query image."""
        if self.constant is not None:
            return np.full(image.shape, self.constant, np.float32)
        features = pixel_features(image)
        proba = self.forest.predict_proba(features.reshape(-1, features.shape[-1]))
        column = list(self.forest.classes_).index(True)
        return proba[:, column].reshape(image.shape).astype(np.float32)

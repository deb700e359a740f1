"""The run-time pixel classifier: multi-scale filter features and a fast classifier fitted to the
painted pixels of a support set (what ilastik and napari's APOC plugin do for a few examples).

Features (:func:`pixel_features`): the intensity and, at each Gaussian scale of
:data:`FEATURE_SIGMAS`, the smoothed intensity, the gradient magnitude, the Laplacian of Gaussian and
the two Hessian eigenvalues (scale-normalised); where the image has colour, each colour channel's
value and its smoothed values at every scale. The stacked classifier of :mod:`.stacking` adds the
network's probability as one more column.

Classifier (:class:`PixelClassifier`): scikit-learn's histogram gradient boosting (``"boosting"``) or
random forest (``"forest"``), fitted to at most :data:`MAX_TRAINING_PIXELS` support pixels. With
``balance`` the two classes weigh the same in the fit: small structures are otherwise drowned by the
background (their weak signal was wiped out in the measurement of the engine issue); the rows are
resampled to equal counts (weighted binning in boosting is slow).

Prediction (:meth:`PixelClassifier.predict_map`): maps of more than :data:`EXACT_MAX_PIXELS` pixels
coarse to fine (:func:`coarse_to_fine`). Boosting's predict of every pixel was most of what
``method="auto"`` added to the network on 256 x 256 slices (0.196 s per slice and task on one
thread). Measured on 2026-12-07 (docs/performance.md, docs/evaluation.md): ``auto`` took 1.37 times
the network's CPU time on the 256 x 256 volume of ``bench_segment.py --volume`` (1.89 times
before); on the val split of the task bank no set's Dice moved by more than 0.01 point. Up to
:data:`EXACT_MAX_PIXELS` nothing changes (every pixel, as before).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from napari_openseg.errors import OpenSegError

#: Gaussian scales (pixels) of the features; ilastik's defaults lie in this range.
FEATURE_SIGMAS = (0.7, 1.6, 3.5, 5.0)
#: Support pixels one classifier is fitted to (a seeded sample of the painted pixels).
MAX_TRAINING_PIXELS = 10_000
CLASSIFIERS = ("boosting", "forest")
DEFAULT_CLASSIFIER = "boosting"
FOREST_TREES, FOREST_DEPTH = 50, 12
BOOSTING_ITERATIONS, BOOSTING_LEAVES = 60, 31
#: Feature maps are kept between uses (a task's entries, a propagation's slices) up to this size.
FEATURE_CACHE_BYTES = 256 * 1024**2
#: Maps of up to this many pixels are predicted at every pixel; larger ones coarse to fine.
EXACT_MAX_PIXELS = 128 * 128
#: Coarse to fine: a pixel is predicted exactly where the coarse probabilities around it span more
#: than this; elsewhere it takes their bilinear interpolation.
COARSE_SPREAD = 0.1


def feature_count(colour: bool = False) -> int:
    """Columns of :func:`pixel_features` for a grey (``colour=False``) or colour image."""
    return 1 + 5 * len(FEATURE_SIGMAS) + (3 * (1 + len(FEATURE_SIGMAS)) if colour else 0)


def pixel_features(image: np.ndarray, colour: np.ndarray | None = None) -> np.ndarray:
    """``image "H W"`` (and ``colour "H W 3"``, both normalised to [0, 1]) -> ``"H W F"`` float32,
    F = :func:`feature_count`."""
    from scipy import ndimage

    image = np.asarray(image, dtype=np.float32)
    features = [image]
    for sigma in FEATURE_SIGMAS:
        features.append(ndimage.gaussian_filter(image, sigma))
        features.append(ndimage.gaussian_gradient_magnitude(image, sigma) * sigma)
        features.append(ndimage.gaussian_laplace(image, sigma) * sigma**2)
        hxx = ndimage.gaussian_filter(image, sigma, order=(0, 2))
        hyy = ndimage.gaussian_filter(image, sigma, order=(2, 0))
        hxy = ndimage.gaussian_filter(image, sigma, order=(1, 1))
        centre, radius = (hxx + hyy) / 2, np.sqrt(((hxx - hyy) / 2) ** 2 + hxy**2)
        features.extend([(centre + radius) * sigma**2, (centre - radius) * sigma**2])
    if colour is not None:
        colour = np.asarray(colour, dtype=np.float32)
        if colour.shape != (*image.shape, 3):
            raise OpenSegError(
                f"colour channels of shape {colour.shape} do not match the image {image.shape}"
            )
        for channel in np.moveaxis(colour, -1, 0):
            features.append(channel)
            features.extend(ndimage.gaussian_filter(channel, sigma) for sigma in FEATURE_SIGMAS)
    return np.stack(features, axis=-1).astype(np.float32, copy=False)


def sample_pixels(
    labels: Sequence[np.ndarray],
    known: Sequence[np.ndarray | None],
    rng: np.random.Generator,
    limit: int = MAX_TRAINING_PIXELS,
) -> list[np.ndarray]:
    """Flat indices of the pixels to fit to, per image: a seeded sample of at most ``limit`` known
    pixels in all, taking the rarer class whole when it has fewer than half of ``limit``.

    ``labels`` are ``"H W"`` bool masks; ``known`` the painted pixels of each (``None``: all).
    """
    flat = [
        np.flatnonzero(k.reshape(-1)) if k is not None else np.arange(m.size) for m, k in zip(labels, known)
    ]
    owner = np.concatenate([np.full(len(f), i) for i, f in enumerate(flat)])
    index = np.concatenate(flat)
    positive = np.concatenate([m.reshape(-1)[f] for m, f in zip(labels, flat)])
    picked = []
    budget = limit
    by_size = sorted((np.flatnonzero(positive == c) for c in (True, False)), key=len)
    for rank, members in enumerate(by_size):
        take = min(len(members), budget // (2 - rank))
        picked.append(rng.choice(members, take, replace=False) if take < len(members) else members)
        budget -= take
    chosen = np.sort(np.concatenate(picked))
    return [index[chosen[owner[chosen] == i]] for i in range(len(labels))]


def _classifier(kind: str, seed: int):
    try:
        from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
    except ImportError as err:  # a dependency since the engine: only a broken installation lacks it
        raise OpenSegError("the pixel classifier needs scikit-learn: pip install scikit-learn") from err
    if kind == "forest":
        return RandomForestClassifier(
            n_estimators=FOREST_TREES, max_depth=FOREST_DEPTH, n_jobs=1, random_state=seed
        )
    if kind == "boosting":
        return HistGradientBoostingClassifier(
            max_iter=BOOSTING_ITERATIONS,
            max_leaf_nodes=BOOSTING_LEAVES,
            early_stopping=False,
            random_state=seed,
        )
    raise OpenSegError(f"classifier must be one of {', '.join(CLASSIFIERS)}, got {kind!r}")


def _thread_limit():
    """The classifier runs on one thread (OpenMP): its fits are small, and with a thread per core it
    spun against torch and other work (boosting measured 20 times slower on a busy machine)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


class PixelClassifier:
    """A binary classifier of pixels from their feature rows ``"N F"``."""

    def __init__(self, kind: str = DEFAULT_CLASSIFIER, balance: bool = True, seed: int = 0):
        self.model = _classifier(kind, seed)
        self.kind, self.balance, self.seed = kind, balance, seed
        self.constant: float | None = None

    def fit(self, features: np.ndarray, labels: np.ndarray) -> PixelClassifier:
        """Fit to ``features "N F"`` and bool ``labels "N"``; one class only gives a constant."""
        labels = np.asarray(labels, bool)
        if len(labels) == 0:
            raise OpenSegError("no painted pixel to fit the pixel classifier to")
        if labels.all() or not labels.any():
            self.constant = float(labels[0])
            return self
        if self.balance:  # resampled, not weighted: weighted binning is slow in boosting
            rng = np.random.default_rng(self.seed)
            half = len(labels) // 2
            rows = np.concatenate(
                [
                    rng.choice(np.flatnonzero(labels == c), half, replace=bool((labels == c).sum() < half))
                    for c in (False, True)
                ]
            )
            features, labels = features[rows], labels[rows]
        with _thread_limit():
            self.model.fit(features, labels)
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Foreground probability of each row of ``features "N F"`` (float32)."""
        if self.constant is not None:
            return np.full(len(features), self.constant, np.float32)
        column = list(self.model.classes_).index(True)
        with _thread_limit():
            return self.model.predict_proba(features)[:, column].astype(np.float32)

    def predict_map(self, features: np.ndarray) -> np.ndarray:
        """``"... H W F"`` features -> ``"... H W"`` probabilities; maps of more than
        :data:`EXACT_MAX_PIXELS` pixels coarse to fine (:func:`coarse_to_fine`)."""
        height, width, columns = features.shape[-3:]
        if height * width <= EXACT_MAX_PIXELS or self.constant is not None:
            return self.predict(features.reshape(-1, columns)).reshape(features.shape[:-1])
        maps = features.reshape(-1, height, width, columns)
        out = np.stack([coarse_to_fine(self.predict, m) for m in maps])
        return out.reshape(features.shape[:-1])


def _grid(length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every other index of ``length`` and the last one; per index of ``length`` the two grid
    points around it (positions in the grid) and the weight of the second."""
    grid = np.unique(np.append(np.arange(0, length, 2), length - 1))
    index = np.arange(length)
    low = np.clip(np.searchsorted(grid, index, side="right") - 1, 0, len(grid) - 1)
    high = np.minimum(low + 1, len(grid) - 1)
    span = np.maximum(grid[high] - grid[low], 1)
    return grid, low, high, ((index - grid[low]) / span).astype(np.float32)


def coarse_to_fine(predict, features: np.ndarray) -> np.ndarray:
    """``predict`` (rows ``"N F"`` -> ``"N"``) on ``features "H W F"``, coarse to fine: exact on
    every other row and column (and the last), bilinear between them, and exact again wherever the
    coarse probabilities of the surrounding 4 x 4 grid points span more than :data:`COARSE_SPREAD`
    (edges, thin or noisy structures). Returns ``"H W"`` float32.
    """
    from scipy import ndimage

    height, width, columns = features.shape
    rows, top, bottom, down = _grid(height)
    cols, left, right, across = _grid(width)
    coarse = predict(features[np.ix_(rows, cols)].reshape(-1, columns)).reshape(len(rows), len(cols))
    spread = ndimage.maximum_filter(coarse, 3, mode="nearest") - ndimage.minimum_filter(
        coarse, 3, mode="nearest"
    )
    down, across = down[:, None], across[None, :]
    corners = [
        (top, left, (1 - down) * (1 - across)),
        (top, right, (1 - down) * across),
        (bottom, left, down * (1 - across)),
        (bottom, right, down * across),
    ]
    out = sum(coarse[np.ix_(y, x)] * weight for y, x, weight in corners).astype(np.float32)
    unsure = np.maximum.reduce([spread[np.ix_(y, x)] for y, x, _ in corners]) > COARSE_SPREAD
    unsure[np.ix_(rows, cols)] = False  # the grid is exact already
    out[np.ix_(rows, cols)] = coarse
    if unsure.any():
        out[unsure] = predict(features[unsure])
    return out

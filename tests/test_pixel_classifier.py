"""The pixel classifier's coarse-to-fine prediction of large maps: exact wherever it predicts, close
to the full prediction elsewhere, off up to ``EXACT_MAX_PIXELS``, shapes kept."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_openseg.core import pixel_classifier
from napari_openseg.core.metrics import dice_score
from napari_openseg.core.pixel_classifier import (
    COARSE_SPREAD,
    EXACT_MAX_PIXELS,
    PixelClassifier,
    coarse_to_fine,
    pixel_features,
)

pytest.importorskip("sklearn")


def discs(shape, seed=0, count=5):
    """A probability map of a few discs with soft edges (about 2 pixels wide), flat elsewhere."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inside = np.full(shape, -np.inf)
    for _ in range(count):
        radius = rng.uniform(8, 30)
        distance = np.hypot(yy - rng.uniform(0, shape[0]), xx - rng.uniform(0, shape[1]))
        inside = np.maximum(inside, radius - distance)
    return (1 / (1 + np.exp(-inside / 0.7))).astype(np.float32)


class Lookup:
    """A "classifier" whose first feature is the flat pixel index: it answers ``truth`` there and
    records every row it was asked for."""

    def __init__(self, truth: np.ndarray):
        self.shape, self.truth, self.asked = truth.shape, truth.reshape(-1), []

    def features(self) -> np.ndarray:
        """``"H W 2"``: the flat index and a constant column."""
        index = np.arange(self.truth.size, dtype=np.float32).reshape(*self.shape, 1)
        return np.concatenate([index, np.zeros_like(index)], axis=-1)

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        index = rows[:, 0].astype(int)
        self.asked.append(index)
        return self.truth[index]


@pytest.mark.parametrize("shape", [(256, 256), (201, 150), (160, 97)])
def test_coarse_to_fine_is_exact_where_it_predicts_and_close_elsewhere(shape):
    truth = discs(shape)
    predictor = Lookup(truth)
    out = coarse_to_fine(predictor, predictor.features())
    assert out.shape == shape and out.dtype == np.float32
    asked = np.concatenate(predictor.asked)
    assert len(np.unique(asked)) == len(asked)  # no pixel predicted twice
    assert np.array_equal(out.reshape(-1)[asked], truth.reshape(-1)[asked])
    grid = np.zeros(shape, bool)
    grid[::2, ::2] = grid[-1, ::2] = grid[::2, -1] = grid[-1, -1] = True
    assert np.isin(np.flatnonzero(grid), asked).all()  # every other row and column, and the last
    assert len(asked) < 0.6 * truth.size  # it saves predictions
    assert np.abs(out - truth).max() <= COARSE_SPREAD
    assert ((out >= 0.5) != (truth >= 0.5)).mean() < 1e-3


def test_coarse_to_fine_predicts_every_pixel_of_a_noisy_map():
    truth = np.random.default_rng(1).random((180, 180)).astype(np.float32)
    predictor = Lookup(truth)
    assert np.array_equal(coarse_to_fine(predictor, predictor.features()), truth)
    assert len(np.concatenate(predictor.asked)) == truth.size


def blobs(seed: int, size: int):
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(size, size)), 8)
    mask = field > np.quantile(field, 0.8)
    image = ndimage.gaussian_filter(mask + rng.normal(0, 0.3, mask.shape), 1.0)
    return ((image - image.min()) / np.ptp(image)).astype(np.float32), mask


@pytest.fixture(scope="module")
def classifier():
    image, mask = blobs(0, 128)
    features = pixel_features(image)
    return PixelClassifier(seed=0).fit(features.reshape(-1, features.shape[-1]), mask.reshape(-1))


def test_predict_map_of_a_small_map_predicts_every_pixel(classifier, monkeypatch):
    image, _ = blobs(1, 128)
    assert image.size <= EXACT_MAX_PIXELS
    features = np.stack([pixel_features(image), pixel_features(image[::-1])])
    rows = []
    predict = classifier.predict
    monkeypatch.setattr(classifier, "predict", lambda x: rows.append(len(x)) or predict(x))
    out = classifier.predict_map(features)
    assert out.shape == (2, 128, 128) and rows == [2 * image.size]
    assert np.array_equal(out, predict(features.reshape(-1, features.shape[-1])).reshape(2, 128, 128))


def test_predict_map_of_a_large_map_matches_the_full_prediction(classifier):
    image, mask = blobs(2, 256)
    features = pixel_features(image)[None]
    full = classifier.predict(features.reshape(-1, features.shape[-1])).reshape(1, 256, 256)
    out = classifier.predict_map(features)
    assert out.shape == (1, 256, 256)
    assert ((out >= 0.5) != (full >= 0.5)).mean() < 1e-3

    assert abs(dice_score(out[0] >= 0.5, mask) - dice_score(full[0] >= 0.5, mask)) < 1e-3


def test_the_size_limit_decides_between_exact_and_coarse_to_fine(classifier, monkeypatch):
    image, _ = blobs(3, 96)
    features = pixel_features(image)
    monkeypatch.setattr(pixel_classifier, "EXACT_MAX_PIXELS", 64 * 64)
    calls = []

    def every_pixel(predict, maps):
        calls.append(maps.shape)
        return predict(maps.reshape(-1, maps.shape[-1])).reshape(maps.shape[:-1])

    monkeypatch.setattr(pixel_classifier, "coarse_to_fine", every_pixel)
    assert classifier.predict_map(features[None]).shape == (1, 96, 96)
    assert calls == [(96, 96, features.shape[-1])]

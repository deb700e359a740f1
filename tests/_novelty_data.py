"""A tiny synthetic labelled volume and tiny training settings shared by the novelty tests."""

from __future__ import annotations

import numpy as np

SHAPE = (32, 32, 64)


def sphere_volume(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(image, labels)``: a ball (label 1) with a core (label 2) and a bright unlabelled blob."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    radius = (zz - 16) ** 2 + (yy - 16) ** 2 + (xx - 24) ** 2
    labels = np.zeros(SHAPE, np.uint8)
    labels[radius < 12**2] = 1
    labels[radius < 5**2] = 2
    image = labels * 0.3 + rng.normal(0, 0.03, SHAPE)
    blob = (zz - 16) ** 2 + (yy - 16) ** 2 + (xx - 52) ** 2 < 5**2
    image[blob] = 1.0  # never labelled: the "unseen" structure
    return image.astype(np.float32), labels


def tiny_settings(**overrides):
    from napari_openseg.training.novelty.train import NoveltyTrainSettings

    values = dict(
        epochs=2,
        samples_per_volume=1,
        batch_size=1,
        roi_size=SHAPE,
        embedding_dim=8,
        downsample=1,
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 1, 1),
        learning_rate=1e-3,
    )
    values.update(overrides)
    return NoveltyTrainSettings(**values)

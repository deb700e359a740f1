"""Overlap measures used by the CLI, the evaluation and the benchmarks."""

from __future__ import annotations

import numpy as np


def dice_score(prediction: np.ndarray, truth: np.ndarray, empty: float = 1.0) -> float:
    """Dice of two binary masks; ``empty`` is returned when both are empty."""
    prediction = np.asarray(prediction, bool)
    truth = np.asarray(truth, bool)
    if prediction.shape != truth.shape:
        raise ValueError(f"masks differ in shape: {prediction.shape} vs {truth.shape}")
    total = int(prediction.sum()) + int(truth.sum())
    if total == 0:
        return float(empty)
    return 2.0 * float(np.logical_and(prediction, truth).sum()) / total


def dice_per_label(prediction: np.ndarray, truth: np.ndarray, label_values) -> dict[int, float]:
    """Dice of each label value between two label maps."""
    return {int(v): dice_score(prediction == v, truth == v) for v in label_values}

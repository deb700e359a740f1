"""The bundled sample volume (MNI152 2009a, 2 mm, grey/white-matter labels; see sample_data/)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_openseg.io import ImageData, read_image

SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data"
SAMPLE_IMAGE = SAMPLE_DIR / "mni152_2mm_t1.nii.gz"
SAMPLE_LABELS = SAMPLE_DIR / "mni152_2mm_gm_wm_labels.nii.gz"
SAMPLE_LABEL_NAMES = {1: "grey matter", 2: "white matter"}


def load_sample() -> tuple[ImageData, ImageData]:
    """(T1 image, labels) of the bundled sample, in napari_openseg.io's array order (z, y, x)."""
    return read_image(SAMPLE_IMAGE), read_image(SAMPLE_LABELS)


def evenly_spaced_slices(labels: np.ndarray, axis: int, count: int) -> np.ndarray:
    """``count`` evenly spaced slice indices along ``axis`` strictly inside the labelled range: the
    slices a user who painted a few of them would pick (the demo's support)."""
    inside = np.flatnonzero(np.moveaxis(labels, axis, 0).reshape(labels.shape[axis], -1).any(axis=1))
    return np.unique(np.linspace(inside[0], inside[-1], count + 2).round().astype(int)[1:-1])

"""The bundled sample volume (MNI152 2009a, 2 mm, grey/white-matter labels; see sample_data/)."""

from __future__ import annotations

from pathlib import Path

from .io import ImageData, read_image

SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data"
SAMPLE_IMAGE = SAMPLE_DIR / "mni152_2mm_t1.nii.gz"
SAMPLE_LABELS = SAMPLE_DIR / "mni152_2mm_gm_wm_labels.nii.gz"
SAMPLE_LABEL_NAMES = {1: "grey matter", 2: "white matter"}


def load_sample() -> tuple[ImageData, ImageData]:
    """(T1 image, labels) of the bundled sample, in napari_openseg.io's array order (z, y, x)."""
    return read_image(SAMPLE_IMAGE), read_image(SAMPLE_LABELS)

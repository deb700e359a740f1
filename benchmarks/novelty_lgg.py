"""The LGG protocol of ``bench_novelty.py``: flag a brain tumour that nobody labelled.

Data: ``../shared/data/lgg_flair_volumes`` (50 FLAIR volumes, array order z, y, x = slices, 256, 256;
label 1 = the FLAIR abnormality, the tumour). Research licence: evaluation only.

* **Split**: the task bank's (:mod:`napari_openseg.training.taskbank`), a stable hash of the case id:
  ``sha256("lgg_flair_volumes:<case>")`` mapped to [0, 1), below 0.7 train, below 0.85 val, else test
  (33 / 6 / 11 patients).
* **Inside the head**: :func:`~napari_openseg.core.novelty.model.body_mask` of the volume.
* **What the user painted** (healthy tissue only; the tumour is never labelled): 1 = *scalp and
  skull*, head voxels within :data:`RING_PX` pixels of the head's outline in their slice; 2 = *inside
  the skull*, the deeper head voxels; 0 = background. The training-free option's support set holds
  :data:`SUPPORT_SLICES` tumour-free slices of every training patient painted this way (a support
  mask marks a class on the whole slice, so only slices without tumour can be painted); the trained
  network learns the same classes on every voxel of the training patients except the tumour grown
  by :data:`MARGIN_PX` pixels, which takes part in no loss.
* **Score**: per patient, AUROC of tumour voxels against the other voxels inside the head, at the
  volume's full resolution; mean over the patients of a split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DATASET = "lgg_flair_volumes"
RING_PX = 15
MARGIN_PX = 3
SUPPORT_SLICES = 4
IGNORED = 255
CLASS_NAMES = {1: "scalp and skull", 2: "inside the skull"}


def split_of(case: str) -> str:
    """``"train"``, ``"val"`` or ``"test"``: the task bank's split of this patient."""
    from napari_openseg.training.taskbank import load_manifest

    return load_manifest()[DATASET].split_of(case)


def cases(data_dir: Path, split: str | None = None) -> list[str]:
    folder = data_dir / DATASET / "imagesTr"
    found = sorted(p.name[: -len(".nii.gz")] for p in folder.glob("*.nii.gz"))
    return [c for c in found if split is None or split_of(c) == split]


def load_case(data_dir: Path, case: str) -> dict:
    """Image, tumour mask, head mask and the painted healthy classes of one patient."""
    from napari_openseg.core.novelty.model import body_mask
    from napari_openseg.core.preprocess import normalize_intensity
    from napari_openseg.io import read_image

    folder = data_dir / DATASET
    image = read_image(folder / "imagesTr" / f"{case}.nii.gz")
    tumour = read_image(folder / "labelsTr" / f"{case}.nii.gz").data > 0
    head = body_mask(normalize_intensity(image.data), normalized=True)
    return {"case": case, "image": image, "tumour": tumour, "head": head, "painted": paint(head)}


def paint(head: np.ndarray) -> np.ndarray:
    """Healthy classes on every slice: 1 within RING_PX of the head's outline, 2 deeper, 0 outside."""
    from scipy import ndimage

    labels = np.zeros(head.shape, np.uint8)
    for z in range(head.shape[0]):
        if head[z].any():
            depth = ndimage.distance_transform_edt(head[z])
            labels[z][head[z]] = 1
            labels[z][depth > RING_PX] = 2
    return labels


def training_labels(case: dict) -> np.ndarray:
    """The painted classes with the tumour (grown by MARGIN_PX) left out of every loss."""
    from scipy import ndimage

    grown = ndimage.binary_dilation(case["tumour"], np.ones((1, 3, 3), bool), iterations=MARGIN_PX)
    return np.where(grown, IGNORED, case["painted"]).astype(np.uint8)


def tumour_free_slices(case: dict, count: int = SUPPORT_SLICES) -> list[int]:
    """Up to ``count`` evenly spaced slices with head and without tumour."""
    free = np.flatnonzero(~case["tumour"].any(axis=(1, 2)) & case["head"].any(axis=(1, 2)))
    if len(free) > count:
        free = free[np.round(np.linspace(0, len(free) - 1, count)).astype(int)]
    return [int(z) for z in free]


def support_labels(case: dict) -> np.ndarray:
    """The painted classes on the tumour-free support slices only (0 elsewhere)."""
    labels = np.zeros_like(case["painted"])
    for z in tumour_free_slices(case):
        labels[z] = case["painted"][z]
    return labels


def truth(case: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(positive, negative)``: tumour voxels inside the head, and the other voxels inside the head."""
    head = case["head"]
    return case["tumour"] & head, head & ~case["tumour"]

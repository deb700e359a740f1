"""The data protocol of ``bench_novelty.py``: which structures are known, unseen or left out.

Volume: ``../shared/data/voxelmorph_test_scan`` (one T1 brain MRI, 160x192x224, 45 FreeSurfer
structures; array order z, y, x = 224, 192, 160). The two hemispheres are split at x = 80 (the
midline): the network trains on the LEFT hemisphere (x >= 80) and is evaluated on the RIGHT one
(x < 80), so no evaluated voxel was ever trained on.

* known classes (merged left/right): 1 cerebral white matter, 2 cerebral cortex, 3 lateral ventricle,
  4 cerebellum white matter, 5 cerebellum cortex, 6 brainstem;
* unseen structures (never in any loss): the deep grey nuclei: thalamus, caudate, putamen, pallidum,
  hippocampus, amygdala;
* everything else (small ventricles, CSF, accumbens, ventral DC, vessels, choroid plexus, corpus
  callosum, hypointensities) is left out of training and of the evaluation;
* the one-shot unknown seed is the LEFT putamen (training half), never a test voxel.

AUROC: positives = unseen voxels of the right hemisphere, negatives = known-structure voxels of the
right hemisphere (both inside the brain, i.e. "inside the body").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

KNOWN = {
    1: ("cerebral white matter", (2, 41)),
    2: ("cerebral cortex", (3, 42)),
    3: ("lateral ventricle", (4, 43)),
    4: ("cerebellum white matter", (7, 46)),
    5: ("cerebellum cortex", (8, 47)),
    6: ("brainstem", (16,)),
}
UNSEEN = {
    "thalamus": (10, 49),
    "caudate": (11, 50),
    "putamen": (12, 51),
    "pallidum": (13, 52),
    "hippocampus": (17, 53),
    "amygdala": (18, 54),
}
SEED_LABEL = 12  # left putamen
MIDLINE_X = 80
#: Value of voxels that take part in no loss (unseen and left-out structures).
IGNORED = 255


def load_case(data_dir: Path) -> dict:
    """Image, FreeSurfer labels and the protocol's derived maps, in the io module's (z, y, x) order."""
    from napari_openseg.io import read_image

    folder = data_dir / "voxelmorph_test_scan"
    image = read_image(folder / "vol_uint8.nii.gz")
    freesurfer = read_image(folder / "seg_freesurfer_labels.nii.gz").data
    known = np.zeros(freesurfer.shape, np.uint8)
    for value, (_, sources) in KNOWN.items():
        known[np.isin(freesurfer, sources)] = value
    unseen = np.isin(freesurfer, [v for pair in UNSEEN.values() for v in pair])
    train_labels = np.where((freesurfer > 0) & (known == 0), IGNORED, known).astype(np.uint8)
    return {
        "image": image,
        "freesurfer": freesurfer,
        "known": known,
        "unseen": unseen,
        "train_labels": train_labels,
        "seed": freesurfer == SEED_LABEL,
    }


def train_half(array: np.ndarray) -> np.ndarray:
    return array[..., MIDLINE_X:]


def test_half(array: np.ndarray) -> np.ndarray:
    return array[..., :MIDLINE_X]

"""Subject splits of the development data in ``../shared/data``: fixed, documented, reproducible.

Hippocampus (MSD Task04, 130 subjects): subjects are sorted by id and shuffled with a fixed seed,
then cut 70 % train / 15 % validation / 15 % test. The test split is never trained on. The
single-subject brain volumes cannot be split by subject; see ``docs/model-card.md`` for how they are
used.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

SPLIT_SEED = 20261122
FRACTIONS = {"train": 0.70, "val": 0.15}


def shared_data_dir() -> Path | None:
    """``$OPENSEG_SHARED_DATA`` or ``../shared/data`` beside the repository, if it exists."""
    custom = os.environ.get("OPENSEG_SHARED_DATA")
    candidates = [Path(custom)] if custom else []
    repo = Path(__file__).resolve().parents[3]
    candidates += [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return None


def split_subjects(subjects: list[str], seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """Deterministic train / val / test split of subject ids (sorted within each split)."""
    ordered = sorted(subjects)
    order = np.random.default_rng(seed).permutation(len(ordered))
    n_train = int(round(FRACTIONS["train"] * len(ordered)))
    n_val = int(round(FRACTIONS["val"] * len(ordered)))
    picked = [ordered[i] for i in order]
    return {
        "train": sorted(picked[:n_train]),
        "val": sorted(picked[n_train : n_train + n_val]),
        "test": sorted(picked[n_train + n_val :]),
    }


def hippocampus_splits(data_dir: Path | None = None) -> dict[str, list[str]]:
    """Split of the hippocampus subject ids (``hippocampus_001`` ...) present in the data folder."""
    data_dir = data_dir or shared_data_dir()
    if data_dir is None:
        raise FileNotFoundError("../shared/data is not present")
    images = data_dir / "msd_task04_hippocampus" / "imagesTr"
    subjects = [p.name[: -len(".nii.gz")] for p in images.glob("hippocampus_*.nii.gz")]
    return split_subjects(subjects)

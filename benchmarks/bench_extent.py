"""Object extent in ``segment``: how many slices each task is drawn on, and its 3D Dice, with every
slice segmented (``extent="all"``), with the painted range plus a margin (the Segment widget's
default range), and with ``extent="auto"`` under several stop rules.

Protocol (needs ../shared/data). Each structure is painted (its true mask) on three slices along
axis 0: the slices at 25 %, 50 % and 75 % of its true extent. One support set holds every painted
slice of every structure; the volume is segmented once with every slice (``extent="all"``), and the
auto extent's stop rules are then applied by the same code ``iter_segment`` runs
(:class:`~napari_openseg.core.extent.ExtentTracker` on the same probabilities), so each row is
exactly what ``segment(..., extent="auto", ...)`` with that rule returns.

Data: ``--split val`` (choices): eight structures of the VoxelMorph scan (lateral ventricle,
pallidum, amygdala, ventral diencephalon, left and right; FreeSurfer labels); ``--split test`` (the
table): the Colin27 deep grey structures of the AAL atlas (caudate, putamen, pallidum, thalamus, left
and right; labels 71-78). Weights: both bundled files by default (``--weights``).

Run: ``nice -n 10 python benchmarks/bench_extent.py [--split test] [--threads 1] [--weights W ...]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from napari_openseg.core.extent import (
    EXTENT_MIN_AREA,
    EXTENT_RELATIVE,
    EXTENT_STOP_AFTER,
    EXTENT_STOP_CONFIDENCE,
    ExtentTracker,
    painted_slices,
)
from napari_openseg.core.inference import segment
from napari_openseg.core.metrics import dice_score
from napari_openseg.core.preprocess import normalize_intensity
from napari_openseg.core.support import build_support_set
from napari_openseg.io import read_image
from napari_openseg.model.registry import load_model
from napari_openseg.training.splits import shared_data_dir

BUNDLED = ("openseg-default", "openseg-propagate")
DATA = {
    "val": (
        "voxelmorph_test_scan/vol_uint8.nii.gz",
        "voxelmorph_test_scan/seg_freesurfer_labels.nii.gz",
        (4, 43, 13, 52, 18, 54, 28, 60),
    ),
    "test": ("colin27_aal_mricron/ch2.nii.gz", "colin27_aal_mricron/aal.nii.gz", tuple(range(71, 79))),
}
#: Margins (fractions of the painted range's length) added on each side of it.
MARGINS = (0.0, 0.25, 0.5)
#: Stop rules replayed: (stop confidence, relative to the painted slices' confidence, stop after).
RULES = (
    [(c, False, 2) for c in (0.8, 0.84, 0.86, 0.88)]
    + [(f, True, 2) for f in (0.94, 0.96, 0.97, 0.98)]
    + [(0.97, True, 1), (0.97, True, 3)]
)


def paint(labels: np.ndarray, values) -> np.ndarray:
    """Each structure's true mask on the slices at 25, 50 and 75 % of its extent along axis 0."""
    painted = np.zeros(labels.shape, np.uint8)
    for value in values:
        truth = labels == value
        present = np.flatnonzero(truth.reshape(truth.shape[0], -1).any(axis=1))
        for q in (0.25, 0.5, 0.75):
            z = int(present[int(round(q * (len(present) - 1)))])
            painted[z][truth[z]] = value
    return painted


def score(kept: np.ndarray, labels: np.ndarray, values) -> tuple[float, float, list[float]]:
    """Mean 3D Dice, the largest drawn/true slice-count ratio, and the per-task Dice."""
    dice, ratios = [], []
    for value in values:
        truth, drawn = labels == value, kept == value
        dice.append(dice_score(drawn, truth))
        ratios.append(
            drawn.reshape(drawn.shape[0], -1).any(axis=1).sum()
            / truth.reshape(truth.shape[0], -1).any(axis=1).sum()
        )
    return float(np.mean(dice)), float(np.max(ratios)), dice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--weights", nargs="+", default=list(BUNDLED))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if shared_data_dir() is None:
        raise SystemExit("../shared/data is not present")
    torch.set_num_threads(args.threads)
    image_path, labels_path, values = DATA[args.split]
    image = read_image(shared_data_dir() / image_path).data
    labels = read_image(shared_data_dir() / labels_path).data
    painted = paint(labels, values)
    support = build_support_set(image, painted)
    seeds = painted_slices(support, values, normalize_intensity(image), 0)
    n = labels.shape[0]
    for weights in args.weights:
        began = time.perf_counter()
        result = segment(image, support, load_model(weights), device="cpu", keep_probabilities=True)
        seconds = time.perf_counter() - began
        probabilities = result.probabilities.transpose(1, 0, 2, 3)  # "N C H W"
        tracker = ExtentTracker(values, n, seeds)
        for start in range(0, n, 16):
            tracker.add(start, probabilities[start : start + 16], result.labels[start : start + 16])
        rows = [('every slice (`extent="all"`)', *score(result.labels, labels, values))]
        for margin in MARGINS:
            kept = result.labels.copy()
            for value in values:
                first, last = min(seeds[value]), max(seeds[value])
                pad = int(round(margin * (last - first)))
                outside = np.ones(n, bool)
                outside[max(0, first - pad) : last + pad + 1] = False
                kept[outside] = np.where(kept[outside] == value, 0, kept[outside])
            rows.append((f"painted range + {margin:.0%} margin", *score(kept, labels, values)))
        for stop, relative, after in RULES:
            kept = result.labels.copy()
            tracker.apply(kept, stop_confidence=stop, relative=relative, stop_after=after)
            chosen = (stop, relative, after) == (EXTENT_STOP_CONFIDENCE, EXTENT_RELATIVE, EXTENT_STOP_AFTER)
            name = (
                f"auto: sharpness < {stop}"
                + (" x painted slices'" if relative else "")
                + f", {after} in a row"
                + (" (default)" if chosen else "")
            )
            rows.append((name, *score(kept, labels, values)))
        print(
            f"\n### {args.split}, weights {weights} (segmented in {seconds / 60:.1f} min, "
            f"min area {EXTENT_MIN_AREA})\n"
        )
        print("| extent | mean 3D Dice | most slices drawn / true | per structure |\n|---|---|---|---|")
        for name, dice, ratio, each in rows:
            print(f"| {name} | {100 * dice:.1f} | {ratio:.2f} | {' '.join(f'{100 * d:.0f}' for d in each)} |")


if __name__ == "__main__":
    main()

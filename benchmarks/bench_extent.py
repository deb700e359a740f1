"""Object extent in ``segment``: how many slices each task is drawn on, and its 3D Dice, with every
slice segmented (``extent="all"``), with the painted range plus a margin (the Segment widget's
default range), and with ``extent="auto"`` under several stop rules.

Protocol (needs ../shared/data). Each structure is painted (its true mask) on three slices along
axis 0: the slices at 25 %, 50 % and 75 % of its true extent. One support set holds every painted
slice of every structure; the volume is segmented once with every slice (``extent="all"``), and the
auto extent's stop rules are then applied by the same code ``iter_segment`` runs
(:class:`~napari_openseg.core.segment.extent.ExtentTracker` on the same probabilities), so each row is
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
from pathlib import Path

import numpy as np
import torch

from napari_openseg.core.metrics import dice_score
from napari_openseg.core.preprocess import normalize_intensity
from napari_openseg.core.segment.extent import (
    EXTENT_MARGIN,
    EXTENT_MIN_AREA,
    EXTENT_RELATIVE,
    EXTENT_STOP_AFTER,
    EXTENT_STOP_CONFIDENCE,
    RANGE_MARGIN,
    ExtentTracker,
    painted_range,
    painted_slices,
)
from napari_openseg.core.segment.inference import segment
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
#: Stop rules replayed: the stop confidence (absolute, or a fraction of the painted slices'), the
#: slices in a row that end a task, and the margin beyond the painted slices (None: unbounded).
RULES = [
    {"stop_confidence": c, "relative": False, "stop_after": 2, "margin": m}
    for m in (None, 0.25, 0.5)
    for c in (0.0, 0.8, 0.86, 0.88)
] + [
    {"stop_confidence": f, "relative": True, "stop_after": 2, "margin": m}
    for m in (None, 0.25)
    for f in (0.96, 0.98)
]
DEFAULT_RULE = {
    "stop_confidence": EXTENT_STOP_CONFIDENCE,
    "relative": EXTENT_RELATIVE,
    "stop_after": EXTENT_STOP_AFTER,
    "margin": EXTENT_MARGIN,
}


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
    parser.add_argument(
        "--cache",
        help="folder to keep each run's labels and per-slice numbers in, and to "
        "read them from on a later run (the rules are then replayed without the network)",
    )
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
        cached = Path(args.cache) / f"extent_{args.split}_{Path(weights).stem}.npz" if args.cache else None
        if cached is not None and cached.is_file():
            with np.load(cached) as saved:
                drawn, tracker = saved["labels"], ExtentTracker(values, n, seeds)
                tracker.confidence, tracker.area, tracker.seen = (
                    saved["confidence"],
                    saved["area"],
                    saved["seen"],
                )
        else:
            result = segment(image, support, load_model(weights), device="cpu", keep_probabilities=True)
            drawn, probabilities = result.labels, result.probabilities.transpose(1, 0, 2, 3)  # "N C H W"
            tracker = ExtentTracker(values, n, seeds)
            for start in range(0, n, 16):
                tracker.add(start, probabilities[start : start + 16], drawn[start : start + 16])
            if cached is not None:
                np.savez_compressed(
                    cached, labels=drawn, confidence=tracker.confidence, area=tracker.area, seen=tracker.seen
                )
        seconds = time.perf_counter() - began
        rows = [('every slice (`extent="all"`)', *score(drawn, labels, values))]
        for margin in MARGINS:  # the Segment widget's range: one for the image, every task inside it
            first, stop = painted_range(support, "image", 0, n, margin)
            kept = drawn.copy()
            kept[:first], kept[stop:] = 0, 0
            default = " (the widget's default)" if margin == RANGE_MARGIN else ""
            rows.append((f"painted range + {margin:.0%} margin{default}", *score(kept, labels, values)))
        for rule in RULES:
            kept = drawn.copy()
            tracker.apply(kept, **rule)
            name = (
                f"auto: sharpness < {rule['stop_confidence']}"
                + (" x painted slices'" if rule["relative"] else "")
                + f", {rule['stop_after']} in a row, "
                + ("no bound" if rule["margin"] is None else f"at most {rule['margin']:.0%} beyond")
                + (" (default)" if rule == DEFAULT_RULE else "")
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

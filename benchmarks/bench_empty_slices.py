"""What weights draw on slices that do not hold the structure, and their Dice on slices that do.

Segmenting a volume runs the network on every slice; most do not hold the structure. On the
hippocampus validation subjects (every slice kept, so also a volume's unlabelled ends), for every
(label, axis) task: 12 episodes whose query lacks the label and 12 whose query holds it, support of
8 slices from other subjects, on the weights' own grid. Prints, per weights file, the predicted area
on empty queries (pixels, mean and median), the share of empty queries left (almost) empty, and the
Dice on the others.

    python benchmarks/bench_empty_slices.py runs/default64/weights.pt runs/empty64/weights.pt

Needs ../shared/data.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from napari_openseg.core.metrics import dice_score
from napari_openseg.model.fast import fast_forward
from napari_openseg.model.registry import network_from_file
from napari_openseg.training.incontext.tasks import build_bank, sample_episode, shared_volumes
from napari_openseg.training.splits import shared_data_dir


def measure(weights: str, bank, episodes: int, support_size: int, seed: int) -> dict[str, float]:
    net = network_from_file(weights).eval()
    rng = np.random.default_rng(seed)
    false_area, dice, true_area = [], [], []
    with torch.inference_mode():
        for task in bank.tasks:
            for empty in (True, False):
                for _ in range(episodes):
                    images, masks = sample_episode(bank, task, support_size, rng, empty_query=empty)
                    predicted = fast_forward(net, images[:1], images[None, 1:], masks[None, 1:])[0] > 0
                    if empty:
                        false_area.append(float(predicted.sum()))
                        continue
                    truth = masks[0] > 0.5
                    dice.append(dice_score(predicted.numpy(), truth.numpy()))
                    true_area.append(float(truth.sum()))
    false_area = np.asarray(false_area)
    return {
        "mean": false_area.mean(),
        "median": float(np.median(false_area)),
        "empty": float(np.mean(false_area <= 5)),
        "dice": float(np.mean(dice)),
        "area": float(np.mean(true_area)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", nargs="+", help="weights files (all on the same grid)")
    parser.add_argument("--episodes", type=int, default=12, help="episodes per task and kind (default 12)")
    parser.add_argument("--support-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    data = shared_data_dir()
    if data is None:
        print("../shared/data is not present; nothing to measure", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    grid = network_from_file(args.weights[0]).config.grid_size
    bank = build_bank(shared_volumes(data, "val")["hippocampus"], grid, all_slices=True)
    print(
        f"hippocampus validation subjects, grid {grid}, S = {args.support_size}, "
        f"{args.episodes} episodes per task and kind, {len(bank.tasks)} tasks\n"
    )
    print(
        "| weights | area drawn on empty slices, mean / median (px) | empty slices left empty (<= 5 px) "
        "| Dice where the structure is | its mean area (px) |"
    )
    print("|---|---|---|---|---|")
    for weights in args.weights:
        r = measure(weights, bank, args.episodes, args.support_size, args.seed)
        print(
            f"| {weights} | {r['mean']:.0f} / {r['median']:.0f} | {100 * r['empty']:.0f} % | {r['dice']:.3f} "
            f"| {r['area']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

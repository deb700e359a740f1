"""Ways to combine an ensemble's K predictions, compared on the selection tasks of bench_quality.

For each family and S, every query batch gets K = 5 support subsets (drawn exactly as
``bench_quality.py`` draws them), the default weights predict the batch from each, and the five
predictions are combined by each rule: ``K=1`` (the first member alone), ``mean`` (plain mean of the
probabilities), ``logit mean``, ``median``, and ``area-matched`` (napari_openseg.core.ensemble). Only
the selection tasks are used (``bench_quality.family_folders(selection=True)``), never the reported
ones, because the rule was chosen here.

Run: ``python benchmarks/bench_ensemble.py [--support-sizes 1 4 16 64] [--threads 2]``; prints a
Markdown table of Dice points (mean over tasks of the mean over query slices).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench_quality import SUPPORT_SIZES, family_folders
from napari_openseg.core.engine import support_tensors
from napari_openseg.core.ensemble import combine_members
from napari_openseg.core.metrics import dice_score
from napari_openseg.core.preprocess import from_grid, to_grid
from napari_openseg.core.progress import run_to_end
from napari_openseg.evaluation.evaluate import load_tasks, networks, task_episodes
from napari_openseg.training.splits import shared_data_dir

RULES = ("K=1", "mean", "logit mean", "median", "area-matched")


def member_logits(net, images: np.ndarray, subsets: list[list]) -> tuple[torch.Tensor, object]:
    """``"K b g g"`` logits of the query batch from each support subset, on the model grid, and the
    mapping back to the images' shape."""
    from napari_openseg.model.fast import encode_support, fast_forward

    grid = net.config.grid_size
    query, mapping = to_grid(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)), grid)
    query = query.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        logits = [
            fast_forward(
                net,
                query,
                encoded=encode_support(net, *support_tensors(s, grid, "pad", "cpu", torch.float32)),
            )
            for s in subsets
        ]
    return torch.stack([logit[:, 0] for logit in logits]), mapping


def combined(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each rule's probabilities ``"b g g"`` (thresholded at 0.5 afterwards)."""
    probs = torch.sigmoid(logits)
    return {
        "K=1": probs[0],
        "mean": probs.mean(0),
        "logit mean": torch.sigmoid(logits.mean(0)),
        "median": probs.median(0).values,
        "area-matched": combine_members(probs, 0.5, "area-matched"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--support-sizes", type=int, nargs="+", default=list(SUPPORT_SIZES))
    parser.add_argument("--ensemble", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    data = shared_data_dir()
    if data is None:
        raise SystemExit("../shared/data is not present")
    torch.set_num_threads(args.threads)
    nets, _ = networks(None, ["network"], 0, torch.device("cpu"))
    net = nets["network"].net
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for family, (folder, labels, max_queries) in family_folders(
            data, Path(scratch), selection=True
        ).items():
            _, tasks = run_to_end(load_tasks(folder, "val", labels))
            for size in args.support_sizes:
                per_rule = {rule: [] for rule in RULES}
                for task in tasks:
                    dice = {rule: [] for rule in RULES}
                    for batch, subsets in task_episodes(task, size, args.ensemble, 0, max_queries):
                        logits, mapping = member_logits(net, np.stack([q.image for q in batch]), subsets)
                        for rule, probs in combined(logits).items():
                            masks = from_grid(probs[:, None], mapping)[:, 0].numpy() >= 0.5
                            dice[rule].extend(dice_score(m, q.mask) for m, q in zip(masks, batch))
                    for rule in RULES:
                        per_rule[rule].append(float(np.mean(dice[rule])))
                rows.append((family, size, {rule: 100 * float(np.mean(v)) for rule, v in per_rule.items()}))
                print(f"# {family} S={size}: {rows[-1][2]}", flush=True)
    print(f"\nK = {args.ensemble} members; Dice points on the selection tasks\n")
    print("| family | S | " + " | ".join(RULES) + " |")
    print("|---|---|" + "---|" * len(RULES))
    for family, size, scores in rows:
        print(f"| {family} | {size} | " + " | ".join(f"{scores[r]:.1f}" for r in RULES) + " |")
    for size in args.support_sizes:
        sub = [scores for _, s, scores in rows if s == size]
        print(
            f"| mean of families | {size} | "
            + " | ".join(f"{np.mean([x[r] for x in sub]):.1f}" for r in RULES)
            + " |"
        )


if __name__ == "__main__":
    main()

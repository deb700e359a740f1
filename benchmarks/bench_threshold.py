"""Does the default weights' decision threshold (0.5) suit them? Slice Dice against whole-volume Dice.

Two measurements of the default weights at several decisions, where ``0.3`` means "foreground where
the probability is >= 0.3" and ``h0.3`` is hysteresis: pixels >= 0.3 that are connected (in the
slice) to a pixel >= 0.5, so a slice without a confident pixel stays empty:

* ``slices``: the selection tasks of ``bench_quality.py`` (never the reported ones), K = 1, every
  S; query slices hold the structure (the central 30 % of its slices, for the single volumes), as
  in the evaluation protocol.
* ``volumes``: what a user segments: whole hippocampus volumes (10 validation subjects, every
  slice, along each axis), support from 12 training subjects' labelled slices, S = 16; and the
  bundled sample with the demo's 8 painted axial slices. 3D Dice per label.

Run: ``python benchmarks/bench_threshold.py [--only slices|volumes] [--threads 2]``; prints Markdown
tables of Dice points. Needs ../shared/data.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from bench_ensemble import member_logits
from bench_quality import SUPPORT_SIZES, family_folders
from napari_openseg.core.metrics import dice_per_label, dice_score
from napari_openseg.core.preprocess import from_grid
from napari_openseg.core.progress import run_to_end
from napari_openseg.evaluation.evaluate import load_tasks, networks, task_episodes
from napari_openseg.training.splits import shared_data_dir

DECISIONS = ("0.5", "0.4", "0.3", "0.2", "h0.3", "h0.2")


def decide(probability: np.ndarray, decision: str) -> np.ndarray:
    """Foreground mask of one ``"H W"`` probability map under ``decision`` (see the docstring)."""
    if not decision.startswith("h"):
        return probability >= float(decision)
    regions, count = ndimage.label(probability >= float(decision[1:]))
    keep = np.zeros(count + 1, bool)
    keep[np.unique(regions[probability >= 0.5])] = True
    keep[0] = False
    return keep[regions]


def label_map(probabilities: np.ndarray, values: list[int], decision: str) -> np.ndarray:
    """``"C N H W"`` task probabilities -> ``"N H W"`` labels: the most probable task among those
    whose mask (per slice, under ``decision``) holds the pixel."""
    masks = np.stack([[decide(p, decision) for p in task] for task in probabilities])
    best = np.where(masks, probabilities, -1.0).argmax(axis=0)
    return np.where(masks.any(axis=0), np.asarray(values)[best], 0)


def slice_dice(net, data: Path, sizes: list[int]) -> list[tuple[str, int, dict[str, float]]]:
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for family, (folder, labels, max_queries) in family_folders(
            data, Path(scratch), selection=True
        ).items():
            _, tasks = run_to_end(load_tasks(folder, "val", labels))
            for size in sizes:
                per_task = {d: [] for d in DECISIONS}
                for task in tasks:
                    dice = {d: [] for d in DECISIONS}
                    for batch, subsets in task_episodes(task, size, 1, 0, max_queries):
                        logits, mapping = member_logits(net, np.stack([q.image for q in batch]), subsets)
                        probs = from_grid(torch.sigmoid(logits[0])[:, None], mapping)[:, 0].numpy()
                        for d in DECISIONS:
                            dice[d].extend(dice_score(decide(p, d), q.mask) for p, q in zip(probs, batch))
                    for d in DECISIONS:
                        per_task[d].append(float(np.mean(dice[d])))
                rows.append((family, size, {d: 100 * float(np.mean(v)) for d, v in per_task.items()}))
                print(f"# {family} S={size}: {rows[-1][2]}", flush=True)
    return rows


def volume_dice(data: Path) -> list[tuple[str, dict[str, float]]]:
    import nibabel as nib

    from napari_openseg.core.segment.inference import segment
    from napari_openseg.core.support import SupportSet, build_support_set
    from napari_openseg.sample import evenly_spaced_slices, load_sample
    from napari_openseg.training.splits import hippocampus_splits

    root, splits = data / "msd_task04_hippocampus", hippocampus_splits(data)

    support_subjects, query_subjects = splits["train"][:12], splits["val"][:10]
    volumes = {
        subject: tuple(
            np.asarray(nib.load(root / sub / f"{subject}.nii.gz").dataobj) for sub in ("imagesTr", "labelsTr")
        )
        for subject in support_subjects + query_subjects
    }  # read once, used along every axis

    def scores(image, labels, support, axis) -> dict[str, dict[int, float]]:
        result = segment(image, support, None, axis=axis, support_size=16, device="cpu", method="network")
        by_slice = np.moveaxis(result.probabilities, axis + 1, 1)
        return {
            d: dice_per_label(
                np.moveaxis(label_map(by_slice, result.label_values, d), 0, axis), labels, result.label_values
            )
            for d in DECISIONS
        }

    rows = []
    for axis in (0, 1, 2):
        support = SupportSet()
        for subject in support_subjects:
            support.extend(build_support_set(*volumes[subject], axis=axis, source=subject).entries)
        found = [scores(*volumes[subject], support, axis) for subject in query_subjects]
        for value, name in ((1, "anterior"), (2, "posterior")):
            rows.append(
                (
                    f"hippocampus {name}, axis {axis}",
                    {d: 100 * float(np.mean([f[d][value] for f in found])) for d in DECISIONS},
                )
            )
            print(f"# {rows[-1]}", flush=True)
    image, labels = load_sample()
    painted = evenly_spaced_slices(labels.data, 0, 8)  # the demo's support
    support = build_support_set(image.data, labels.data, axis=0, slice_indices=painted.tolist())
    found = scores(image.data, labels.data, support, 0)
    for value, name in ((1, "grey matter"), (2, "white matter")):
        rows.append((f"sample {name}, axis 0", {d: 100 * found[d][value] for d in DECISIONS}))
    return rows


def print_table(title: str, rows: list[tuple[str, dict[str, float]]]) -> None:
    print(f"\n{title}\n\n| | " + " | ".join(DECISIONS) + " |\n|---|" + "---|" * len(DECISIONS))
    for name, scores in rows:
        print(f"| {name} | " + " | ".join(f"{scores[d]:.1f}" for d in DECISIONS) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("slices", "volumes"), help="one of the two measurements")
    parser.add_argument("--support-sizes", type=int, nargs="+", default=list(SUPPORT_SIZES))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    data = shared_data_dir()
    if data is None:
        raise SystemExit("../shared/data is not present")
    parts = [args.only] if args.only else ["slices", "volumes"]
    torch.set_num_threads(args.threads)
    if "slices" in parts:
        net = networks(None, ["network"], 0, torch.device("cpu"))[0]["network"].net
        rows = slice_dice(net, data, args.support_sizes)
        means = [
            (
                f"mean of families, S = {s}",
                {d: float(np.mean([r[d] for _, size, r in rows if size == s])) for d in DECISIONS},
            )
            for s in args.support_sizes
        ]
        print_table(
            "Slice Dice on the selection tasks, K = 1 (points)",
            [(f"{f}, S = {s}", r) for f, s, r in rows] + means,
        )
    if "volumes" in parts:
        print_table("Whole-volume 3D Dice, S = 16, K = 1 (points)", volume_dice(data))


if __name__ == "__main__":
    main()

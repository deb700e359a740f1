"""The engine against its own methods on every split of the task bank: quality, estimates, strokes.

For each set of ``training/task_bank.json`` found in ``../shared/data``: queries from its **test**
cases (``--split val`` for choosing settings: queries from val cases, support from train cases),
support pool from its train + val cases; every label value is a task (3D sets: x 3 axes). Per task
and seed, one support set of S entries (K = 1) is drawn and the engine is fitted to it as users run
it (:func:`napari_openseg.evaluation.evaluate.iter_evaluate_tasks`, one support draw for the up to
``--max-queries`` queries of a task), giving on the same queries: ``network``, ``pixel_classifier``,
``stacked``, ``model`` (= ``auto``, the default), the label prior, and the engine's cross-validated
estimate of each. With ``--strokes`` the same support masks are also reduced to strokes (the
structure's skeleton, at most ``--stroke-share`` of it, and background strokes: an outline a few
pixels outside the structure and three random lines) and ``auto`` runs on those.

``--time`` measures instead the CPU time (``time.process_time``, one thread) of segmenting 3D
volumes (the bundled MNI152 sample and a hippocampus test volume) at S = 16, K = 1 with the network
alone and with ``auto`` (fit once per task, predict per slice in batches).

The classifiers' cuts are tuned on the support as users run them; ``--no-tune`` cuts at 0.5 (as
ilastik and the engine before 2026-12-07 did), and ``--baseline-from RUN.json`` compares ``auto``
with the network and pixel classifier of such a run (same draws).

Run: ``python benchmarks/bench_engine.py --split test --seeds 0 1 2 --strokes --threads 1 --json OUT``;
prints Markdown tables (docs/evaluation.md, docs/model-card.md). Needs ../shared. Runs over different
``--sets`` (side by side, one per core) print one table with ``--tables-from A.json B.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: shared CPUs

import numpy as np  # noqa: E402
import torch  # noqa: E402

from napari_openseg.core.progress import run_to_end  # noqa: E402
from napari_openseg.evaluation.data import build_tasks, find_folder  # noqa: E402
from napari_openseg.evaluation.evaluate import iter_evaluate_tasks, networks  # noqa: E402
from napari_openseg.training.splits import shared_data_dir  # noqa: E402
from napari_openseg.training.taskbank import discover, set_cases  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from saved_runs import merge_runs, write_run  # noqa: E402

METHODS = ("network", "pixel_classifier", "stacked", "model", "label_prior")


def set_tasks(dataset, data_dir: Path, split: str, axes: list[int] | None):
    """EvalTasks of one set: queries from ``split`` cases, support from the cases before it."""
    cases = set_cases(dataset, data_dir)
    support = cases["train"] + (cases["val"] if split == "test" else [])
    if not cases[split] or not support:
        return []
    tasks = []
    for _, found in build_tasks(
        find_folder(data_dir / dataset.name), roles=(sorted(support), sorted(cases[split]))
    ):
        tasks = found
    return [t for t in tasks if axes is None or t.axis is None or t.axis in axes]


def _run_along(mask: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``limit`` pixels of ``mask`` (a thin line), walked from a random pixel to its neighbours."""
    from scipy import ndimage

    if mask.sum() <= limit:
        return mask
    points = np.argwhere(mask)
    start = tuple(points[rng.integers(len(points))])
    seed = np.zeros_like(mask)
    seed[start] = True
    distance = ndimage.distance_transform_edt(~seed)
    order = np.argsort(distance[mask], kind="stable")[:limit]
    keep = np.zeros_like(mask)
    keep[tuple(points[order].T)] = True
    return keep


def strokes(mask: np.ndarray, share: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(painted structure, painted background)`` of one binary mask, as a user with a brush would:
    the structure's skeleton (3 px wide where that stays under ``share`` of it), and background
    strokes (an outline 3 px outside the structure, 1 px wide, and three random lines)."""
    from scipy import ndimage
    from skimage.morphology import skeletonize

    limit = max(1, int(share * mask.sum()))
    skeleton = skeletonize(mask)
    if not skeleton.any():
        skeleton = mask.copy()
    painted = ndimage.binary_dilation(skeleton) & mask
    if painted.sum() > limit:
        painted = _run_along(skeleton, limit, rng)
    grown = ndimage.binary_dilation(mask, iterations=3)
    background = ndimage.binary_dilation(grown) & ~grown
    h, w = mask.shape
    for _ in range(3):
        y0, x0, y1, x1 = rng.integers(0, h), rng.integers(0, w), rng.integers(0, h), rng.integers(0, w)
        steps = max(abs(y1 - y0), abs(x1 - x0), 1)
        ys, xs = (
            np.linspace(y0, y1, steps).round().astype(int),
            np.linspace(x0, x1, steps).round().astype(int),
        )
        line = np.zeros_like(mask)
        line[ys, xs] = True
        background |= line & ~grown
    return painted, background & ~mask


def stroke_tasks(tasks, share: float, seed: int):
    """The tasks with every support mask reduced to strokes (``known`` = painted pixels)."""
    rng = np.random.default_rng(seed)
    out = []
    for task in tasks:
        support = []
        for entry in task.support:
            structure, background = strokes(entry.mask, share, rng)
            support.append(replace(entry, mask=structure, known=structure | background))
        out.append(replace(task, support=support))
    return out


def evaluate_set(tasks, nets, grid, args, seed: int, methods) -> dict[str, dict]:
    stacking = {
        "classifier": args.classifier,
        "balance": not args.no_balance,
        "folds": args.folds,
        "tune": not args.no_tune,
    }
    return run_to_end(
        iter_evaluate_tasks(
            tasks,
            nets,
            grid,
            methods=methods,
            support_size=args.support_size,
            ensemble=1,
            seed=seed,
            max_queries=args.max_queries,
            queries_per_draw=args.max_queries,
            **stacking,
        )
    )


def quality(args, data: Path) -> dict:
    nets, grid = networks(args.weights, ("network",), 0, torch.device("cpu"))
    results = {}
    for dataset in discover(data):
        if args.sets and dataset.name not in args.sets:
            continue
        tasks = set_tasks(dataset, data, args.split, args.axes)
        if not tasks:
            continue
        tick, cpu = time.perf_counter(), time.process_time()
        entry = results.setdefault(dataset.name, {"modality": dataset.modality, "tasks": {}})
        for seed in args.seeds:
            scores = evaluate_set(tasks, nets, grid, args, seed, list(METHODS))
            if args.strokes:
                sparse = evaluate_set(
                    stroke_tasks(tasks, args.stroke_share, seed), nets, grid, args, seed, ["model"]
                )
            for key, task in scores.items():
                row = entry["tasks"].setdefault(key, {"dice": {}, "estimate": {}, "chosen": {}})
                for method in METHODS:
                    row["dice"].setdefault(method, []).append(float(np.mean(task["dice"][method])))
                for method, values in task["estimate"].items():
                    row["estimate"].setdefault(method, []).extend(values)
                for method, count in task.get("model_methods", {}).items():
                    row["chosen"][method] = row["chosen"].get(method, 0) + count
                if args.strokes:
                    row["dice"].setdefault("strokes", []).append(float(np.mean(sparse[key]["dice"]["model"])))
        if args.json:  # after every set, so that a long run stopped early keeps what it measured
            save(args, results)
        means = {m: np.mean([np.mean(t["dice"][m]) for t in entry["tasks"].values()]) for m in METHODS}
        print(
            f"# {dataset.name}: "
            + ", ".join(f"{m} {100 * v:.1f}" for m, v in means.items())
            + f" ({time.perf_counter() - tick:.0f} s, {time.process_time() - cpu:.0f} s CPU)",
            file=sys.stderr,
            flush=True,
        )
    return results


def save(args, results: dict) -> None:
    """Write the run's settings and every number so far to ``args.json`` (replaced whole, atomically)."""
    write_run(args.json, {"args": vars(args), "results": results})


#: Settings two runs must share for their sets' support draws and queries to be the same.
SAME_DRAWS = ("split", "seeds", "support_size", "max_queries", "classifier", "no_balance", "folds")


def merged(files: list[str]) -> tuple[argparse.Namespace, dict]:
    """The settings and results of runs written with ``--json`` over different sets, as one run."""
    runs, results = merge_runs(files, (*SAME_DRAWS, "no_tune", "strokes"), lambda run: run["args"])
    return argparse.Namespace(**{"no_tune": True, **runs[0]["args"]}), results  # older runs: untuned


def set_means(entry: dict) -> dict[str, float]:
    """Per column, the mean over the set's tasks of the mean over seeds."""
    columns = entry["tasks"][next(iter(entry["tasks"]))]["dice"]
    return {c: float(np.mean([np.mean(t["dice"][c]) for t in entry["tasks"].values()])) for c in columns}


def print_quality(results: dict, args) -> None:
    strokes = " | strokes auto | kept" if args.strokes else ""
    print(
        f"split: {args.split}; S = {args.support_size}, K = 1; seeds {args.seeds}; up to {args.max_queries} "
        f"queries per task; classifier {args.classifier}, balance {not args.no_balance}, "
        f"tuned cuts {not args.no_tune}, {args.folds} folds; "
        "Dice in points, mean over tasks of the mean over seeds; est = auto's cross-validated estimate\n"
    )
    print(
        "| set | modality | tasks | network | pixel classifier | stacked | **auto** | label prior | auto - max "
        f"| est | abs err | auto chose{strokes} |"
    )
    print("|" + "---|" * (12 + (2 if args.strokes else 0)))
    errors, margins, gains, kept = [], [], [], []
    for name, entry in results.items():
        m = set_means(entry)
        best = max(m["network"], m["pixel_classifier"])
        estimate = [
            np.mean(t["estimate"]["model"]) for t in entry["tasks"].values() if t["estimate"].get("model")
        ]
        measured = [
            np.mean(t["dice"]["model"]) for t in entry["tasks"].values() if t["estimate"].get("model")
        ]
        task_errors = [abs(e - d) for e, d in zip(estimate, measured)]
        errors += task_errors
        margins.append(m["model"] - best)
        chosen = {}
        for t in entry["tasks"].values():
            for k, v in t["chosen"].items():
                chosen[k] = chosen.get(k, 0) + v
        chose = ", ".join(f"{k} {v}" for k, v in sorted(chosen.items()))
        cells = (
            f"| {name} | {entry['modality']} | {len(entry['tasks'])} | {100 * m['network']:.1f} | "
            f"{100 * m['pixel_classifier']:.1f} | {100 * m['stacked']:.1f} | **{100 * m['model']:.1f}** | "
            f"{100 * m['label_prior']:.1f} | {100 * (m['model'] - best):+.1f} | "
            f"{100 * np.mean(estimate) if estimate else float('nan'):.1f} | "
            f"{100 * np.mean(task_errors) if task_errors else float('nan'):.1f} | {chose}"
        )
        if args.strokes:
            ratio = m["strokes"] / m["model"] if m["model"] > 0 else float("nan")
            kept.append(ratio)
            cells += f" | {100 * m['strokes']:.1f} | {100 * ratio:.0f} %"
        print(cells + " |")
        gains.append(m)
    mean = {c: float(np.mean([g[c] for g in gains])) for c in gains[0]}
    best_mean = np.mean([max(g["network"], g["pixel_classifier"]) for g in gains])
    print(
        f"\nmean over {len(results)} sets: network {100 * mean['network']:.1f}, pixel classifier "
        f"{100 * mean['pixel_classifier']:.1f}, stacked {100 * mean['stacked']:.1f}, auto {100 * mean['model']:.1f}, "
        f"label prior {100 * mean['label_prior']:.1f}; mean of the per-set max(network, pixel classifier) "
        f"{100 * best_mean:.1f}"
    )
    print(margin_line(margins))
    print(f"estimate of auto: mean absolute error {np.mean(errors):.3f} over {len(errors)} tasks")
    if args.strokes:
        print(
            f"strokes (<= {args.stroke_share:.0%} of each structure): auto keeps {100 * min(kept):.0f} % to "
            f"{100 * max(kept):.0f} % of its full-mask Dice (>= 90 % on {sum(k >= 0.9 for k in kept)} of {len(kept)} sets)"
        )


def margin_line(margins: list[float]) -> str:
    """How ``auto`` stands against the per-set better of network and pixel classifier."""
    return (
        f"auto >= max - 1 point on {sum(x >= -0.01 for x in margins)} of {len(margins)} sets; worst "
        f"{100 * min(margins):+.1f}; mean auto - max {100 * np.mean(margins):+.1f} points"
    )


def print_against(results: dict, args, files: list[str]) -> None:
    """``auto`` of ``results`` against the better of network and pixel classifier of the runs in
    ``files`` (the same sets and draws, run another way: ``--no-tune``, the peers' cut at 0.5)."""
    base_args, base = merged(files)
    differs = [k for k in SAME_DRAWS if getattr(base_args, k) != getattr(args, k)]
    if differs:
        raise SystemExit(f"{files[0]} differs from this run in {', '.join(differs)}")
    margins = []
    for name, entry in results.items():
        if name in base:
            m = set_means(base[name])
            margins.append(set_means(entry)["model"] - max(m["network"], m["pixel_classifier"]))
    cut = "0.5" if base_args.no_tune else "tuned"
    print(f"against network and pixel classifier cut at {cut} ({', '.join(files)}): {margin_line(margins)}")


def timing(args, data: Path) -> None:
    """CPU seconds to segment 3D volumes with the network alone and with auto (S = 16, K = 1)."""
    from napari_openseg.core.segment.inference import segment
    from napari_openseg.core.support import build_support_set
    from napari_openseg.io import read_image
    from napari_openseg.sample import evenly_spaced_slices, load_sample

    image, labels = load_sample()
    volumes = [("MNI152 sample (grey/white matter)", image.data, labels.data)]
    hippocampus = data / "msd_task04_hippocampus"
    cases = set_cases(next(s for s in discover(data) if s.name == "msd_task04_hippocampus"), data)
    name = cases["test"][0]
    volumes.append(
        (
            f"hippocampus {name}",
            read_image(hippocampus / "imagesTr" / f"{name}.nii.gz").data,
            read_image(hippocampus / "labelsTr" / f"{name}.nii.gz").data,
        )
    )
    print("| volume | slices | tasks | network CPU s | auto CPU s | auto / network | auto chose |")
    print("|---|---|---|---|---|---|---|")
    for title, volume, truth in volumes:
        chosen = evenly_spaced_slices(truth, 0, 16)
        support = build_support_set(volume, truth, axis=0, slice_indices=chosen.tolist())
        seconds = {}
        for method in ("network", "auto"):
            segment(volume[:2], support, args.weights, method="network", device="cpu")  # warm-up
            start = time.process_time()
            result = segment(
                volume, support, args.weights, method=method, device="cpu", keep_probabilities=False
            )
            seconds[method] = time.process_time() - start
        picked = ", ".join(f"{v}: {e.method}" for v, e in result.estimates.items())
        print(
            f"| {title} | {volume.shape[0]} | {len(result.label_values)} | {seconds['network']:.1f} | "
            f"{seconds['auto']:.1f} | {seconds['auto'] / seconds['network']:.2f} | {picked} |",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--sets", nargs="+", help="only these sets")
    parser.add_argument("--axes", type=int, nargs="+", help="only these slice axes of 3D sets")
    parser.add_argument("--weights", default=None, help="weights name or file (default: the bundled default)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--support-size", type=int, default=16)
    parser.add_argument("--max-queries", type=int, default=8, help="query slices per task and seed")
    parser.add_argument("--classifier", default="boosting", choices=("boosting", "forest"))
    parser.add_argument("--no-balance", action="store_true")
    parser.add_argument(
        "--no-tune",
        action="store_true",
        help="the classifiers cut at 0.5 (as before 2026-12-07's tuned cuts)",
    )
    parser.add_argument(
        "--boosting",
        type=int,
        nargs=2,
        metavar=("ITERATIONS", "LEAVES"),
        help="boosting size to try instead of the default (settings are chosen on --split val)",
    )
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--strokes", action="store_true", help="also run auto on stroke support")
    parser.add_argument("--stroke-share", type=float, default=0.2)
    parser.add_argument("--time", action="store_true", help="measure CPU time on 3D volumes instead")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write every number to this file (after every set)")
    parser.add_argument(
        "--tables-from", nargs="+", metavar="JSON", help="print the tables of earlier --json runs (merged)"
    )
    parser.add_argument(
        "--baseline-from",
        nargs="+",
        metavar="JSON",
        help="also compare auto with network and pixel classifier of these runs (same draws, e.g. --no-tune)",
    )
    args = parser.parse_args(argv)
    if args.tables_from:
        settings, results = merged(args.tables_from)
        print_quality(results, settings)
        if args.baseline_from:
            print_against(results, settings, args.baseline_from)
        return 0
    torch.set_num_threads(args.threads)
    if args.boosting:
        from napari_openseg.core import pixel_classifier

        pixel_classifier.BOOSTING_ITERATIONS, pixel_classifier.BOOSTING_LEAVES = args.boosting
    data = shared_data_dir()
    if data is None:
        print("../shared/data is not present; nothing to measure", file=sys.stderr)
        return 1
    if args.time:
        timing(args, data)
        return 0
    started = time.perf_counter()
    results = quality(args, data)
    print_quality(results, args)
    if args.baseline_from:
        print_against(results, args, args.baseline_from)
    print(f"\nbenchmark run time: {(time.perf_counter() - started) / 60:.1f} min")
    if args.json:
        save(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

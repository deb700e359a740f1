"""Quality on every set of the task bank: weights against the label prior and the pixel classifier.

Each set of ``training/task_bank.json`` found in ``../shared/data`` is evaluated on its **test**
cases (``--split val`` for choices: queries from val cases, support from train cases), with support
entries drawn from its train + val cases; every label value is a task (3D sets: x 3 axes). For each
S (default 1, 4, 16, 64) and K = 1 it reports the Dice of each weights file given, of the label prior
and of the pixel classifier (random forest on filter features), all on the same queries and the same
support draws (``evaluation.evaluate.iter_evaluate_tasks``). Queries per task are a seeded sample
(``--max-queries``).

The summary separates the sets a weights file never trained on. ``--trained-on LABEL=SET,SET`` names
them per weights label; by default a bundled file (``openseg-default``) trained on the hippocampus
only and any other file on every permissive set's train split. Sets labelled by a model
(``totalsegmentator*``) have no test cases (training only).

Run: ``python benchmarks/bench_bank_quality.py --weights new=runs/v2/best.pt current=openseg-default
--threads 2 [--json OUT]``; prints Markdown tables (they go into docs/model-card.md). Needs ../shared.
``--json`` is written after every set, so a run stopped early keeps the sets it finished;
``--tables-from A.json [B.json ...]`` prints the tables of such files, of one run (finished or not)
or of runs over different ``--sets`` merged.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: shared CPUs

import numpy as np  # noqa: E402
import torch  # noqa: E402

from napari_openseg.core.progress import run_to_end  # noqa: E402
from napari_openseg.evaluation.data import build_tasks, find_folder  # noqa: E402
from napari_openseg.evaluation.evaluate import iter_evaluate_tasks, networks  # noqa: E402
from napari_openseg.training.splits import shared_data_dir  # noqa: E402
from napari_openseg.training.taskbank import discover, set_cases, trainable_sets  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from saved_runs import merge_runs, write_run  # noqa: E402

BASELINES = ("label_prior", "pixel_classifier")


def set_tasks(dataset, data_dir: Path, split: str):
    """EvalTasks of one set: queries from ``split`` cases, support from the cases before it."""
    cases = set_cases(dataset, data_dir)
    support = cases["train"] + (cases["val"] if split == "test" else [])
    if not cases[split] or not support:
        return []
    folder = find_folder(data_dir / dataset.name)
    tasks = []
    for _, found in build_tasks(folder, roles=(sorted(support), sorted(cases[split]))):
        tasks = found
    return tasks


def parse_weights(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        label, _, source = item.partition("=")
        out[label if source else Path(item).stem] = source or item
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--weights",
        nargs="+",
        default=["current=openseg-default"],
        help="LABEL=weights (name or file), first one also runs the baselines",
    )
    parser.add_argument(
        "--trained-on",
        nargs="*",
        default=[],
        help="LABEL=SET,SET: sets a weights file trained on (defaults: see the docstring)",
    )
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--sets", nargs="+", help="only these sets")
    parser.add_argument("--support-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--max-queries", type=int, default=24, help="query slices per task (seeded sample)")
    parser.add_argument("--skip-pixel-classifier", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write every number to this file (after every set)")
    parser.add_argument(
        "--tables-from",
        nargs="+",
        metavar="JSON",
        help="print the tables of earlier --json files (runs over different sets: merged)",
    )
    args = parser.parse_args(argv)
    if args.tables_from:
        return reprint(args.tables_from, args)
    torch.set_num_threads(args.threads)
    data = shared_data_dir()
    if data is None:
        print("../shared/data is not present; nothing to measure", file=sys.stderr)
        return 1
    weights = parse_weights(args.weights)
    sets = [s for s in discover(data) if not args.sets or s.name in args.sets]
    trained = default_trained_on(weights, sets)
    trained.update({k: set(v.split(",")) for k, _, v in (t.partition("=") for t in args.trained_on)})
    device = torch.device("cpu")
    nets = {label: networks(source, ("network",), args.seed, device) for label, source in weights.items()}
    started, results = time.perf_counter(), {}
    baselines = [] if args.skip_pixel_classifier else list(BASELINES)
    baselines = baselines or ["label_prior"]
    for dataset in sets:
        tick = time.perf_counter()
        tasks = set_tasks(dataset, data, args.split)
        if not tasks:
            print(f"# {dataset.name}: no {args.split} cases, skipped", file=sys.stderr, flush=True)
            continue
        entry = results.setdefault(
            dataset.name,
            {
                "modality": dataset.modality,
                "licence": dataset.licence_class,
                "tasks": len(tasks),
                "scores": {},
            },
        )
        for size in args.support_sizes:
            means = {}
            for number, (label, (net_by_method, grid)) in enumerate(nets.items()):
                methods = ["network"] + (baselines if number == 0 else [])
                scores = run_to_end(
                    iter_evaluate_tasks(
                        tasks,
                        net_by_method,
                        grid,
                        methods=methods,
                        support_size=size,
                        ensemble=1,
                        seed=args.seed,
                        max_queries=args.max_queries,
                        device=device,
                    )
                )
                for method in methods:
                    name = label if method == "network" else method
                    means[name] = float(np.mean([np.mean(t["dice"][method]) for t in scores.values()]))
                entry["queries"] = int(sum(len(t["dice"]["network"]) for t in scores.values()))
            entry["scores"][str(size)] = means
            print(
                f"# {dataset.name} S={size}: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()),
                file=sys.stderr,
                flush=True,
            )
        if args.json:  # after every set, so that a run stopped early keeps what it measured
            write_run(args.json, payload(results, weights, trained, args))
        print(f"# {dataset.name}: {time.perf_counter() - tick:.0f} s", file=sys.stderr, flush=True)
    print_tables(results, list(weights), baselines, trained, args, time.perf_counter() - started)
    if args.json:
        write_run(args.json, payload(results, weights, trained, args))
    return 0


def payload(results: dict, weights: dict[str, str], trained: dict[str, set[str]], args) -> dict:
    """What ``--json`` holds: every number so far and what :func:`reprint` needs to print it."""
    return {
        "results": results,
        "weights": weights,
        "trained_on": {k: sorted(v) for k, v in trained.items()},
        "split": args.split,
        "seed": args.seed,
        "max_queries": args.max_queries,
    }


def reprint(files: list[str], args) -> int:
    """The tables of saved runs (merged), with the sets each weights file trained on as stored."""
    runs, results = merge_runs(files, ("weights", "split", "seed", "max_queries"))
    if not results:
        print(f"{', '.join(files)}: no set measured yet", file=sys.stderr)
        return 1
    saved, labels = runs[0], list(runs[0]["weights"])
    first = next(iter(results.values()))["scores"]
    columns = list(next(iter(first.values())))
    args.split, args.seed, args.max_queries = saved["split"], saved["seed"], saved["max_queries"]
    args.support_sizes = [int(s) for s in first]
    trained = {k: set().union(*(run["trained_on"].get(k, ()) for run in runs)) for k in saved["trained_on"]}
    trained.update({k: set(v.split(",")) for k, _, v in (t.partition("=") for t in args.trained_on)})
    print_tables(results, labels, [c for c in columns if c not in labels], trained, args, None)
    return 0


def default_trained_on(weights: dict[str, str], sets) -> dict[str, set[str]]:
    """A bundled file (``openseg-*``): the hippocampus only; any other file: every permissive set."""
    permissive = {s.name for s in trainable_sets(sets)} | {"msd_task04_hippocampus"}
    return {
        label: {"msd_task04_hippocampus"} if str(source).startswith("openseg-") else permissive
        for label, source in weights.items()
    }


def print_tables(
    results: dict, labels: list[str], baselines: list[str], trained: dict, args, elapsed: float | None
):
    columns = labels + baselines
    print(
        f"split: {args.split}; seed {args.seed}; up to {args.max_queries} query slices per task; K = 1; "
        f"torch threads {args.threads}; Dice in points (0-100), mean over tasks of the mean over queries\n"
    )
    print("| set | modality | licence | tasks / queries | S | " + " | ".join(columns) + " |")
    print("|" + "|".join(["---"] * (5 + len(columns))) + "|")
    for name, entry in results.items():
        for size, means in entry["scores"].items():
            marks = "*" if name in trained.get(labels[0], ()) else ""
            cells = " | ".join(f"{100 * means[c]:.1f}" for c in columns)
            print(
                f"| {name}{marks} | {entry['modality']} | {entry['licence']} | {entry['tasks']} / "
                f"{entry.get('queries', 0)} | {size} | {cells} |"
            )
    print(
        f"\n`*`: the {labels[0]} weights trained on this set's train split (its test cases are never trained on).\n"
    )
    for size in args.support_sizes:
        print(f"means at S = {size}:")
        for label in labels:
            unseen = [n for n in results if n not in trained.get(label, ())]
            row = {c: mean_of(results, unseen, size, c) for c in columns}
            print(
                f"  sets {label} never trained on ({len(unseen)}): "
                + ", ".join(f"{c} {100 * v:.1f}" for c, v in row.items() if v is not None)
            )
        every = {c: mean_of(results, list(results), size, c) for c in columns}
        print(f"  all sets ({len(results)}): " + ", ".join(f"{c} {100 * v:.1f}" for c, v in every.items()))
        modalities = sorted({e["modality"] for e in results.values()})
        for modality in modalities:
            names = [n for n, e in results.items() if e["modality"] == modality]
            row = {c: mean_of(results, names, size, c) for c in columns}
            print(
                f"    {modality} ({len(names)}): " + ", ".join(f"{c} {100 * v:.1f}" for c, v in row.items())
            )
    if elapsed is not None:
        print(f"\nbenchmark run time: {elapsed / 60:.1f} min")


def mean_of(results: dict, names: list[str], size: int, column: str) -> float | None:
    values = [
        results[n]["scores"][str(size)][column]
        for n in names
        if column in results[n]["scores"].get(str(size), {})
    ]
    return float(np.mean(values)) if values else None


if __name__ == "__main__":
    sys.exit(main())

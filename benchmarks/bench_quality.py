"""Quality of the default weights against three baselines on the held-out task families, and speed.

For S = 1, 4, 16, 64 and K = 1, 5 it measures the Dice of the default weights (``model``) and of
the label prior; a randomly initialised network of the same architecture (``random_init``) and the
pixel classifier (random forest on filter features) are measured at K = 1 (the random network is
near 0 whatever K, and five forests per query batch would dominate the run time). Families and their
bounds:

* ``hippocampus``: MSD Task04, queries from the 19 test subjects, support from the 20 validation
  subjects; labels 1 (anterior) and 2 (posterior) x 3 axes; 16 query slices per task.
* ``brain_structures``: the VoxelMorph scan; the left-hemisphere and midline labels among the 30
  labels VoxelMorph evaluates on (2 3 4 7 8 10 11 12 13 14 15 16 17 18 24 28 31) x 3 axes; 3 query
  slices per task.
* ``mni152_gm_wm``: MNI152 2009a, GM and WM x 3 axes; 8 query slices per task.
* ``colin27_aal``: Colin27 with every tenth AAL region (1 11 21 ... 111) x 3 axes; 3 query slices.

Single-volume families are split by slice ranges (``evaluation.data.single_volume_split``): queries
from the central 30 % of the slices holding the label, support from slices at least 5 slices away.
Query slices are a seeded sample (``--seed``); every method sees the same queries and support sets.

Choices made before the final measurement (the model grid) use ``--selection``: other tasks of the
same volumes (right-hemisphere VoxelMorph labels, AAL regions 5, 15, ..., 115) and hippocampus
queries from train + validation subjects only, never the reported tasks or the test subjects.
``--grid G`` runs the weights on another grid than their own (the network is fully convolutional).

Run: ``python benchmarks/bench_quality.py [--weights PATH] [--threads 2] [--json OUT]``; it prints
Markdown tables (they go into docs/model-card.md). Needs ../shared/data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: shared CPUs

import numpy as np  # noqa: E402
import torch  # noqa: E402

from napari_openseg.core.engine import prepare_network  # noqa: E402
from napari_openseg.core.ensemble import RULES  # noqa: E402
from napari_openseg.core.progress import run_to_end  # noqa: E402
from napari_openseg.evaluation.evaluate import iter_evaluate_tasks, load_tasks, networks  # noqa: E402
from napari_openseg.training.splits import hippocampus_splits, shared_data_dir  # noqa: E402

SUPPORT_SIZES = (1, 4, 16, 64)
ENSEMBLES = (1, 5)
BRAIN_LABELS = (2, 3, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 28, 31)
AAL_LABELS = tuple(range(1, 117, 10))
#: Disjoint tasks for choices made before the final measurement (the model grid): the right-hemisphere
#: labels among VoxelMorph's 30 and AAL regions 5, 15, ..., 115.
SELECTION_LABELS = {
    "brain_structures": (41, 42, 43, 46, 47, 49, 50, 51, 52, 53, 54, 60, 63),
    "colin27_aal": tuple(range(5, 117, 10)),
}


def family_folders(
    data: Path, scratch: Path, selection: bool = False
) -> dict[str, tuple[Path, tuple[int, ...] | None, int]]:
    """(MSD-layout folder, label subset, queries per task) by family; single volumes are linked in.

    ``selection`` gives the disjoint selection tasks (:data:`SELECTION_LABELS`) instead."""
    singles = {
        "brain_structures": (
            "voxelmorph_test_scan/vol_uint8.nii.gz",
            "voxelmorph_test_scan/seg_freesurfer_labels.nii.gz",
            BRAIN_LABELS,
            3,
        ),
        "mni152_gm_wm": (
            "mni152_nilearn/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
            "mni152_nilearn/derived_labels_bg0_gm1_wm2.nii.gz",
            None,
            8,
        ),
        "colin27_aal": ("colin27_aal_mricron/ch2.nii.gz", "colin27_aal_mricron/aal.nii.gz", AAL_LABELS, 3),
    }
    folders = {"hippocampus": (data / "msd_task04_hippocampus", None, 16)}
    for family, (image, labels, subset, queries) in singles.items():
        root = scratch / family
        for sub, source in (("imagesTr", image), ("labelsTr", labels)):
            (root / sub).mkdir(parents=True, exist_ok=True)
            (root / sub / "volume.nii.gz").symlink_to(data / source)
        folders[family] = (root, subset, queries)
    if selection:
        chosen = {f: (folders[f][0], labels, folders[f][2]) for f, labels in SELECTION_LABELS.items()}
        # Hippocampus without its test subjects: the folder's own split then draws queries from
        # train + validation subjects only.
        root, source = scratch / "hippocampus_selection", data / "msd_task04_hippocampus"
        splits = hippocampus_splits(data)
        for sub in ("imagesTr", "labelsTr"):
            (root / sub).mkdir(parents=True, exist_ok=True)
            for subject in splits["train"] + splits["val"]:
                (root / sub / f"{subject}.nii.gz").symlink_to(source / sub / f"{subject}.nii.gz")
        chosen["hippocampus"] = (root, None, 16)
        return chosen
    return folders


def on_grid(net, grid: int):
    """The same weights on another grid (the network is fully convolutional)."""
    from napari_openseg.model.universeg import UniverSeg, UniverSegConfig

    config = net.config
    moved = UniverSeg(UniverSegConfig(config.encoder_channels, config.decoder_channels, grid))
    moved.load_state_dict(net.state_dict())
    moved.weights_info = getattr(net, "weights_info", {})
    return moved.to(memory_format=torch.channels_last).eval().requires_grad_(False)


def inference_time(net, repeats: int = 3) -> float:
    """Seconds per 128x128 query slice with S = 16, K = 1 (default batch), best of ``repeats``."""
    from napari_openseg.core.segment.inference import segment
    from napari_openseg.core.support import build_support_set

    rng = np.random.default_rng(0)
    volume = rng.random((32, 128, 128)).astype(np.float32)
    labels = np.zeros(volume.shape, np.uint8)
    labels[:, 40:90, 30:100] = 1
    support = build_support_set(volume[:16], labels[:16])
    segment(volume[:2], support, net, support_size=16, device="cpu", method="network")  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        segment(
            volume, support, net, support_size=16, device="cpu", keep_probabilities=False, method="network"
        )
        best = min(best, (time.perf_counter() - start) / len(volume))
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="weights name or file (default: openseg-default)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", nargs="+", help="only these families")
    parser.add_argument("--support-sizes", type=int, nargs="+", default=list(SUPPORT_SIZES))
    parser.add_argument("--ensembles", type=int, nargs="+", default=list(ENSEMBLES))
    parser.add_argument(
        "--ensemble-rule",
        default="area-matched",
        choices=RULES,
        help="how the K predictions are combined (napari_openseg.core.ensemble)",
    )
    parser.add_argument("--skip-pixel-classifier", action="store_true", help="a quicker run without it")
    parser.add_argument("--grid", type=int, help="run the weights on this grid instead of their own")
    parser.add_argument(
        "--selection",
        action="store_true",
        help="measure on the selection tasks (SELECTION_LABELS), not the reported ones",
    )
    parser.add_argument("--json", help="also write every number to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = shared_data_dir()
    if data is None:
        print("../shared/data is not present; nothing to measure", file=sys.stderr)
        return 1
    device = torch.device("cpu")
    nets, grid = networks(args.weights, ("network", "random_init"), args.seed, device)
    if args.grid:
        nets = {
            name: prepare_network(on_grid(network.net, args.grid), device) for name, network in nets.items()
        }
        grid = args.grid
    info = nets["network"].weights_info
    started = time.perf_counter()
    results: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        folders = family_folders(data, Path(scratch), args.selection)
        for family, (folder, subset, queries) in folders.items():
            if args.families and family not in args.families:
                continue
            _, tasks = run_to_end(load_tasks(folder, "val", subset))
            if family == "hippocampus" and not args.selection:  # the evaluation split is the training code's
                support_cases = {e.source for t in tasks for e in t.support}
                query_cases = {q.case for t in tasks for q in t.queries}
                splits = hippocampus_splits(data)
                assert support_cases <= set(splits["val"]) and query_cases <= set(splits["test"])
            for ensemble in args.ensembles:
                for size in args.support_sizes:
                    # Baselines that gain nothing from K are run at K=1 only (run time).
                    with_pixel = ensemble == 1 and not args.skip_pixel_classifier
                    methods = ["network", "label_prior"] + (["random_init"] if ensemble == 1 else [])
                    methods += ["pixel_classifier"] if with_pixel else []
                    tick = time.perf_counter()
                    scores = run_to_end(
                        iter_evaluate_tasks(
                            tasks,
                            nets,
                            grid,
                            methods=methods,
                            support_size=size,
                            ensemble=ensemble,
                            seed=args.seed,
                            max_queries=queries,
                            device=device,
                            ensemble_rule=args.ensemble_rule,
                        )
                    )
                    scores = {
                        k: dict(t, dice={("model" if m == "network" else m): v for m, v in t["dice"].items()})
                        for k, t in scores.items()
                    }  # the tables call the network "model"
                    methods = ["model" if m == "network" else m for m in methods]
                    means = {
                        m: float(np.mean([np.mean(t["dice"][m]) for t in scores.values()])) for m in methods
                    }
                    results.setdefault(family, {})[f"S{size}_K{ensemble}"] = {
                        "means": means,
                        "tasks": len(scores),
                        "queries": int(sum(len(t["dice"]["model"]) for t in scores.values())),
                        "per_task": {
                            k: {m: float(np.mean(v["dice"][m])) for m in methods} for k, v in scores.items()
                        },
                    }
                    print(
                        f"# {family} S={size} K={ensemble}: "
                        + ", ".join(f"{m} {v:.3f}" for m, v in means.items())
                        + f" ({time.perf_counter() - tick:.0f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
    seconds = inference_time(nets["network"])
    print_tables(results, args, info, seconds, time.perf_counter() - started)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "seconds_per_query": seconds}, indent=1))
    return 0


def cell(results: dict, family: str, key: str, method: str) -> str:
    value = results.get(family, {}).get(key, {}).get("means", {}).get(method)
    return "—" if value is None else f"{100 * value:.1f}"


def print_tables(results: dict, args, info: dict, seconds: float, elapsed: float) -> None:
    families = list(results)
    print(
        f"weights: {info.get('source', args.weights)} (step {info.get('step', '?')}); seed {args.seed}; "
        f"torch threads {args.threads}; K = 5 combined by the {args.ensemble_rule} rule; "
        "Dice in points (0-100), mean over tasks of the mean over query slices\n"
    )
    header = "| family | S | model K=1 | model K=5 | random K=1 | random K=5 | label prior K=1 | label prior K=5 | pixel classifier |"
    print(header)
    print("|" + "|".join(["---"] * 9) + "|")
    for family in families + ["mean of families"]:
        for size in args.support_sizes:
            row = [family, str(size)]
            for method, ensemble in (
                ("model", 1),
                ("model", 5),
                ("random_init", 1),
                ("random_init", 5),
                ("label_prior", 1),
                ("label_prior", 5),
                ("pixel_classifier", 1),
            ):
                key = f"S{size}_K{ensemble}"
                if family == "mean of families":
                    values = [results[f].get(key, {}).get("means", {}).get(method) for f in families]
                    values = [v for v in values if v is not None]
                    row.append(f"{100 * np.mean(values):.1f}" if values else "—")
                else:
                    row.append(cell(results, family, key, method))
            print("| " + " | ".join(row) + " |")
    counts = {
        f: (results[f][next(iter(results[f]))]["tasks"], results[f][next(iter(results[f]))]["queries"])
        for f in families
    }
    print("\ntasks / query slices per family: " + ", ".join(f"{f} {t}/{q}" for f, (t, q) in counts.items()))
    print(
        f"default model inference (grid {args.grid or 'of the weights'}): {1000 * seconds:.1f} ms per 128x128 "
        f"query slice at S=16, K=1 "
        f"(CPU, {args.threads} threads)"
    )
    print(f"benchmark run time: {elapsed / 60:.1f} min\n")
    print_goals(results, args)


def family_mean(results: dict, key: str, method: str) -> float | None:
    values = [r[key]["means"][method] for r in results.values() if method in r.get(key, {}).get("means", {})]
    return float(np.mean(values)) if values else None


def task_mean(results: dict, key: str, method: str) -> float | None:
    values = [
        t[method]
        for r in results.values()
        for t in r.get(key, {}).get("per_task", {}).values()
        if method in t
    ]
    return float(np.mean(values)) if values else None


def print_goals(results: dict, args) -> None:
    """The issue's goals, checked on the mean of families and on the mean of all tasks."""
    for name, mean in (("mean of families", family_mean), ("mean of all tasks", task_mean)):
        print(f"goals ({name}):")
        for size in args.support_sizes:
            key = f"S{size}_K1"
            model, prior, pixel = (
                mean(results, key, m) for m in ("model", "label_prior", "pixel_classifier")
            )
            if None in (model, prior, pixel):
                continue
            print(
                f"  S={size}: model - label prior = {100 * (model - prior):+.1f} points (goal >= +10: "
                f"{'met' if model - prior >= 0.10 else 'NOT met'}); model - pixel classifier = "
                f"{100 * (model - pixel):+.1f} ({'met' if model > pixel else 'NOT met'})"
            )
        curve = [mean(results, f"S{s}_K1", "model") for s in args.support_sizes]
        if None not in curve:
            rising = all(b >= a - 0.005 for a, b in zip(curve, curve[1:]))
            print(
                f"  model Dice by S {args.support_sizes}: {[round(100 * c, 1) for c in curve]} "
                f"({'rises' if rising else 'does NOT rise'} with S, 0.5-point tolerance)"
            )
        if 5 in args.ensembles and 1 in args.ensembles:
            gaps = [
                mean(results, f"S{s}_K5", "model") - mean(results, f"S{s}_K1", "model")
                for s in args.support_sizes
            ]
            print(
                f"  K=5 minus K=1 by S: {[round(100 * g, 1) for g in gaps]} "
                f"({'does not hurt' if min(gaps) >= -0.005 else 'HURTS somewhere'})"
            )


if __name__ == "__main__":
    sys.exit(main())

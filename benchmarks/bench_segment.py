"""Engine speed and memory: the direct formulation against the fast path, on one 3D volume.

The volume has 64 slices of 256x256 (smooth random shapes, two label values); the support set comes
from a second volume drawn the same way. For S = 8, 16, 64 it measures, through the engine
(``iter_segment_with``; the tasks are fitted before the timing, see ``--fit`` for that):

* ``direct``: the paper's formulation, one slice at a time, float32 (concatenate, then convolve);
* ``fast f32`` / ``fast bf16``: the fast path (query share once, first-block support terms once per
  volume, the last block on the support mean, batches of slices, channels-last) in float32/bfloat16.

Each configuration runs in a fresh subprocess so that its peak memory (resident set growth over the
state after loading) is its own. Masks are compared with the direct formulation on the slices both
ran (Dice, per task, averaged). With random weights the probabilities sit near 0.5, so the masks are
thresholded at the median of the direct probabilities; with trained weights (``--weights``) at 0.5.

    python benchmarks/bench_segment.py                      # official architecture, random weights
    python benchmarks/bench_segment.py --weights openseg-default
    python benchmarks/bench_segment.py --batch-sizes 1 2 4 8  # fast f32 only: slices per forward pass

``--batch-sizes`` times the fast float32 path with each batch size given, and the automatic one
(``auto``), for every S: the automatic choice is checked against what it could have picked.

``--ensembles 1 2 5`` times the fast float32 path (the default settings of ``openseg segment``) for
every S and each K, seconds per slice: what ``core/segment/expected_time.py`` quotes before a run. The
support volume has more entries per task than S, so every one of the K subsets is a distinct draw.

    python benchmarks/bench_segment.py --ensembles 1 2 5 --support-sizes 1 4 16 64 --slices 8 \
        --size 128 --threads 1 --weights openseg-default

``--fit 3 8 16 32`` times what a run does once before its first slice: the engine fits each task
(support cross-validation, ``core/stacking.py``) with ``--methods`` at each S, for tasks with that
many entries (two tasks, slices of one synthetic volume; CPU seconds per task). The weights are
loaded and the classifier imported before the timing. It is what ``core/segment/expected_time.py``
adds once to a run:

    python benchmarks/bench_segment.py --fit 3 8 16 32 --support-sizes 16 --size 128 --threads 1 \
        --weights openseg-default

``--volume`` times a whole volume's segmentation with each of ``--methods``, the tasks' fit
included (a fresh process per row; the kernels are warmed on another engine first): what a method
adds to a run, against ``network``:

    python benchmarks/bench_segment.py --volume --support-sizes 16 --slices 64 --size 256 --threads 1 \
        --weights openseg-default
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VARIANTS = {
    "direct": ("direct", "float32"),
    "fast f32": ("fast", "float32"),
    "fast bf16": ("fast", "bfloat16"),
    "fast f16": ("fast", "float16"),
}
#: float16 is refused on the CPU (slow there); it is measured on GPUs only.
GPU_ONLY = {"fast f16"}


def synthetic_volume(seed: int, slices: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Smooth blobs with two label values and an intensity per label, plus noise."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    field = gaussian_filter(rng.normal(size=(slices, size, size)), sigma=(3, 12, 12))
    labels = np.zeros(field.shape, np.uint8)
    labels[field > np.quantile(field, 0.85)] = 1
    labels[field < np.quantile(field, 0.1)] = 2
    image = 100 + 60 * (labels == 1) - 40 * (labels == 2) + rng.normal(0, 15, field.shape)
    return gaussian_filter(image, 1.0).astype(np.float32), labels


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def load_weights(weights: str):
    """The network of ``weights``: ``random-v1`` (the official architecture, seeded) or a name or file."""
    import torch

    from napari_openseg.model.registry import load_model, network_from_file
    from napari_openseg.model.universeg import UniverSeg

    if weights == "random-v1":
        refs = Path(__file__).resolve().parents[2] / "shared" / "refs" / "universeg_random_state.pt"
        torch.manual_seed(0)
        return network_from_file(refs) if refs.is_file() else UniverSeg().eval()
    return load_model(weights, "cpu")


def worker(args: argparse.Namespace) -> None:
    import torch

    from napari_openseg.core.engine import Engine
    from napari_openseg.core.progress import run_to_end
    from napari_openseg.core.segment.inference import iter_segment_with
    from napari_openseg.core.support import build_support_set

    if args.threads:
        torch.set_num_threads(args.threads)
    formulation, precision = VARIANTS[args.worker]
    query, _ = synthetic_volume(1, args.slices, args.size)
    support_image, support_labels = synthetic_volume(2, args.support_slices or args.slices, args.size)
    support = build_support_set(support_image, support_labels)
    net = load_weights(args.weights)
    slices = args.direct_slices if formulation == "direct" else args.slices
    volume = query[:slices]
    batch = args.worker_batch or None  # 0: the automatic choice
    if args.worker_method:  # --volume: the whole run, fit included, on a fresh engine
        volume_worker(args, support, net, query)
        return
    engine = Engine(
        support,
        net,
        device=args.device,
        method="network",
        support_size=args.support_size,
        precision=precision,
        formulation=formulation,
        ensemble=args.worker_ensemble,
    )
    options = dict(batch_size=1 if formulation == "direct" else batch)
    # The tasks are fitted (support check) once, before the timing: per slice is what is measured
    # here, the one-off check is --fit's.
    run_to_end(iter_segment_with(engine, volume[:1], **options))  # warm-up: allocator, kernels, fit
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = current_rss_mb()
    start, start_cpu = time.perf_counter(), time.process_time()
    result = run_to_end(iter_segment_with(engine, volume, **options))
    cpu_seconds = time.process_time() - start_cpu
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    # Agreement is checked on the direct run's input: intensities are normalised per volume, so the
    # first slices of a longer volume are not the same input as a volume of those slices alone.
    if slices != args.direct_slices:
        result = run_to_end(iter_segment_with(engine, query[: args.direct_slices], **options))
    np.save(args.out, result.probabilities)
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "slices": slices, "peak_mb": peak}))


def volume_worker(args: argparse.Namespace, support, net, volume: np.ndarray) -> None:
    """One whole run with ``--worker-method``: the engine fits its tasks, then segments every slice."""
    from napari_openseg.core.engine import Engine
    from napari_openseg.core.progress import run_to_end
    from napari_openseg.core.segment.inference import iter_segment_with

    def engine(method: str) -> Engine:
        return Engine(support, net, device=args.device, method=method, support_size=args.support_size)

    run_to_end(iter_segment_with(engine("network"), volume[:1]))  # warm-up on another engine
    timed = engine(args.worker_method)
    _, seconds, cpu_seconds = clocked(lambda: run_to_end(iter_segment_with(timed, volume)))
    ran = sorted({model.method for model in timed.fit().values()})  # cached: the run fitted them
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "slices": len(volume), "ran": ran}))


def clocked(call):
    """``(call(), wall seconds, CPU seconds of this process)``."""
    start, start_cpu = time.perf_counter(), time.process_time()
    result = call()
    return result, time.perf_counter() - start, time.process_time() - start_cpu


def volume_table(args: argparse.Namespace) -> None:
    """A whole volume per method and S, the fit included, each in a fresh process."""
    import torch

    print(
        f"# bench_segment --volume: {args.slices} slices of {args.size}x{args.size}, 2 tasks, weights "
        f"{args.weights}, threads {args.threads or torch.get_num_threads()}"
    )
    print("| S | method | method that ran | CPU s | wall s | CPU vs network |")
    print("|---|---|---|---|---|---|")
    for size in args.support_sizes:
        rows = {}
        for method in ["network", *(m for m in args.methods if m != "network")]:
            rows[method] = row = run_worker(args, "fast f32", size, Path("unused.npy"), method=method)
            print(
                f"| {size} | {method} | {', '.join(row['ran'])} | {row['cpu_seconds']:.1f} | "
                f"{row['seconds']:.1f} | {row['cpu_seconds'] / rows['network']['cpu_seconds']:.2f}x |",
                flush=True,
            )


def fit_worker(args: argparse.Namespace) -> None:
    """Fit two tasks of ``--fit-entries`` entries each once, timed (CPU and wall)."""
    import torch

    from napari_openseg.core.engine import Engine
    from napari_openseg.core.pixel_classifier import PixelClassifier
    from napari_openseg.core.support import build_support_set

    if args.threads:
        torch.set_num_threads(args.threads)
    entries = args.fit_entries
    image, labels = synthetic_volume(2, 2 * entries + 16, args.size)
    both = [z for z in range(len(labels)) if {1, 2} <= set(np.unique(labels[z]))][:entries]
    if len(both) < entries:
        sys.exit(f"the synthetic volume has {len(both)} slices with both labels, {entries} asked for")
    support = build_support_set(image, labels, slice_indices=both)
    net = load_weights(args.weights)
    engine = Engine(support, net, device="cpu", method=args.fit_method, support_size=args.support_size)
    engine.network.predict(support.task(1)[0].image[None], [support.task(1)[:1]])  # warm-up: kernels
    rows = np.random.default_rng(0).normal(size=(64, 4))  # warm-up: the classifier's import
    PixelClassifier().fit(rows, rows[:, 0] > 0)
    models, seconds, cpu_seconds = clocked(engine.fit)
    methods = sorted({model.method for model in models.values()})
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "tasks": len(models), "ran": methods}))


def fit_table(args: argparse.Namespace) -> None:
    """The engine's fit per entry count, method and S, each in a fresh process."""
    import torch

    print(
        f"# bench_segment --fit: two tasks, slices of {args.size}x{args.size}, weights {args.weights}, "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads {args.threads or torch.get_num_threads()}"
    )
    print("| entries per task | S | method | CPU s per task | wall s per task | method that runs |")
    print("|---|---|---|---|---|---|")
    for entries in args.fit:
        for size in args.support_sizes:
            for method in args.methods:
                command = [
                    *(sys.executable, __file__, "--fit-worker", "--fit-entries", str(entries)),
                    *("--fit-method", method, "--support-size", str(size), "--size", str(args.size)),
                    *("--weights", args.weights, "--threads", str(args.threads)),
                ]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"fit of {entries} entries, S={size}, {method} failed:\n{done.stderr}")
                row = json.loads(done.stdout.strip().splitlines()[-1])
                tasks = row["tasks"]
                print(
                    f"| {entries} | {size} | {method} | {row['cpu_seconds'] / tasks:.2f} | "
                    f"{row['seconds'] / tasks:.2f} | {', '.join(row['ran'])} |",
                    flush=True,
                )


def run_worker(
    args: argparse.Namespace,
    name: str,
    size: int,
    out: Path,
    batch: int = 0,
    ensemble: int = 1,
    method: str = "",
) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        name,
        "--support-size",
        str(size),
        "--out",
        str(out),
        "--slices",
        str(args.slices),
        "--size",
        str(args.size),
        "--direct-slices",
        str(args.direct_slices),
        "--weights",
        args.weights,
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--worker-batch",
        str(batch),
        "--worker-ensemble",
        str(ensemble),
        "--support-slices",
        str(args.support_slices),
    ] + (["--worker-method", method] if method else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{name} S={size} batch {batch or 'auto'} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def batch_table(args: argparse.Namespace) -> None:
    """Fast float32 at each batch size (0 = automatic), each in a fresh process."""
    import torch

    from napari_openseg.core.engine import auto_batch_size

    print(
        f"# bench_segment --batch-sizes: {args.slices} slices of {args.size}x{args.size}, weights "
        f"{args.weights}, device {args.device}, threads {args.threads or torch.get_num_threads()}"
    )
    print("| S | batch | slices/s | peak memory (MB) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.support_sizes:
            auto = auto_batch_size(size, torch.device(args.device))
            for batch in [0, *args.batch_sizes]:
                row = run_worker(args, "fast f32", size, Path(tmp) / "p.npy", batch)
                label = f"auto ({auto})" if batch == 0 else str(batch)
                print(
                    f"| {size} | {label} | {row['slices'] / row['seconds']:.2f} | {row['peak_mb']:.0f} |",
                    flush=True,
                )


def ensemble_table(args: argparse.Namespace) -> None:
    """Fast float32 with the automatic batch size at each S and K, each in a fresh process."""
    import torch

    threads = args.threads or torch.get_num_threads()
    # more entries per task than the largest S, so that each of the K subsets is a distinct draw
    args.support_slices = max(args.slices, 2 * max(args.support_sizes) + 8)
    print(
        f"# bench_segment --ensembles: {args.slices} slices of {args.size}x{args.size}, 2 tasks, weights "
        f"{args.weights}, device {args.device}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"threads {threads}"
    )
    # CPU time is what the process used (all its threads): on a machine shared with other work it is
    # what the run would take alone, where the wall clock also counts the waiting.
    print(
        "| S | K | wall s per slice (2 tasks) | CPU s per slice (2 tasks) | CPU s per slice and task | "
        "peak memory (MB) |"
    )
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.support_sizes:
            for ensemble in args.ensembles:
                row = run_worker(args, "fast f32", size, Path(tmp) / "p.npy", ensemble=ensemble)
                wall, cpu = row["seconds"] / row["slices"], row["cpu_seconds"] / row["slices"]
                print(
                    f"| {size} | {ensemble} | {wall:.3f} | {cpu:.3f} | {cpu / 2:.3f} | {row['peak_mb']:.0f} |",
                    flush=True,
                )


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--support-sizes", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--direct-slices", type=int, default=8, help="slices the (slow) direct path runs")
    parser.add_argument("--weights", default="random-v1", help="random-v1 (default), a name or a file")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--support-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="time fast f32 with these batch sizes")
    parser.add_argument("--worker-batch", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--ensembles", type=int, nargs="+", help="time fast f32 with these ensemble sizes K")
    parser.add_argument("--worker-ensemble", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--support-slices", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--fit", type=int, nargs="+", help="time the engine's fit at these entries per task")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["auto", "stacked", "network", "pixel-classifier"],
        help="for --fit and --volume",
    )
    parser.add_argument(
        "--volume", action="store_true", help="time a whole volume per --methods, the fit included"
    )
    parser.add_argument("--worker-method", default="", help=argparse.SUPPRESS)
    parser.add_argument("--fit-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fit-entries", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fit-method", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fit_worker:
        fit_worker(args)
        return
    if args.worker:
        worker(args)
        return
    if args.fit:
        fit_table(args)
        return
    if args.volume:
        volume_table(args)
        return
    if args.batch_sizes:
        batch_table(args)
        return
    if args.ensembles:
        ensemble_table(args)
        return

    import torch

    print(
        f"# bench_segment: {args.slices} slices of {args.size}x{args.size}, weights {args.weights}, "
        f"device {args.device}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"threads {args.threads or torch.get_num_threads()}"
    )
    print(
        "| S | variant | slices timed | slices/s | speed-up vs direct | peak memory (MB) | mask Dice vs direct |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.support_sizes:
            rows, probs = {}, {}
            for name in VARIANTS:
                if name in GPU_ONLY and not args.device.startswith("cuda"):
                    continue
                out = Path(tmp) / f"{name.replace(' ', '_')}_{size}.npy"
                rows[name] = run_worker(args, name, size, out)
                probs[name] = np.load(out)
            reference = probs["direct"]
            threshold = float(np.median(reference)) if args.weights == "random-v1" else 0.5
            direct_rate = rows["direct"]["slices"] / rows["direct"]["seconds"]
            for name, row in rows.items():
                rate = row["slices"] / row["seconds"]
                agree = np.mean(
                    [
                        dice(reference[c] > threshold, probs[name][c] > threshold)
                        for c in range(reference.shape[0])
                    ]
                )
                print(
                    f"| {size} | {name} | {row['slices']} | {rate:.2f} | {rate / direct_rate:.2f}x | "
                    f"{row['peak_mb']:.0f} | {agree:.4f} |",
                    flush=True,
                )
    if args.weights == "random-v1":
        print("\nmask threshold: median of the direct probabilities (random weights)")


if __name__ == "__main__":
    main()

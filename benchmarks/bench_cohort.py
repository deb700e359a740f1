"""Cohort throughput: ``openseg batch segment`` on 1 and 2 Dask workers against the plain ``openseg segment``
loop, on the same hippocampus volumes (../shared), with each worker's peak memory.

The support set is built from two subjects' labels; the next ``--volumes`` subjects are segmented. Each
configuration is a fresh ``openseg`` process, timed from start to exit (cluster start and shutdown, model
loading, reading and writing included); a thread samples the resident set of that process and of every
process it starts (the Dask workers) every 0.1 s. The results of every configuration are compared with
the loop's. The load average before and after each configuration is printed: the machine may be shared.

    nice -n 5 python benchmarks/bench_cohort.py                   # 20 volumes, S = 8, K = 1
    nice -n 5 python benchmarks/bench_cohort.py --volumes 4 --configs loop workers1   # a quick check
    nice -n 5 python benchmarks/bench_cohort.py --volumes 6 --support-size 4 --label-values 1 --threads 1
        # docs/performance.md (2026-12-03), about 10 minutes on a busy 2-core machine

Stage times for the on-paper analysis (reading a volume, loading the model and support set, writing)
are measured in this process at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CONFIGS = {
    "loop": [],  # the plain `openseg segment` over all inputs, one process
    "none": ["--scheduler", "none"],  # the cohort code in one process, without Dask
    "workers1": ["--workers", "1"],
    "workers2": ["--workers", "2"],
}


def peak_memory(pid: int, stop: threading.Event, peaks: dict[int, tuple[str, float]]) -> None:
    """Sample the RSS (MB) of ``pid`` and its descendants until ``stop``; keep each process's peak."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not stop.is_set():
        try:
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for proc in processes:
            try:
                rss = proc.memory_info().rss / 2**20
                role = "main" if proc.pid == pid else "worker"
            except psutil.NoSuchProcess:
                continue
            if rss > peaks.get(proc.pid, ("", 0.0))[1]:
                peaks[proc.pid] = (role, rss)
        stop.wait(0.1)


def run_config(
    name: str, volumes: list[Path], support: Path, out: Path, options: list[str], env: dict[str, str]
) -> dict:
    command = ["openseg", "segment" if name == "loop" else "batch"]
    if name != "loop":
        command.append("segment")
    command += [
        *map(str, volumes),
        "--support",
        str(support),
        "--out-dir",
        str(out),
        *options,
        *CONFIGS[name],
    ]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peaks: dict[int, tuple[str, float]] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=peak_memory, args=(process.pid, stop, peaks), daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{name} failed ({process.returncode}):\n{stdout}\n{stderr[-3000:]}")
    workers = [rss for role, rss in peaks.values() if role == "worker" and rss > 100]
    main = max((rss for role, rss in peaks.values() if role == "main"), default=0.0)
    return {
        "name": name,
        "seconds": seconds,
        "main_mb": main,
        "worker_mb": max(workers, default=0.0),
        "workers": len(workers),
        "load": (load_before, os.getloadavg()[0]),
    }


def same_results(reference: Path, other: Path) -> bool:
    import numpy as np

    from napari_openseg.io import read_image

    for path in sorted(reference.glob("*_openseg.nii.gz")):
        twin = other / path.name.replace("_openseg", "_labels")
        if not np.array_equal(read_image(path).data, read_image(twin).data):
            return False
    return True


def stage_times(volumes: list[Path], support: Path, options: dict) -> dict[str, float]:
    """Seconds per volume to read and to write, to prepare a worker (support set and network: the
    engine), and to fit the engine's tasks (support encoding; cross-validation for method auto), which a
    worker does once, on its first item."""
    import numpy as np

    from napari_openseg.core.cohort.tasks import SegmentTask
    from napari_openseg.io import ImageData, read_image, write_image
    from napari_openseg.model.registry import clear_cache

    started = time.perf_counter()
    images = [read_image(path) for path in volumes]
    read = (time.perf_counter() - started) / len(volumes)
    clear_cache()
    started = time.perf_counter()
    task = SegmentTask(support, options["weights"], {k: v for k, v in options.items() if k != "weights"})
    engine = task.prepare()
    prepare = time.perf_counter() - started
    started = time.perf_counter()
    engine.fit()
    encode = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        for index, image in enumerate(images):
            write_image(
                Path(folder) / f"{index}.nii.gz", (image.data > image.data.mean()).astype(np.uint8), image
            )
        write = (time.perf_counter() - started) / len(volumes)
        # a CT-sized volume (512 x 512 x 300 int16, smooth anatomy-like shapes plus noise) for the paper
        # analysis: how long reading takes when volumes are large
        rng = np.random.default_rng(0)
        zz, yy, xx = np.ogrid[:300, :512, :512]
        body = (((yy - 256) ** 2 + (xx - 256) ** 2 < 220**2) * (900 + 100 * np.sin(zz / 20.0))).astype(
            np.float32
        )
        ct = (body + 30 * rng.standard_normal((300, 512, 512), dtype=np.float32) - 1000).astype(np.int16)
        del body
        big = Path(folder) / "ct.nii.gz"
        write_image(big, ct, ImageData(ct, spacing=(1.0, 0.8, 0.8)))
        started = time.perf_counter()
        read_image(big)
        ct_read = time.perf_counter() - started
        ct_mb = big.stat().st_size / 2**20
    voxels = float(np.mean([image.data.size for image in images]))
    return {
        "read": read,
        "prepare": prepare,
        "write": write,
        "encode": encode,
        "ct_read": ct_read,
        "ct_mb": ct_mb,
        "voxels": voxels,
        "slices": float(np.mean([image.data.shape[0] for image in images])),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volumes", type=int, default=20)
    parser.add_argument("--support-size", type=int, default=8)
    parser.add_argument(
        "--configs", nargs="+", default=["loop", "workers1", "workers2"], choices=list(CONFIGS)
    )
    parser.add_argument("--label-values", type=int, nargs="+", help="only these tasks (default: both)")
    parser.add_argument("--weights", default="openseg-default")
    parser.add_argument(
        "--threads", type=int, help="torch threads per item in every configuration (OMP_NUM_THREADS)"
    )
    parser.add_argument("--keep", help="keep the outputs in this folder")
    args = parser.parse_args()

    from napari_openseg.training.splits import shared_data_dir

    shared = shared_data_dir()
    data = shared / "msd_task04_hippocampus" if shared is not None else None
    if data is None or not (data / "imagesTr").is_dir():
        print("skipped: ../shared/data/msd_task04_hippocampus is not present")
        return 0
    files = sorted((data / "imagesTr").glob("*.nii.gz"))
    if len(files) < args.volumes + 2:
        print(f"skipped: {len(files)} volumes, {args.volumes + 2} needed")
        return 0
    subjects, volumes = files[:2], files[2 : 2 + args.volumes]
    root = Path(args.keep or tempfile.mkdtemp(prefix="bench_cohort_"))
    root.mkdir(parents=True, exist_ok=True)
    support = root / "support.npz"
    build = ["openseg", "support", "build", "--out", str(support), "--overwrite"]
    for subject in subjects:
        build += ["--image", str(subject), "--labels", str(data / "labelsTr" / subject.name)]
    subprocess.run(build, check=True, capture_output=True)
    options = ["--support-size", str(args.support_size), "--device", "cpu", "--weights", args.weights]
    if args.label_values:
        options += ["--label-values", *map(str, args.label_values)]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)

    import torch

    print(
        f"{len(volumes)} volumes ({volumes[0].name} .. {volumes[-1].name}), support from "
        f"{', '.join(s.name for s in subjects)}, S = {args.support_size}, K = 1, tasks "
        f"{args.label_values or 'all'}, weights {args.weights}, torch threads per item {args.threads or 'default'}, cpu, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    rows = []
    for name in args.configs:
        out = root / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        row = run_config(name, volumes, support, out, options, env)
        row["same"] = (
            "reference"
            if name == "loop"
            else (same_results(root / "loop", out) if (root / "loop").is_dir() else "n/a")
        )
        rows.append(row)
        print(f"  {name}: {row['seconds']:.1f} s", flush=True)
    loop = next((r["seconds"] for r in rows if r["name"] == "loop"), None)
    print(
        "\n| configuration | wall time (s) | volumes/min | vs loop | peak RSS main (MB) | peak RSS per worker (MB) "
        "| results as the loop's | load avg before / after |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        ratio = f"{loop / row['seconds']:.2f}x" if loop else "n/a"
        plural = "s" if row["workers"] > 1 else ""
        worker = f"{row['worker_mb']:.0f} ({row['workers']} worker{plural})" if row["workers"] else "-"
        print(
            f"| {row['name']} | {row['seconds']:.1f} | {60 * len(volumes) / row['seconds']:.2f} | {ratio} | "
            f"{row['main_mb']:.0f} | {worker} | {row['same']} | {row['load'][0]:.1f} / {row['load'][1]:.1f} |"
        )
    engine = {"weights": args.weights, "support_size": args.support_size, "device": "cpu"}
    if args.label_values:
        engine["label_values"] = args.label_values
    stages = stage_times(volumes, support, engine)
    print(
        f"\nper volume ({stages['slices']:.0f} slices, {stages['voxels'] / 1e3:.0f} k voxels on average): "
        f"read {1e3 * stages['read']:.1f} ms, write {1e3 * stages['write']:.1f} ms; "
        f"worker preparation (support set + network) {stages['prepare']:.2f} s; fitting the tasks "
        f"(once per worker) {1e3 * stages['encode']:.1f} ms; reading a "
        f"512 x 512 x 300 int16 volume ({stages['ct_mb']:.0f} MB .nii.gz) {stages['ct_read']:.2f} s"
    )
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

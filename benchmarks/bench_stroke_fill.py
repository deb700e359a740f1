"""What filling stroke masks by a random walk (core/fill.py) costs when a task is fitted.

For a few task-bank sets: the first val task's support reduced to strokes as ``bench_engine.py
--strokes`` reduces it (seed 0), its first 32 entries fitted by the engine (``method="auto"``, S = 16,
K = 1, one thread), with the walk and with the walk replaced by none (the classifier alone fills),
``--repeats`` times each in turn after one warm-up fit. Prints CPU seconds per fit.

Run: ``python benchmarks/bench_stroke_fill.py`` (about 4 min on one core). Needs ../shared.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: shared CPUs

import torch  # noqa: E402

import napari_openseg.core.stacking as stacking  # noqa: E402
from napari_openseg.core.engine import Engine  # noqa: E402
from napari_openseg.training.splits import shared_data_dir  # noqa: E402
from napari_openseg.training.taskbank import discover  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import set_tasks, stroke_tasks  # noqa: E402

SETS = ("hc18_fetal_head", "usgra_ultrasound", "msd_task04_hippocampus")


def fit_seconds(entries) -> float:
    started = time.process_time()
    Engine(entries, None, device="cpu", support_size=16).fit()
    return time.process_time() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    parser.add_argument("--entries", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = shared_data_dir()
    if data is None:
        raise SystemExit("needs ../shared/data")
    walk = stacking.walk
    print("| set | entry size | entries | fit with the walk, CPU s | without, CPU s | walk adds |")
    print("|---|---|---|---|---|---|")
    for dataset in discover(data):
        if dataset.name not in args.sets:
            continue
        task = set_tasks(dataset, data, "val", None)[0]
        entries = stroke_tasks([task], 0.2, 0)[0].support[: args.entries]
        fit_seconds(entries)  # warm-up: kernels, caches
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats):
            for walked in (True, False):
                stacking.walk = walk if walked else (lambda entry: None)
                times[walked].append(fit_seconds(entries))
        stacking.walk = walk
        on, off = (min(times[w]) for w in (True, False))
        size = " x ".join(str(n) for n in entries[0].image.shape)
        print(
            f"| {dataset.name} | {size} | {len(entries)} | {on:.1f} | {off:.1f} | {100 * (on / off - 1):+.0f} % |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training throughput on this CPU: synthetic task generation, augmentation and one training step.

    python benchmarks/bench_training.py [--threads 2] [--grids 64 128]

Prints a Markdown table (it goes into docs/performance.md, section "Training"). Each figure is the
median of ``--repeats`` timings after one warm-up; a training step is batch 8 at support size 8
(fast formulation, Adam, soft Dice), as in `openseg train`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: shared CPUs

import torch  # noqa: E402

from napari_openseg.model.fast import fast_forward  # noqa: E402
from napari_openseg.model.universeg import build_network  # noqa: E402
from napari_openseg.training.incontext.augment import augment_entries, augment_task  # noqa: E402
from napari_openseg.training.incontext.episodes import EpisodeConfig, soft_dice_loss, training_batch  # noqa: E402
from napari_openseg.training.incontext.synth import SynthConfig, synthetic_task  # noqa: E402


def timed(function, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grids", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    print(
        f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs visible, "
        f"load average {os.getloadavg()[0]:.1f} at start\n"
    )
    print(
        "| grid | synthetic images/s | augmented images/s (in-task + task) | batch (B=8, S=8) s | train step s | images/s through a step |"
    )
    print("|---|---|---|---|---|---|")
    for grid in args.grids:
        row = measure(grid, args.repeats)
        print(
            f"| {grid} | {row['synthetic']:.0f} | {row['augmented']:.0f} | {row['batch']:.2f} | "
            f"{row['step']:.2f} | {72 / (row['step'] + row['batch']):.0f} |"
        )


def measure(grid: int, repeats: int) -> dict[str, float]:
    """Rates (images/s) and times (s) at one grid size."""
    synth = SynthConfig(size=grid)
    counter = iter(range(10**9))
    seconds = timed(lambda: synthetic_task((0, next(counter)), 9, synth), repeats)
    images, masks = synthetic_task((0, 0), 9, synth)
    gen = torch.Generator().manual_seed(0)
    augmented = timed(lambda: augment_task(*augment_entries(images, masks, gen), gen), repeats)
    config = EpisodeConfig(batch_size=8, support_min=8, support_max=8, real_fraction=0.0)
    batch_time = timed(lambda: training_batch(next(counter), 0, config, None, synth), repeats)
    torch.manual_seed(0)
    net = build_network((32, 32, 32, 32), grid_size=grid).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    batch = training_batch(0, 0, config, None, synth)
    query = batch.query.contiguous(memory_format=torch.channels_last)

    def step():
        loss = soft_dice_loss(
            fast_forward(net, query, batch.support_images, batch.support_masks), batch.query_masks
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return {
        "synthetic": 9 / seconds,
        "augmented": 9 / augmented,
        "batch": batch_time,
        "step": timed(step, repeats),
    }


if __name__ == "__main__":
    main()

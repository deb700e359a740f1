"""How long an in-context segmentation will take, said before it runs, from a measured table.

The table is ``benchmarks/bench_segment.py --ensembles`` with the bundled weights, fast float32, on
one thread of the development CPU (docs/performance.md, *Time per slice*). A run costs, per slice,
the sum over its tasks of the time at that task's S and K; a task with no more entries than S draws
one subset however large K is (so K costs nothing there, and gives nothing). The figures are the reference machine's: another CPU, more
threads or other weights change them, which is why the widgets and the command line also show the
pace they measure once the run has started.

Torch-free: the command line and the widgets call it before any weights are loaded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

#: CPU seconds per slice and task on one thread, fast float32, by support size S and ensemble size K
#: (``bench_segment.py --ensembles 1 2 5 --support-sizes 1 4 16 64 --slices 32 --size 128 --threads 1
#: --weights openseg-default``, docs/performance.md).
CPU_SECONDS_PER_TASK: dict[int, dict[int, float]] = {
    1: {1: 0.057, 2: 0.133, 5: 0.314},
    4: {1: 0.093, 2: 0.177, 5: 0.438},
    16: {1: 0.262, 2: 0.556, 5: 1.403},
    64: {1: 0.936, 2: 1.855, 5: 4.935},
}

#: How many times a CUDA GPU ran the official architecture faster than the 2-core development CPU
#: (NVIDIA H100 against 2 threads, S = 16, docs/performance.md): said when a run would be long.
GPU_SPEED_UP = 100

#: Expected runs longer than this (seconds) get the GPU sentence.
LONG_RUN_SECONDS = 120.0


def _between(points: dict[int, float], x: int) -> float:
    """``points`` (x -> y) at ``x``: linear between the two neighbours, and beyond the ends along the
    line through the last two (never below the nearest measured value)."""
    xs = sorted(points)
    if x in points:
        return points[x]
    below = [v for v in xs if v < x]
    above = [v for v in xs if v > x]
    if below and above:
        low, high = below[-1], above[0]
    elif above:  # below the table: the first row is the least it costs
        return points[above[0]]
    else:
        low, high = xs[-2], xs[-1]
    slope = (points[high] - points[low]) / (high - low)
    return max(points[low] + slope * (x - low), points[high] if x > high else 0.0)


def seconds_per_task(support_size: int, ensemble: int = 1) -> float:
    """CPU seconds per slice of one task at S entries and K members: the table, linear between its
    rows and columns and beyond the last."""
    size, members = max(1, int(support_size)), max(1, int(ensemble))
    by_size = {s: _between(row, members) for s, row in CPU_SECONDS_PER_TASK.items()}
    return _between(by_size, size)


def seconds_per_slice(
    task_entries: Mapping[int, int] | Iterable[int], support_size: int, ensemble: int
) -> float:
    """Expected CPU seconds per slice for tasks with these entry counts (``{label: entries}`` or the
    counts alone), at support size S and ensemble size K (one thread of the reference CPU)."""
    counts = task_entries.values() if isinstance(task_entries, Mapping) else task_entries
    total = 0.0
    for entries in counts:
        drawn = min(int(support_size), int(entries))
        members = int(ensemble) if entries > support_size else 1  # one draw when it is the whole task
        total += seconds_per_task(drawn, members)
    return total


def describe_expected_time(
    n_slices: int,
    task_entries: Mapping[int, int],
    support_size: int,
    ensemble: int,
    on_gpu: bool = False,
) -> str:
    """One sentence for before a run: time per slice and in all, and when a GPU would help."""
    if on_gpu:
        return "on a GPU: no measured time for these weights; the progress bar shows the pace"
    per_slice = seconds_per_slice(task_entries, support_size, ensemble)
    total = per_slice * max(1, int(n_slices))
    tasks = len(task_entries)
    drawn = sorted({min(int(support_size), int(n)) for n in task_entries.values()})
    used = (
        ""
        if drawn == [support_size]
        else f" (here {drawn[0]}" + (f"-{drawn[-1]})" if len(drawn) > 1 else ")")
    )
    text = (
        f"expected about {format_duration(per_slice)} per slice ({tasks} task{'s' if tasks != 1 else ''}, "
        f"S={support_size}{used}, K={ensemble}, one thread of the reference CPU), about "
        f"{format_duration(total)} for {n_slices} slice{'s' if n_slices != 1 else ''}"
    )
    unused = [n for n in task_entries.values() if n <= support_size]
    if ensemble > 1 and len(unused) == tasks:
        text += f"; K={ensemble} changes nothing here: no task has more than S entries"
    if total > LONG_RUN_SECONDS:
        text += f"; a CUDA GPU ran this architecture about {GPU_SPEED_UP} times faster (docs/performance.md)"
    return text


def format_duration(seconds: float) -> str:
    """``"0.12 s"``, ``"8.5 s"``, ``"42 s"``, ``"3 min 20 s"``, ``"1 h 5 min"``: as a person reads it at a
    glance (used for expected times and for the time left of a running job)."""
    seconds = max(0.0, float(seconds))
    if seconds < 1:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s" if minutes < 10 and rest else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"

"""How long an in-context segmentation will take, said before it runs, from a measured table.

The table is ``benchmarks/bench_segment.py --ensembles`` with the bundled weights, fast float32, on
one thread of the development CPU (docs/performance.md, *Time per slice*). A run costs, per slice,
the sum over its tasks of the time at that task's S and K; a task with no more entries than S draws
one subset however large K is (so K costs nothing there, and gives nothing).

Before its first slice a run fits each task once (:mod:`~napari_openseg.core.stacking`): a task with
at least ``MIN_CV_ENTRIES`` entries is cross-validated on its support (up to ``MAX_FIT_ENTRIES``
of them) with every method the run may use: the network's out-of-fold predictions for ``network``,
the pixel classifier's fits per fold for ``pixel-classifier``, both and the stacked classifier's for
``stacked`` and ``auto``. Smaller tasks are not checked; ``pixel-classifier`` still fits its
classifier to them. That one-off time is a second measured table, ``bench_segment.py --fit``
(:func:`check_seconds_per_task`). Stroke support (painted pixels only) also fits the pixel
classifier for ``network``, which the table does not count.

The figures are the reference machine's: another CPU, more threads or other weights change them,
which is why the widgets and the command line also show the pace they measure once the run has
started.

Methods that run the pixel classifier add its features and predictions to every slice, by slice
size: a third table, ``bench_classifier_slices.py`` (:func:`seconds_per_slice`). ``auto`` is
counted as ``stacked``: what it runs on tasks of 3 to 11 entries, and the dearest method it may
choose for larger ones (where the sentence then says "up to").

Torch-free: the command line and the widgets call it before any weights are loaded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from napari_openseg.core.engine_settings import (
    CHOICES,
    DEFAULT_FOLDS,
    DEFAULT_METHOD,
    MAX_FIT_ENTRIES,
    MIN_CHOICE_ENTRIES,
    MIN_CV_ENTRIES,
    check_choice,
)

#: CPU seconds per slice and task on one thread, fast float32, by support size S and ensemble size K
#: (``bench_segment.py --ensembles 1 2 5 --support-sizes 1 4 16 64 --slices 16 --size 128 --threads 1
#: --weights openseg-default``, quiet machine, 2026-12-07; docs/performance.md).
CPU_SECONDS_PER_TASK: dict[int, dict[int, float]] = {
    1: {1: 0.038, 2: 0.072, 5: 0.169},
    4: {1: 0.047, 2: 0.098, 5: 0.236},
    16: {1: 0.131, 2: 0.246, 5: 0.616},
    64: {1: 0.510, 2: 0.934, 5: 2.592},
}

#: CPU seconds per slice that the pixel classifier adds, by the side of a square slice: the filter
#: features (once per slice) and one task's prediction by the plain and the stacked classifier
#: (coarse to fine above 128 x 128, hence about the same at 256 x 256 as at 128 x 128), on one
#: thread (``bench_classifier_slices.py --sizes 64 128 256 512 --slices 8``, synthetic slices, quiet
#: machine, 2026-12-07; docs/performance.md). Between and beyond the rows it follows the pixel count.
CPU_CLASSIFIER_SECONDS: dict[int, dict[str, float]] = {
    64: {"features": 0.004, "pixel-classifier": 0.011, "stacked": 0.016},
    128: {"features": 0.013, "pixel-classifier": 0.061, "stacked": 0.054},
    256: {"features": 0.033, "pixel-classifier": 0.059, "stacked": 0.071},
    512: {"features": 0.161, "pixel-classifier": 0.217, "stacked": 0.267},
}
#: The slice size the expected time assumes when the caller does not know it: the model grid.
GRID_PIXELS = 128 * 128

#: CPU seconds of the one-off support check per task, by method and entries per task, at S =
#: :data:`CHECK_SUPPORT_SIZE`, synthetic 128 x 128 slices, on one thread (``bench_segment.py --fit 3 8
#: 16 32 --support-sizes 16 --size 128 --threads 1 --weights openseg-default``, and ``--fit 2`` for the
#: pixel classifier's fit without a check; docs/performance.md). ``auto`` and ``stacked`` cost about
#: the same: both cross-validate the network and both classifiers.
CPU_CHECK_SECONDS_PER_TASK: dict[str, dict[int, float]] = {
    "auto": {3: 1.52, 8: 2.66, 16: 5.25, 32: 10.55},
    "stacked": {3: 1.45, 8: 2.45, 16: 4.99, 32: 10.36},
    "network": {3: 0.16, 8: 0.56, 16: 2.06, 32: 6.26},
    "pixel-classifier": {2: 0.20, 3: 0.68, 8: 1.05, 16: 1.63, 32: 2.43},
}
#: The S of :data:`CPU_CHECK_SECONDS_PER_TASK`; at another S the network's share (its row) is scaled
#: as the time per slice scales between the two.
CHECK_SUPPORT_SIZE = 16
#: Methods whose check runs the network on every held-out entry.
CHECK_RUNS_NETWORK = ("auto", "stacked", "network")

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


def slice_method(entries: int, method: str) -> str:
    """What a task of ``entries`` entries runs on each slice, as far as it is known before the run:
    tasks too small to check run the network unless the pixel classifier was asked for, and
    ``auto`` counts as ``stacked``: what it runs on tasks too small to choose by, the dearest
    method it may choose on larger ones (:func:`per_slice_phrase`)."""
    check_choice("method", method, CHOICES)
    if method == "pixel-classifier":
        return method
    return "network" if method == "network" or entries < MIN_CV_ENTRIES else "stacked"


def pixels_per_slice(spatial: Sequence[int], axis: int = 0) -> int:
    """Pixels in one slice of an image of ``spatial`` shape: a 2D image whole, a volume without its
    slice ``axis``."""
    dims = list(spatial)
    if len(dims) == 3:
        del dims[axis]
    return math.prod(dims)


def classifier_seconds(part: str, pixels: int) -> float:
    """CPU seconds per slice of ``part`` of :data:`CPU_CLASSIFIER_SECONDS` (``"features"``,
    ``"pixel-classifier"`` or ``"stacked"``) on slices of ``pixels`` pixels."""
    by_pixels = {side * side: row[part] for side, row in CPU_CLASSIFIER_SECONDS.items()}
    return _between(by_pixels, max(1, int(pixels)))


def seconds_per_slice(
    task_entries: Mapping[int, int] | Iterable[int],
    support_size: int,
    ensemble: int,
    method: str = "network",
    pixels: int = GRID_PIXELS,
) -> float:
    """Expected CPU seconds per slice for tasks with these entry counts (``{label: entries}`` or the
    counts alone), at support size S and ensemble size K, with ``method`` on slices of ``pixels``
    pixels (one thread of the reference CPU): the network's time for the tasks that run it, the
    classifier's prediction for those that run one, and its features once (:func:`slice_method`)."""
    counts = task_entries.values() if isinstance(task_entries, Mapping) else task_entries
    total, features = 0.0, False
    for entries in counts:
        runs = slice_method(int(entries), method)
        if runs != "pixel-classifier":
            drawn = min(int(support_size), int(entries))
            members = int(ensemble) if entries > support_size else 1  # one draw when it is the whole task
            total += seconds_per_task(drawn, members)
        if runs != "network":
            total += classifier_seconds(runs, pixels)
            features = True
    return total + (classifier_seconds("features", pixels) if features else 0.0)


def _out_of_fold_network(entries: int, support_size: int) -> float:
    """Seconds per slice times queries of the check's network: each fold's entries predicted from up
    to S entries of the other folds (folds as even as they can be)."""
    folds = min(DEFAULT_FOLDS, entries)
    total = 0.0
    for fold in range(folds):
        held = entries // folds + (1 if fold < entries % folds else 0)
        total += held * seconds_per_task(min(support_size, entries - held))
    return total


def check_seconds_per_task(entries: int, support_size: int, method: str = DEFAULT_METHOD) -> float:
    """CPU seconds (one thread of the reference CPU) that a run spends once, before its first slice,
    fitting one task of ``entries`` entries with ``method``: the support check (see the module
    docstring); 0 for a task the run does not fit (fewer than ``MIN_CV_ENTRIES`` entries, any method
    but ``pixel-classifier``)."""
    check_choice("method", method, CHOICES)
    used = min(int(entries), MAX_FIT_ENTRIES)
    if used < 1 or (used < MIN_CV_ENTRIES and method != "pixel-classifier"):
        return 0.0
    seconds = _between(CPU_CHECK_SECONDS_PER_TASK[method], used)
    if method in CHECK_RUNS_NETWORK and used >= MIN_CV_ENTRIES and support_size != CHECK_SUPPORT_SIZE:
        network = _between(CPU_CHECK_SECONDS_PER_TASK["network"], used)
        scale = _out_of_fold_network(used, support_size) / _out_of_fold_network(used, CHECK_SUPPORT_SIZE)
        seconds += network * (scale - 1.0)
    return max(seconds, 0.0)


def check_seconds(
    task_entries: Mapping[int, int] | Iterable[int], support_size: int, method: str = DEFAULT_METHOD
) -> float:
    """:func:`check_seconds_per_task` summed over tasks with these entry counts."""
    counts = task_entries.values() if isinstance(task_entries, Mapping) else task_entries
    return sum(check_seconds_per_task(n, support_size, method) for n in counts)


def describe_check(task_entries: Mapping[int, int], support_size: int, method: str = DEFAULT_METHOD) -> str:
    """``"about 9 s once to check the support (2 tasks)"`` (:func:`check_seconds`), or ``""`` when
    the run fits no task."""
    checked = sum(n >= MIN_CV_ENTRIES for n in task_entries.values())
    fitted = len(task_entries) - checked if method == "pixel-classifier" else 0
    if checked + fitted == 0:
        return ""
    what = {
        (True, False): "check the support",
        (False, True): "fit the pixel classifier",
        (True, True): "check the support and fit the pixel classifier",
    }[(checked > 0, fitted > 0)]
    tasks, seconds = checked + fitted, check_seconds(task_entries, support_size, method)
    return f"about {format_duration(seconds)} once to {what} ({tasks} task{'s' if tasks != 1 else ''})"


def describe_expected_time(
    n_slices: int,
    task_entries: Mapping[int, int],
    support_size: int,
    ensemble: int,
    on_gpu: bool = False,
    *,
    method: str = DEFAULT_METHOD,
    fitted: bool = False,
    pixels: int = GRID_PIXELS,
) -> str:
    """One sentence for before a run: time per slice (on slices of ``pixels`` pixels), the one-off
    support check of ``method`` (none when the tasks are ``fitted`` already: a later image of one
    run), the time in all, and when a GPU would help."""
    if on_gpu:
        return "on a GPU: no measured time for these weights; the progress bar shows the pace"
    per_slice = seconds_per_slice(task_entries, support_size, ensemble, method, pixels)
    on_slices = per_slice * max(1, int(n_slices))
    check = 0.0 if fitted else check_seconds(task_entries, support_size, method)
    total = on_slices + check
    tasks = len(task_entries)
    drawn = sorted({min(int(support_size), int(n)) for n in task_entries.values()})
    used = (
        ""
        if drawn == [support_size]
        else f" (here {drawn[0]}" + (f"-{drawn[-1]})" if len(drawn) > 1 else ")")
    )
    text = (
        f"expected {per_slice_phrase(per_slice, task_entries, method)} ({tasks} task{'s' if tasks != 1 else ''}, "
        f"S={support_size}{used}, K={ensemble}, one thread of the reference CPU), about "
        f"{format_duration(on_slices)} for {n_slices} slice{'s' if n_slices != 1 else ''}"
    )
    once = "" if fitted else describe_check(task_entries, support_size, method)
    if once:
        text += f" plus {once}, about {format_duration(total)} in all"
    unused = [n for n in task_entries.values() if n <= support_size]
    if ensemble > 1 and len(unused) == tasks:
        text += f"; K={ensemble} changes nothing here: no task has more than S entries"
    if total > LONG_RUN_SECONDS:
        text += f"; a CUDA GPU ran this architecture about {GPU_SPEED_UP} times faster (docs/performance.md)"
    return text


def per_slice_phrase(per_slice: float, task_entries: Mapping[int, int], method: str) -> str:
    """``"about 0.13 s per slice"``, or ``"up to about ..."`` when :func:`seconds_per_slice` gave an
    upper bound: ``auto`` with a task large enough for it to choose a method, maybe one cheaper than
    the stacked one counted (:func:`slice_method`)."""
    bound = method == "auto" and any(n >= MIN_CHOICE_ENTRIES for n in task_entries.values())
    return f"{'up to ' if bound else ''}about {format_duration(per_slice)} per slice"


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

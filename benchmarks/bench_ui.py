"""How responsive napari stays while the segmentation widget runs on a 3D volume.

In a real napari window (run it under Xvfb or on a desktop), the segmentation widget segments a
volume from a support set while a QTimer fires every 10 ms on the main thread; each tick records how
late it came, so the longest lateness is the longest stall of the Qt event loop (goal: none over
100 ms while inference runs). Reported per run:

* **click**: main-thread time of pressing Run (checks, and showing the empty preview layer);
* **first slices shown**: from pressing Run to the first batch of slices in the preview layer;
* **longest stall while it runs**: from the end of the click to the end of the run (the network
  works in a worker thread; the main thread only shows batches and the progress bar);
* **plugin's work per batch**: main-thread time of the widget's handler for one batch (writing it
  into the preview and asking for a refresh; the repaint itself comes after, in napari);
* **one canvas repaint**: the time the display takes to draw napari's canvas once, measured idle:
  any visible update (a batch in the preview) costs at least this much.

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/bench_ui.py --repeats 3

Volumes: ``sample`` is the bundled MNI152 2 mm T1 (79 x 94 x 76); ``large`` is the same volume
upsampled to 1 mm (158 x 188 x 152). The support set is 6 slices "painted" in a labels layer (the
sample's grey/white-matter labels). Run 1 makes the output layer (its preview becomes the output);
later runs replace it. ``--freeze-activity-indicator`` stops napari's animated activity indicator
(a GIF shown while any progress bar runs), to measure what it costs on a software-rendered display.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

TICK_MS = 10
STALL_GOAL_MS = 100


class StallMeter:
    """A 10 ms QTimer on the main thread; (time, lateness in ms) of each tick while running."""

    def __init__(self):
        from qtpy.QtCore import QTimer

        self.timer = QTimer()
        self.timer.setInterval(TICK_MS)
        self.timer.timeout.connect(self._tick)
        self.ticks: list[tuple[float, float]] = []
        self._last = time.perf_counter()

    def start(self) -> None:
        self.ticks.clear()
        self._last = time.perf_counter()
        self.timer.start()

    def stop(self) -> None:
        self.timer.stop()

    def _tick(self) -> None:
        now = time.perf_counter()
        self.ticks.append((now, max(0.0, (now - self._last) * 1000 - TICK_MS)))
        self._last = now

    def late_between(self, start: float, stop: float) -> list[float]:
        """Lateness of the ticks that arrived in (start, stop]."""
        return [late for when, late in self.ticks if start < when <= stop]


def run_event_loop(seconds: float | None = None, until=None) -> None:
    """Run Qt's event loop (as napari does) for ``seconds`` or until the signal ``until`` fires."""
    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    if until is not None:
        until.connect(loop.quit)
    QTimer.singleShot(int((seconds or 3600) * 1000), loop.quit)
    loop.exec_()
    if until is not None:
        until.disconnect(loop.quit)


def weights_spec() -> tuple[str, str]:
    """(spec, description): the bundled weights, else a random network of UniverSeg v1's size."""
    from napari_openseg.model.registry import (
        DEFAULT_WEIGHTS,
        is_available,
        read_weights_file,
        resolve_weights_path,
        save_weights,
    )
    from napari_openseg.model.universeg import UniverSeg

    if is_available(DEFAULT_WEIGHTS):
        config, _, _ = read_weights_file(resolve_weights_path(DEFAULT_WEIGHTS))
        return (
            DEFAULT_WEIGHTS,
            f"{DEFAULT_WEIGHTS} (widths {list(config.encoder_channels)}, grid {config.grid_size})",
        )
    import torch

    torch.manual_seed(0)
    path = Path(tempfile.mkdtemp()) / "random.pt"
    save_weights(UniverSeg(), path)
    return str(path), "random, UniverSeg v1 size (widths [64, 64, 64, 64], grid 128)"


def volume(kind: str):
    from napari_openseg.sample import load_sample

    image, labels = load_sample()
    data, truth, spacing = image.data, labels.data, image.spacing
    if kind == "large":
        data = data.repeat(2, 0).repeat(2, 1).repeat(2, 2)
        truth = truth.repeat(2, 0).repeat(2, 1).repeat(2, 2)
        spacing = tuple(s / 2 for s in spacing)
    return data, truth, spacing


def repaint_ms(canvas, count: int = 10) -> float:
    """Median time to render napari's canvas (an OpenGL widget) once, synchronously."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        canvas.grabFramebuffer()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volume", choices=("sample", "large"), default="sample")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--support-size", type=int, default=16)
    parser.add_argument("--weights", help="weights name or file (default: openseg-default, else random)")
    parser.add_argument("--view", choices=("2d", "3d"), default="2d", help="viewer display mode")
    parser.add_argument(
        "--freeze-activity-indicator",
        action="store_true",
        help="stop napari's animated activity indicator (diagnostic)",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*PyQt5 backend.*")

    import napari
    import torch
    from qtpy.QtCore import QTimer
    from qtpy.QtGui import QGuiApplication

    from napari_openseg._widgets._session import get_session
    from napari_openseg.core.support import build_support_set

    if args.freeze_activity_indicator:
        from qtpy.QtGui import QMovie

        QMovie.start = lambda self: None

    spec, weights_name = (args.weights, args.weights) if args.weights else weights_spec()
    data, truth, spacing = volume(args.volume)
    viewer = napari.Viewer(title="bench_ui")
    window = viewer.window._qt_window
    window.resize(1400, 900)
    layer = viewer.add_image(data, name="volume", scale=spacing)
    if args.view == "3d":
        viewer.dims.ndisplay = 3
    slices = [int(s) for s in np.linspace(0.25, 0.75, 6) * data.shape[0]]
    painted = np.zeros_like(truth)
    painted[slices] = truth[slices]
    viewer.add_labels(painted, name="painted", scale=spacing)  # what the user painted, as in real use
    get_session(viewer).replace_support(
        build_support_set(data, painted, slice_indices=slices, source="volume")
    )
    _, widget = viewer.window.add_plugin_dock_widget("napari-openseg", "Segment")
    widget.set_weights(spec)
    widget.query_combo.select(layer)
    widget.support_size.setValue(args.support_size)
    viewer.dims.set_point(0, data.shape[0] // 2 * spacing[0])
    run_event_loop(1.0)
    frame_ms = repaint_ms(viewer.window._qt_viewer.canvas.native)
    meter = StallMeter()
    handler_ms: list[float] = []
    show_batch = widget._show_batch

    def timed_show_batch(step) -> None:  # the plugin's own main-thread work for each batch
        start = time.perf_counter()
        show_batch(step)
        handler_ms.append((time.perf_counter() - start) * 1000)

    widget._show_batch = timed_show_batch  # run() hands this bound attribute to the worker helper

    rows = []
    for repeat in range(args.repeats):
        marks: dict[str, float] = {}

        def press_run(marks=marks) -> None:
            marks["click"] = time.perf_counter()
            widget.run()
            marks["clicked"] = time.perf_counter()

        def shown(_done, marks=marks) -> None:
            marks.setdefault("first", time.perf_counter())

        widget.preview_updated.connect(shown)
        handler_ms.clear()
        meter.start()
        QTimer.singleShot(50, press_run)  # pressed from inside the running event loop, like a click
        with_outcome: list[str] = []
        widget.run_finished.connect(with_outcome.append)
        run_event_loop(until=widget.run_finished)
        marks["end"] = time.perf_counter()
        meter.stop()
        widget.run_finished.disconnect(with_outcome.append)
        widget.preview_updated.disconnect(shown)
        running = sorted(meter.late_between(marks["clicked"], marks["end"]))
        rows.append(
            {
                "run": f"{repeat + 1} ({'first' if repeat == 0 else 'rerun'})",
                "outcome": with_outcome[0],
                "click": (marks["clicked"] - marks["click"]) * 1000,
                "first": marks.get("first", float("nan")) - marks["click"],
                "total": marks["end"] - marks["click"],
                "max": running[-1],
                "p99": running[int(0.99 * (len(running) - 1))],
                "median": statistics.median(running),
                "over": sum(v > STALL_GOAL_MS for v in running),
                "ticks": len(running),
                "handler": (statistics.mean(handler_ms), max(handler_ms))
                if handler_ms
                else (float("nan"),) * 2,
            }
        )

    shape = "x".join(map(str, data.shape))
    print(
        f"# bench_ui: {args.volume} volume {shape}, {args.view} view, weights {weights_name}, "
        f"S={args.support_size}, tasks {sorted(get_session(viewer).support.counts())}"
        f"{', activity indicator frozen' if args.freeze_activity_indicator else ''}"
    )
    print(
        f"# {platform.machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"napari {napari.__version__}, Qt platform {QGuiApplication.platformName()}; "
        f"one canvas repaint (idle): {frame_ms:.0f} ms"
    )
    print()
    print(
        "| run | outcome | click (ms) | first slices shown (s) | whole run (s) "
        "| longest stall while it runs (ms) | p99 / median lateness (ms) "
        f"| ticks > {STALL_GOAL_MS} ms / ticks | plugin's work per batch, mean / max (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['run']} | {r['outcome']} | {r['click']:.0f} | {r['first']:.2f} | {r['total']:.1f} "
            f"| {r['max']:.0f} | {r['p99']:.0f} / {r['median']:.1f} | {r['over']} / {r['ticks']} "
            f"| {r['handler'][0]:.0f} / {r['handler'][1]:.0f} |"
        )
    viewer.close()


if __name__ == "__main__":
    main()

# ruff: noqa: TID251  (a script that drives a real napari window)
"""Screenshots for docs/user-guide.md, taken from a real napari window on the bundled sample.

Run under Xvfb from the repository root (takes about a minute on a CPU):

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/make_screenshots.py

It opens the sample, "paints" four axial slices (copied from the sample's grey/white-matter labels,
standing in for a user's brush strokes), builds a support set with the support-set widget, runs the
segmentation widget on the volume and in batch mode, and saves PNGs to docs/images/. Weights: the
bundled ``openseg-default`` when installed, else ``--weights PATH``; with neither, a randomly
initialised network is used and the results look like noise (the script says so).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "images"
PAINTED_SLICES = (22, 32, 42, 52)  # axial slices (z) the "user" paints
SHOWN_SLICE = 37

log = logging.getLogger("screenshots")


def wait_until(condition, timeout: float = 900.0) -> None:
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("the window did not reach the expected state in time")
        QApplication.processEvents()
        time.sleep(0.01)


def settle(seconds: float = 0.5) -> None:
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.01)


def choose_weights(requested: str | None) -> tuple[str, bool]:
    """(weights spec, trained?)"""
    from napari_openseg.model.registry import DEFAULT_WEIGHTS, is_available, save_weights
    from napari_openseg.model.universeg import build_network

    if requested:
        return requested, True
    if is_available(DEFAULT_WEIGHTS):
        return DEFAULT_WEIGHTS, True
    import torch

    torch.manual_seed(0)
    path = Path(tempfile.mkdtemp()) / "random-untrained.pt"
    save_weights(build_network((16, 16, 16, 16), grid_size=64), path, {"note": "random, untrained"})
    log.warning("openseg-default is not installed: using a RANDOM network (results look like noise)")
    return str(path), False


def shoot_window(viewer, name: str) -> None:
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        if "PyQt5" in toast.message.text():  # napari's own notice, not part of the plugin
            toast.close()
    settle(0.3)
    path = OUT / name
    viewer.window._qt_window.grab().save(str(path))
    log.info("wrote %s", path.relative_to(ROOT))


def shoot_widget(widget, name: str) -> None:
    path = OUT / name
    widget.grab().save(str(path))
    log.info("wrote %s", path.relative_to(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="weights name or file (default: openseg-default if installed)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    OUT.mkdir(parents=True, exist_ok=True)

    import warnings

    import napari
    from napari.utils.notifications import notification_manager

    from napari_openseg._widgets._session import get_session
    from napari_openseg._widgets.segment_widget import BATCH

    # napari's notice about the PyQt5 backend is not part of the plugin; keep it out of the pictures
    warnings.filterwarnings("ignore", message=".*PyQt5 backend.*")
    weights, trained = choose_weights(args.weights)
    viewer = napari.Viewer(title="napari-openseg")
    notification_manager.notification_ready.connect(lambda event: log.info("notification: %s", event.message))
    viewer.window._qt_window.resize(1500, 950)
    viewer.window._qt_window.showNormal()

    # 1. the sample, and a labels layer that the user paints on two slices
    viewer.open_sample("napari-openseg", "mni152")
    image_layer, reference = viewer.layers["MNI152 T1"], viewer.layers["MNI152 GM-WM labels"]
    reference.visible = False
    painted = np.zeros_like(reference.data)
    for z in PAINTED_SLICES:
        painted[z] = reference.data[z]
    painted_layer = viewer.add_labels(painted, name="painted", scale=image_layer.scale)
    viewer.dims.set_point(0, PAINTED_SLICES[0] * image_layer.scale[0])
    settle()
    shoot_window(viewer, "01-sample-painted.png")

    # 2. support-set widget: add the two painted slices
    _, support_widget = viewer.window.add_plugin_dock_widget("napari-openseg", "Support set")
    support_widget.image_combo.select(image_layer)
    support_widget.labels_combo.select(painted_layer)
    session = get_session(viewer)
    for z in PAINTED_SLICES:
        viewer.dims.set_point(0, z * image_layer.scale[0])
        before = len(session.support)
        support_widget.add_current_slice()
        wait_until(lambda before=before: len(session.support) > before)
    settle()
    shoot_window(viewer, "02-support-set.png")
    shoot_widget(support_widget, "02b-support-widget.png")

    # 3. segmentation widget: run on the volume; one picture while it runs, one at the end
    support_dock, _ = viewer.window.add_plugin_dock_widget("napari-openseg", "Support set")
    segment_dock, segment_widget = viewer.window.add_plugin_dock_widget("napari-openseg", "Segment")
    settle()
    # as a user would drag the separator: room for the Segment dock's status line (the expected time)
    from qtpy.QtCore import Qt

    viewer.window._qt_window.resizeDocks([support_dock, segment_dock], [420, 480], Qt.Vertical)
    segment_widget.set_weights(weights)
    segment_widget.query_combo.select(image_layer)
    viewer.dims.set_point(0, SHOWN_SLICE * image_layer.scale[0])
    outcome: list[str] = []
    segment_widget.run_finished.connect(outcome.append)
    shot: list[bool] = []

    def mid_run(done: int) -> None:
        if not shot and done >= SHOWN_SLICE + 6:  # the preview has reached the slice on screen
            shot.append(True)
            shoot_window(viewer, "03-running.png")  # the dock's progress bar says how long is left

    segment_widget.preview_updated.connect(mid_run)
    segment_widget.run()
    wait_until(lambda: bool(outcome))
    painted_layer.visible = False
    settle()
    shoot_window(viewer, "04-segmented.png")
    shoot_widget(segment_widget, "04b-estimate.png")  # the expected Dice and method of each task

    # 4. batch mode: a second volume (the sample with noise and another contrast) and both at once
    rng = np.random.default_rng(0)
    second = np.clip(
        image_layer.data.astype(np.float32) ** 1.3 + rng.normal(0, 40, image_layer.data.shape), 0, None
    )
    viewer.add_image(second.astype(np.float32), name="second volume", scale=image_layer.scale)
    segment_widget.query_combo.select(BATCH)
    outcome.clear()
    segment_widget.run()
    wait_until(lambda: bool(outcome))
    for layer in viewer.layers:
        layer.visible = layer.name in ("second volume", "second volume openseg")
    settle()
    shoot_window(viewer, "05-batch.png")

    # 5. an error: segmenting with an empty support set
    session.clear_support()
    segment_widget.query_combo.select(image_layer)
    segment_widget.run()
    settle(1.0)
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        if "no support set" in toast.message.text():
            toast.toggle_expansion()
    settle(1.0)
    shoot_window(viewer, "06-error-notification.png")

    # 6. all five docks at once: each fits, its form scrolls, its progress bar and Cancel stay in view
    for name in ("Propagate", "Novelty", "Evaluate"):
        viewer.window.add_plugin_dock_widget("napari-openseg", name)
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()
    viewer.window._qt_window.resize(1600, 1000)
    settle(1.0)
    shoot_window(viewer, "07-all-docks.png")

    log.info("weights: %s (%s)", weights, "trained" if trained else "RANDOM, results are noise")
    viewer.close()


if __name__ == "__main__":
    main()

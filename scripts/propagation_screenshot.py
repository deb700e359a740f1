# ruff: noqa: TID251  (a script that drives a real napari window)
"""Screenshot of the Propagate widget for docs/propagation.md, from a real napari window.

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/propagation_screenshot.py [--weights PATH]

It opens the bundled sample, "paints" the white matter on one axial slice (copied from the sample's
labels, standing in for brush strokes), runs the Propagate widget with its defaults (the white
matter's pixel classifier joins, and its agreement with the network ends the fronts), goes to the
least confident slice and saves ``docs/images/propagation-result.png`` and ``propagation-weakest.png``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PAINTED_SLICE = 45


def shoot(viewer, path: Path) -> None:
    from napari._qt.dialogs.qt_notification import NapariQtNotification
    from qtpy.QtWidgets import QApplication

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()  # napari's own notices (e.g. about the Qt backend), not part of the plugin
    for _ in range(50):
        QApplication.processEvents()
        time.sleep(0.02)
    viewer.window._qt_window.grab().save(str(path))
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default="openseg-default")
    parser.add_argument("--out-dir", default=str(ROOT / "docs" / "images"))
    args = parser.parse_args()
    os.environ["OPENSEG_INLINE_WORKERS"] = "1"  # run in this thread: the script waits for the result anyway

    import napari

    from napari_openseg._widgets._session import get_session
    from napari_openseg.sample import load_sample

    image, labels = load_sample()
    painted = np.zeros(labels.data.shape, np.uint8)
    painted[PAINTED_SLICE][labels.data[PAINTED_SLICE] == 2] = 2
    viewer = napari.Viewer()
    viewer.window._qt_window.resize(1500, 950)
    viewer.add_image(image.data, name="mni152", scale=image.spacing)
    viewer.add_labels(painted, name="painted", scale=image.spacing)
    _, widget = viewer.window.add_plugin_dock_widget("napari-openseg", "Propagate")
    get_session(viewer).set_model(weights=args.weights, device="cpu")
    widget.axis_combo.setCurrentText("0")
    widget.settings_section.set_expanded(True)  # the picture shows the stop settings
    began = time.perf_counter()
    widget.run()
    print(f"propagated in {time.perf_counter() - began:.1f} s: {widget.status.text()}")
    widget.go_to_slice(PAINTED_SLICE + 8)
    shoot(viewer, Path(args.out_dir) / "propagation-result.png")
    widget.go_to_least_confident()
    shoot(viewer, Path(args.out_dir) / "propagation-weakest.png")
    viewer.close()


if __name__ == "__main__":
    main()

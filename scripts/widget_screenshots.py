# ruff: noqa: TID251  (a script that drives a real napari window)
"""Screenshots of the Novelty and Evaluate widgets for docs/novelty.md and docs/evaluation.md.

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/widget_screenshots.py [--weights NAME|PATH]

Novelty: the bundled sample with the grey matter of four axial slices "painted" (copied from the
sample's labels, standing in for brush strokes) as the support set, so that white matter is the unseen
structure; Compute in the training-free mode ("Embeddings from: support set (no training)") and
``docs/images/novelty-result.png`` with the heat map and the novel regions on an axial slice.

Evaluate: the sample volume and its labels copied into a temporary MSD-layout folder (``imagesTr/``,
``labelsTr/``), a small run (S=4, K=1, 4 queries per task) and ``docs/images/evaluate-result.png``
with the Dice table in the dock. Both together take about half a minute on one CPU thread.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAINTED_SLICES = (22, 32, 42, 52)  # axial slices whose labels form the support set
SHOWN_SLICE = 37  # an axial slice between the painted ones
KNOWN_LABEL = 1  # grey matter
EVAL_SUPPORT_SIZE = 4
EVAL_QUERIES_PER_TASK = 4  # enough to fill the table; the run takes seconds on one CPU thread
NOVEL_OUTLINE_WIDTH = 1
DOCK_WIDTH = 520
TABLE_MARGIN = 60  # pixels around the Dice table in the Evaluate dock (frame, padding, scroll bar)


def shoot(viewer, path: Path) -> None:
    from napari._qt.dialogs.qt_notification import NapariQtNotification
    from qtpy.QtWidgets import QApplication

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()  # napari's own notices (e.g. about the Qt backend); plugin errors stop the script first
    for _ in range(50):
        QApplication.processEvents()
        time.sleep(0.02)
    viewer.window._qt_window.grab().save(str(path))
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


def widen_dock(viewer, widget, width: int) -> None:
    from qtpy.QtCore import Qt

    qt_window = viewer.window._qt_window
    qt_window.resizeDocks([widget.parentWidget()], [width], Qt.Horizontal)


def run_to_end(widget, start) -> str:
    """Start a widget's run and return the word its ``run_finished`` signal ends with."""
    outcomes: list[str] = []
    widget.run_finished.connect(outcomes.append)
    began = time.perf_counter()
    start()
    outcome = outcomes[-1] if outcomes else "no result"  # inline workers: finished before start() returns
    print(f"{type(widget).__name__}: {outcome} in {time.perf_counter() - began:.1f} s")
    if not outcome.endswith("done"):
        raise SystemExit(f"{type(widget).__name__} did not finish: {outcome}")
    return outcome


def novelty_screenshot(napari, image, labels, weights: str, out: Path) -> None:
    from napari_openseg._widgets._session import get_session
    from napari_openseg._widgets.novelty_widget import FREE
    from napari_openseg.core.support import build_support_set
    from napari_openseg.sample import SAMPLE_LABEL_NAMES

    viewer = napari.Viewer(title="napari-openseg")
    viewer.window._qt_window.resize(1500, 950)
    image_layer = viewer.add_image(image.data, name="mni152", scale=image.spacing)
    session = get_session(viewer)
    session.set_model(weights=weights, device="cpu")
    # Only grey matter is known: white matter plays the unseen structure the map should flag. These
    # are the entries the Support set widget makes from the painted slices (scripts/make_screenshots.py).
    session.replace_support(
        build_support_set(
            image.data,
            labels.data,
            axis=0,
            source="mni152",
            slice_indices=PAINTED_SLICES,
            label_values=[KNOWN_LABEL],
        )
    )
    _, widget = viewer.window.add_plugin_dock_widget("napari-openseg", "Novelty")
    widget.image_combo.select(image_layer)
    widget.mode.setCurrentText(FREE)
    viewer.dims.set_point(0, SHOWN_SLICE * image.spacing[0])
    run_to_end(widget, widget.compute)
    print(f"  status: {widget.status.text()}  {widget.threshold_label.text()}")
    novel = widget.maps.novel_regions()
    for value, name in SAMPLE_LABEL_NAMES.items():
        print(f"  novel share of {name}: {novel[labels.data == value].mean():.1%}")
    # The picture is about novelty. The T1 under the additive heat map washes it out; the widget draws
    # the novel region as a cyan outline, which leaves the heat map visible.
    image_layer.visible = False
    viewer.layers[f"{image_layer.name} novel region"].contour = NOVEL_OUTLINE_WIDTH
    widen_dock(viewer, widget, DOCK_WIDTH)
    shoot(viewer, out / "novelty-result.png")
    viewer.close()


def write_msd_folder(root: Path) -> Path:
    """An MSD-layout folder with the sample volume and its labels (the same NIfTI files, paired by stem)."""
    from napari_openseg.sample import SAMPLE_IMAGE, SAMPLE_LABELS

    for source, folder in ((SAMPLE_IMAGE, "imagesTr"), (SAMPLE_LABELS, "labelsTr")):
        (root / folder).mkdir(parents=True)
        shutil.copyfile(source, root / folder / "mni152.nii.gz")
    return root


def evaluate_screenshot(napari, image, labels, weights: str, out: Path) -> None:
    from napari_openseg._widgets._session import get_session

    viewer = napari.Viewer(title="napari-openseg")
    viewer.window._qt_window.resize(1500, 950)
    # the evaluated volume, for context: the widget itself reads no layers
    viewer.add_image(image.data, name="mni152", scale=image.spacing)
    viewer.add_labels(labels.data, name="mni152 labels", scale=image.spacing, opacity=0.4)
    viewer.dims.set_point(0, SHOWN_SLICE * image.spacing[0])
    get_session(viewer).set_model(weights=weights, device="cpu")
    _, widget = viewer.window.add_plugin_dock_widget("napari-openseg", "Evaluate")
    with tempfile.TemporaryDirectory(prefix="openseg-eval-") as tmp:
        widget.folder.value = str(write_msd_folder(Path(tmp) / "mni152-msd"))
        widget.support_size.value = EVAL_SUPPORT_SIZE
        widget.ensemble.value = 1
        widget.max_queries.value = EVAL_QUERIES_PER_TASK
        run_to_end(widget, widget.run)
    print(widget.report.table())
    # The table shows whole: the dock takes the table's width, and the layer controls and list (of no
    # use to this widget, which reads no layers) make room for it.
    viewer.window._qt_viewer.dockLayerControls.setVisible(False)
    viewer.window._qt_viewer.dockLayerList.setVisible(False)
    table = widget.table.native
    columns = sum(table.sizeHintForColumn(c) for c in range(table.columnCount()))
    width = table.verticalHeader().sizeHint().width() + columns + TABLE_MARGIN
    widen_dock(viewer, widget, width)
    shoot(viewer, out / "evaluate-result.png")
    viewer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default="openseg-default")
    parser.add_argument("--out-dir", default=str(ROOT / "docs" / "images"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (leave a core for drawing)")
    args = parser.parse_args()
    os.environ["OPENSEG_INLINE_WORKERS"] = "1"  # run in this thread: the script waits for the result anyway

    import napari
    import torch
    from napari.utils.notifications import notification_manager

    from napari_openseg.sample import load_sample

    torch.set_num_threads(args.threads)
    # the toasts are closed before each picture: print them so that a plugin error is never hidden
    notification_manager.notification_ready.connect(lambda event: print(f"notification: {event.message}"))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image, labels = load_sample()
    began = time.perf_counter()
    novelty_screenshot(napari, image, labels, args.weights, out)
    evaluate_screenshot(napari, image, labels, args.weights, out)
    print(f"both screenshots in {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()

"""The five docks together fit a 1000-pixel-high screen: each scrolls its form and keeps its run
panel (progress bar and Cancel) in view."""

from __future__ import annotations

import pytest
from qtpy.QtWidgets import QApplication, QScrollArea

pytestmark = pytest.mark.qt

DOCKS = ("Support set", "Segment", "Propagate", "Novelty", "Evaluate")
SCREEN = (1600, 1000)


def test_all_five_docks_fit_a_1600_by_1000_screen(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(*SCREEN)
    widgets = {name: viewer.window.add_plugin_dock_widget("napari-openseg", name)[1] for name in DOCKS}
    for _ in range(5):
        QApplication.processEvents()
    # before: 1375 pixels with three of them, 2305 with all five (none scrolled)
    assert window.minimumSizeHint().height() <= SCREEN[1]
    assert window.height() <= SCREEN[1]
    for name, widget in widgets.items():
        assert widget.isVisible() and widget.height() > 0, name
        assert widget.findChild(QScrollArea) is not None, name  # a short dock scrolls its form
        panel = getattr(widget, "panel", None)
        if panel is not None:  # the run panel stays at the dock's foot, outside the scrolled form
            assert panel.isVisible() and panel.cancel_button.isVisible(), name
            assert widget.rect().contains(panel.geometry()), name


def test_a_model_chosen_in_one_dock_shows_in_every_dock(make_napari_viewer, qtbot, tiny_weights):
    viewer = make_napari_viewer()
    widgets = {name: viewer.window.add_plugin_dock_widget("napari-openseg", name)[1] for name in DOCKS[1:]}
    widgets["Propagate"].picker.set_weights(tiny_weights)
    widgets["Propagate"].picker.device_combo.setCurrentText("cpu")
    for name, widget in widgets.items():  # Segment, Propagate, Novelty, Evaluate: one choice, four views
        assert widget.picker.weights_spec() == str(tiny_weights), name
        assert widget.model_section.button.text() == "Model: tiny.pt on cpu", name
        assert not widget.model_section.expanded, name  # folded: the title says what is chosen

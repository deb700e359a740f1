"""Packaging: importing the package is light, and the manifest travels with it."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import napari_openseg


def test_import_pulls_in_no_torch_qt_or_napari():
    code = (
        "import sys, napari_openseg, napari_openseg.errors;"
        "heavy = [m for m in ('torch', 'napari', 'qtpy', 'PyQt5', 'PySide6', 'magicgui') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_manifest_is_inside_the_package_and_registered():
    inside = Path(napari_openseg.__file__).parent / "napari.yaml"
    root = Path(napari_openseg.__file__).parents[2] / "napari.yaml"
    assert inside.is_file()
    if root.is_file():  # a source checkout: the package's copy is the root manifest
        assert inside.read_text() == root.read_text()
    (entry,) = [e for e in entry_points(group="napari.manifest") if e.name == "napari-openseg"]
    assert entry.value == "napari_openseg:napari.yaml"

"""The public API of ``napari_openseg.core``: every listed name resolves, and importing it stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest

import napari_openseg.core as core


def test_every_public_name_resolves_to_an_object_of_that_name():
    for name in core.__all__:
        assert getattr(core, name).__name__ == name


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        core.no_such_thing  # noqa: B018


def test_importing_core_does_not_import_torch():
    code = "import sys, napari_openseg.core; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

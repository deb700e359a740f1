"""Tests of napari_openseg.core.propagate."""

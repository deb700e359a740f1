"""Tests of napari_openseg.core.segment."""

"""Tests of napari_openseg.training."""

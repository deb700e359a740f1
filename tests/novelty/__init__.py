"""Tests of napari_openseg.core.novelty."""

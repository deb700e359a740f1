"""Tests of napari_openseg.core.cohort."""

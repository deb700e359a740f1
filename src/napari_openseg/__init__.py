"""napari-openseg: segmentation by example for napari (UniverSeg-style in-context segmentation)."""

__version__ = "0.1.0"

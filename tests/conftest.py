"""Shared fixtures: tiny random networks and weight files, and the optional ../shared folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from napari_openseg.training.splits import shared_data_dir

SHARED_DATA = shared_data_dir()
SHARED_REFS = SHARED_DATA.parent / "refs" if SHARED_DATA is not None else None

needs_shared = pytest.mark.skipif(SHARED_DATA is None, reason="../shared is not present")


@pytest.fixture
def tiny_net():
    """A randomly initialised 3-level network with 8 features (fast on CPU)."""
    import torch

    from napari_openseg.model.universeg import build_network

    torch.manual_seed(0)
    return build_network((8, 8, 8), grid_size=32).eval()


@pytest.fixture
def tiny_weights(tmp_path, tiny_net) -> Path:
    """``tiny_net`` saved as a napari-openseg weights file."""
    from napari_openseg.model.registry import save_weights

    return save_weights(tiny_net, tmp_path / "tiny.pt")

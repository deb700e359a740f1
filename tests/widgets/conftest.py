"""Fixtures for the widget tests: a viewer, synthetic volumes, captured notifications."""

from __future__ import annotations

import numpy as np
import pytest

from napari_openseg._widgets import _threading


def disc_volume(depth: int = 12, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy volume ``"Z H W"`` with a bright disc whose radius changes along z, and its mask."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:depth, :size, :size]
    radius = size / 5 + (size / 10) * np.sin(z / max(1, depth - 1) * np.pi)
    mask = (y - size / 2) ** 2 + (x - size / 2.5) ** 2 < radius**2
    image = (mask * 1.0 + 0.15 * rng.standard_normal(mask.shape)).astype(np.float32)
    return image, mask.astype(np.uint8)


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


@pytest.fixture
def errors(monkeypatch):
    """Messages that widgets showed with napari's show_error (through _threading.report_error)."""
    shown: list[str] = []
    monkeypatch.setattr(_threading, "show_error", shown.append)
    return shown


@pytest.fixture
def threaded(monkeypatch):
    monkeypatch.setenv(_threading.INLINE_ENV, "0")


@pytest.fixture
def inline(monkeypatch):
    monkeypatch.setenv(_threading.INLINE_ENV, "1")

"""The bundled `openseg-default` weights: present, small, loadable, with their provenance."""

from __future__ import annotations

import json

import numpy as np

from napari_openseg.model.registry import (
    DEFAULT_WEIGHTS,
    REGISTRY,
    is_available,
    load_model,
    read_weights_file,
)


def test_default_weights_are_bundled_small_and_documented():
    entry = REGISTRY[DEFAULT_WEIGHTS]
    assert entry.bundled and is_available(DEFAULT_WEIGHTS), f"{entry.path} is missing"
    assert entry.path.stat().st_size < 5_000_000
    config, state, info = read_weights_file(entry.path)
    assert config.grid_size in (64, 96, 128) and config.encoder_channels == (32, 32, 32, 32)
    assert "CC BY-SA 4.0" in info["training_data"] and "synthetic" in info["training_data"]
    assert info["model_card"] == "docs/model-card.md" and int(info["step"]) > 0
    train_config = json.loads(info["train_config"])
    assert train_config["real_families"] == ["hippocampus"]  # nothing research-only was trained on
    assert all(np.isfinite(v.float().numpy()).all() for v in state.values())


def test_default_weights_segment_a_bright_square_from_one_example():
    """Smoke test of real use: one labelled slice of a simple volume is enough for the next slices."""
    from napari_openseg.core.inference import segment
    from napari_openseg.core.support import build_support_set

    rng = np.random.default_rng(0)
    volume = 0.2 + 0.05 * rng.standard_normal((4, 80, 80))
    labels = np.zeros(volume.shape, np.uint8)
    labels[:, 25:55, 20:50] = 1
    volume[labels == 1] += 0.6
    support = build_support_set(volume[:1], labels[:1])
    result = segment(volume[1:], support, load_model(None), support_size=1, device="cpu")
    truth = labels[1:] == 1
    dice = 2 * (result.labels.astype(bool) & truth).sum() / (result.labels.astype(bool).sum() + truth.sum())
    assert dice > 0.8

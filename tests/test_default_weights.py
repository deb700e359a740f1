"""The bundled weights (`openseg-default`, `openseg-propagate`): present, small, loadable, with their
provenance; propagation runs with its own default."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_openseg.model.registry import (
    DEFAULT_WEIGHTS,
    PROPAGATION_WEIGHTS,
    REGISTRY,
    is_available,
    load_model,
    propagation_weights,
    read_weights_file,
)
from napari_openseg.training.taskbank import load_manifest


@pytest.mark.parametrize("name", [DEFAULT_WEIGHTS, PROPAGATION_WEIGHTS, "openseg-v2"])
def test_bundled_weights_are_small_documented_and_trained_on_permissive_data_only(name):
    entry = REGISTRY[name]
    assert entry.bundled and is_available(name), f"{entry.path} is missing"
    assert entry.path.stat().st_size < 5_000_000
    config, state, info = read_weights_file(entry.path)
    assert config.grid_size in (64, 96, 128) and config.encoder_channels == (32, 32, 32, 32)
    assert "synthetic" in info["training_data"] and "hippocampus" in info["training_data"]
    assert info["model_card"] == "docs/model-card.md" and int(info["step"]) > 0
    assert info["name"] == name
    train_config = json.loads(info["train_config"])
    assert train_config["real_families"] == ["hippocampus"]
    assert train_config.get("task_bank") in (None, "permissive")  # never "all": no research set
    for dataset in load_manifest().values():  # the provenance names no research set either
        if dataset.licence_class != "permissive":
            assert dataset.name not in info["training_data"], dataset.name
    if train_config.get("task_bank"):
        assert "CC-BY-SA-4.0" in info["training_data"] and "Apache-2.0" in info["training_data"]
    else:
        assert "CC BY-SA 4.0" in info["training_data"]
    assert all(np.isfinite(v.float().numpy()).all() for v in state.values())


def test_default_weights_segment_a_bright_square_from_one_example():
    """Smoke test of real use: one labelled slice of a simple volume is enough for the next slices."""
    from napari_openseg.core.segment.inference import segment
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


def test_propagation_runs_with_its_own_default_unless_told_otherwise(tmp_path):
    assert propagation_weights(None) == propagation_weights(DEFAULT_WEIGHTS) == PROPAGATION_WEIGHTS
    assert propagation_weights("universeg-v1") == "universeg-v1"
    assert propagation_weights(tmp_path / "mine.pt") == str(tmp_path / "mine.pt")
    # Two different trainings: the names must not lead to the same file.
    default, propagate = (
        read_weights_file(REGISTRY[n].path)[2] for n in (DEFAULT_WEIGHTS, PROPAGATION_WEIGHTS)
    )
    assert (default["step"], default["seed"]) != (propagate["step"], propagate["seed"])

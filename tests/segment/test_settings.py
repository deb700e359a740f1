"""SegmentSettings: checked on creation, the one source of the command line's and the widget's
defaults, and the same segmentation whether given as an object or as keywords."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from napari_openseg.cli import build_parser
from napari_openseg.cli.segment import engine_options
from napari_openseg.core.engine_settings import SegmentSettings
from napari_openseg.core.segment.inference import combine_tasks, segment
from napari_openseg.core.support import build_support_set
from napari_openseg.errors import OpenSegError
from tests.segment.test_inference import volume_with_labels


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("threshold", 1.5, "threshold must lie in"),
        ("threshold", float("nan"), "threshold must lie in"),
        ("method", "magic", "method must be one of auto, network"),
        ("support_size", 0, "support size and ensemble must be >= 1"),
        ("ensemble", 0, "support size and ensemble must be >= 1"),
        ("seed", -1, "seed must be 0 or more"),
        ("precision", "float64", "precision must be one of float32"),
        ("aspect", "crop", "aspect must be one of pad, stretch"),
        ("formulation", "slow", "formulation must be one of fast, direct"),
        ("extent", "some", "extent must be one of all, auto"),
    ],
)
def test_bad_values_are_refused_with_a_message(field, value, message):
    with pytest.raises(OpenSegError, match=message):
        SegmentSettings(**{field: value})


def test_keywords_replace_fields_and_the_rest_are_the_stacking_options():
    base = SegmentSettings(support_size=4, threshold=0.3)
    settings, rest = SegmentSettings.split(base, {"threshold": 0.7, "folds": 3})
    assert settings == SegmentSettings(support_size=4, threshold=0.7) and rest == {"folds": 3}
    assert SegmentSettings.split(None, {}) == (SegmentSettings(), {})
    with pytest.raises(OpenSegError, match="threshold must lie in"):
        SegmentSettings.split(base, {"threshold": 2.0})
    with pytest.raises(OpenSegError, match="must be a SegmentSettings"):
        SegmentSettings.split({"threshold": 0.7}, {})


def parse(*words: str):
    return build_parser().parse_args(list(words))


@pytest.mark.parametrize(
    "words",
    [
        ("segment", "x.nii.gz", "--support", "s.npz", "--out", "y.nii.gz"),
        ("batch", "segment", "--support", "s.npz", "--out-dir", "out", "x.nii.gz"),
    ],
    ids=["segment", "batch segment"],
)
def test_the_command_line_defaults_are_the_settings_defaults(words):
    options = engine_options(parse(*words))
    defaults = SegmentSettings()
    given = {k: v for k, v in options.items() if hasattr(defaults, k)}
    assert set(given) == {"support_size", "ensemble", "method", "precision", "seed", "threshold", "extent"}
    assert given == {k: getattr(defaults, k) for k in given}


def test_the_demo_has_the_settings_defaults():
    from napari_openseg.cli.segment import model_settings

    assert model_settings(parse("demo")) == SegmentSettings()


def test_the_command_line_refuses_a_bad_setting_before_any_work():
    with pytest.raises(OpenSegError, match="threshold must lie in"):
        engine_options(parse("segment", "x.nii.gz", "--support", "s.npz", "--out", "y", "--threshold", "1.5"))


def test_the_settings_modules_import_neither_torch_nor_numpy():
    # the parser is built from them (tests/propagate/test_cli_propagate.py: it imports no torch)
    code = (
        "import sys, napari_openseg.core.engine_settings, napari_openseg.core.novelty.settings;"
        "import napari_openseg.core.propagate.settings;"
        "print([m for m in ('torch', 'numpy') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_settings_and_the_same_keywords_segment_alike(tiny_net):
    image, labels = volume_with_labels((6, 20, 28), seed=5)
    support = build_support_set(image, labels)
    query, _ = volume_with_labels((3, 20, 28), seed=6)
    chosen = dict(support_size=3, ensemble=2, threshold=0.0, method="network", seed=2)
    by_keywords = segment(query, support, tiny_net, device="cpu", **chosen)
    by_settings = segment(query, support, tiny_net, device="cpu", settings=SegmentSettings(**chosen))
    assert np.array_equal(by_settings.labels, by_keywords.labels)
    assert np.array_equal(by_settings.probabilities, by_keywords.probabilities)
    assert np.all(by_settings.labels != 0)  # threshold 0 reached the engine: every voxel is labelled
    # a keyword replaces the settings' field
    over = segment(query, support, tiny_net, device="cpu", settings=SegmentSettings(**chosen), threshold=0.6)
    expected = combine_tasks(np.moveaxis(by_keywords.probabilities, 0, 1), [1, 2], 0.6, np.uint8)
    assert np.array_equal(over.labels, expected) and not np.array_equal(over.labels, by_keywords.labels)

"""NoveltySettings: checked on creation, the one source of the command line's defaults, and the same
maps whether given as an object or as keywords."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_openseg.cli import build_parser
from napari_openseg.cli.novelty import map_options, map_settings
from napari_openseg.core.novelty.free import training_free_novelty
from napari_openseg.core.novelty.settings import DEFAULT_WEIGHTS, NoveltySettings
from napari_openseg.core.novelty.volume_map import iter_novelty_map, novelty_map
from napari_openseg.core.support import build_support_set
from napari_openseg.errors import OpenSegError
from tests._novelty_data import sphere_volume


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("side", "lighter", "appearance side must be one of brighter, darker, either"),
        ("intensity", "guess", "intensity handling must be one of auto, match, as-is"),
        ("adapt_unknown", -1, "adaptation steps must be >= 0"),
        ("overlap", 1.0, r"window overlap must lie in \[0, 1\)"),
        ("weights", (0.0, 0.0, 0.0), "fusion weights must be numbers >= 0"),
        ("weights", (0.5, float("nan"), 0.5), "fusion weights must be numbers >= 0"),
        ("weights", (0.5, 0.5), "one fusion weight per map"),
        ("sigma", -1.0, "sigma must be >= 0"),
        ("support_size", 0, "support size must be >= 1"),
        ("prototype_slices", 0, "prototype slices must be >= 1"),
        ("seed", -3, "seed must be 0 or more"),
        ("threshold", 0.0, "threshold must lie between 0 and 1"),
        ("threshold", 1.0, "threshold must lie between 0 and 1"),
    ],
)
def test_bad_values_are_refused_with_a_message(field, value, message):
    with pytest.raises(OpenSegError, match=message):
        NoveltySettings(**{field: value})


def test_no_side_is_allowed_and_weights_become_a_tuple_of_floats():
    settings = NoveltySettings(side=None, weights=[1, 1, 2])
    assert settings.side is None and settings.weights == (1.0, 1.0, 2.0)
    assert NoveltySettings().weights == DEFAULT_WEIGHTS


def test_each_map_refuses_an_option_it_does_not_use():
    volume = np.zeros((8, 16, 16), np.float32)
    with pytest.raises(OpenSegError, match="unknown option 'support_size' of a trained model's map"):
        next(iter_novelty_map(volume, "no-such-model.pt", support_size=4))
    with pytest.raises(OpenSegError, match="unknown option 'intensity' of a training-free map"):
        training_free_novelty(volume, "no-such-support.npz", intensity="match")


def parse(*words: str):
    return build_parser().parse_args(list(words))


@pytest.mark.parametrize("source", [("--model", "m.pt"), ("--support", "s.npz")])
def test_the_command_line_defaults_are_the_settings_defaults(source):
    assert map_settings(parse("novelty", "map", "--image", "v.nii.gz", *source)) == NoveltySettings()
    options = map_options(parse("batch", "novelty", *source, "--out-dir", "out", "v.nii.gz"))
    defaults = NoveltySettings()
    assert options.pop("device") == "auto" and options  # the rest are settings, at their defaults
    assert options == {name: getattr(defaults, name) for name in options}


def tiny_novelty_model():
    from napari_openseg.core.novelty.model import NoveltyModel
    from napari_openseg.core.novelty.prototypes import PrototypeBank
    from napari_openseg.model.medopenseg import MedOpenSeg, MedOpenSegConfig

    torch.manual_seed(0)
    config = MedOpenSegConfig(
        num_classes=2, embedding_dim=4, roi_size=(8, 16, 16), backbone="unet", feature_size=4
    )
    bank = PrototypeBank([0, 1], 4)
    bank.set_from_means(torch.randn(2, 4), torch.arange(2))
    return NoveltyModel(MedOpenSeg(config).eval(), bank, [0, 1], 1)


def test_a_trained_map_from_settings_equals_the_same_keywords():
    model = tiny_novelty_model()
    volume = np.random.default_rng(0).normal(0.3, 0.05, (8, 16, 24)).astype(np.float32)
    volume[2:6, 5:11, 8:14] = 0.05  # a dark block: only "darker" sees it in the appearance map
    chosen = dict(side="darker", overlap=0.5, weights=(0.2, 0.3, 0.5), sigma=1.0)
    by_keywords = novelty_map(volume, model, device="cpu", **chosen)
    by_settings = novelty_map(volume, model, device="cpu", settings=NoveltySettings(**chosen))
    plain = novelty_map(volume, model, device="cpu")
    assert np.array_equal(by_settings.fused, by_keywords.fused)
    assert not np.array_equal(by_settings.appearance, plain.appearance)  # the settings were used
    over = novelty_map(volume, model, device="cpu", settings=NoveltySettings(**chosen), side="brighter")
    brighter = novelty_map(volume, model, device="cpu", **{**chosen, "side": "brighter"})
    assert np.array_equal(over.fused, brighter.fused) and not np.array_equal(over.fused, by_keywords.fused)


def test_a_training_free_map_from_settings_equals_the_same_keywords():
    from napari_openseg.model.universeg import build_network

    torch.manual_seed(0)
    net = build_network((8, 8, 8), grid_size=32).eval()
    image, labels = (array[13:19, 4:28] for array in sphere_volume())
    support = build_support_set(image, labels, axis=0)
    chosen = dict(support_size=3, seed=1, prototype_slices=4, side="either")
    by_keywords = training_free_novelty(image, support, net, device="cpu", **chosen)
    by_settings = training_free_novelty(image, support, net, device="cpu", settings=NoveltySettings(**chosen))
    assert np.array_equal(by_settings.fused, by_keywords.fused)
    assert np.array_equal(by_settings.segmentation, by_keywords.segmentation)
    plain = training_free_novelty(
        image, support, net, device="cpu", support_size=3, seed=1, prototype_slices=4
    )
    assert not np.array_equal(by_settings.appearance, plain.appearance)  # side "either", not "brighter"

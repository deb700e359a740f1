"""MedOpenSeg network, losses, training (with resume), model files and whole-volume maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_openseg.core.novelty.model import NoveltyModel, body_mask, class_indices, labels_to_working
from napari_openseg.core.novelty.volume_map import novelty_map, unknown_seed_embeddings, window_starts
from napari_openseg.errors import OpenSegError
from napari_openseg.model.medopenseg import MedOpenSeg, MedOpenSegConfig
from napari_openseg.training.novelty.losses import IGNORE, dice_ce_loss, prototype_guided_loss
from napari_openseg.training.novelty.train import _batch, _prepare, _transforms, train_novelty
from tests._novelty_data import SHAPE, sphere_volume, tiny_settings


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two training steps on the synthetic volume, with a checkpoint."""
    torch.set_num_threads(2)
    folder = tmp_path_factory.mktemp("novelty")
    image, labels = sphere_volume()
    result = train_novelty([image], [labels], tiny_settings(), checkpoint=folder / "ckpt.pt", device="cpu")
    return result, folder / "ckpt.pt"


def test_network_heads_have_the_documented_shapes():
    torch.manual_seed(0)
    config = MedOpenSegConfig(
        num_classes=3, embedding_dim=5, roi_size=(32, 32, 64), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)
    )
    net = MedOpenSeg(config).eval()
    with torch.no_grad():
        logits, embeddings = net(torch.rand(2, 1, 32, 32, 64))
    assert logits.shape == (2, 3, 32, 32, 64) and embeddings.shape == (2, 5, 32, 32, 64)
    assert net.embed.kernel_size == (1, 1, 1)
    with pytest.raises(ValueError, match="divisible by 32"):
        net(torch.rand(1, 1, 32, 32, 48))
    with pytest.raises(ValueError, match="feature_size must be a multiple of 12"):
        MedOpenSegConfig(feature_size=16)
    with pytest.raises(ValueError, match="at least one side >= 64"):
        MedOpenSegConfig(roi_size=(32, 32, 32))


def test_dice_ce_ignores_voxels_marked_minus_one():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 2, 4, 4)
    target = torch.randint(0, 3, (1, 2, 4, 4))
    target[..., :2] = -1
    changed = logits.clone()
    changed[..., :2] = 100 * torch.randn(1, 3, 2, 4, 2)  # only ignored voxels differ
    assert torch.allclose(dice_ce_loss(logits, target), dice_ce_loss(changed, target))
    perfect = 50 * torch.nn.functional.one_hot(target.clamp_min(0), 3).permute(0, 4, 1, 2, 3).float()
    assert dice_ce_loss(perfect, target) < 0.05 < dice_ce_loss(-perfect, target)
    assert dice_ce_loss(logits, torch.full_like(target, -1)) == 0


def test_prototype_guided_loss_matches_the_formula():
    prototypes = torch.eye(2)
    emb = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).T.reshape(
        1, 2, 1, 1, 2
    )  # voxel 0 = (1, 0), voxel 1 = (0, 2)
    target = torch.tensor([0, 1]).reshape(1, 1, 1, 2)
    total, ca, pc = prototype_guided_loss(emb, target, prototypes, lambda_pc=0.5)
    # squared distances: voxel 0 -> (0, 2); voxel 1 -> (5, 1)
    expected_ca = (
        -torch.log_softmax(torch.tensor([0.0, -2.0]), 0)[0]
        - torch.log_softmax(torch.tensor([-5.0, -1.0]), 0)[1]
    ) / 2
    assert ca == pytest.approx(float(expected_ca), abs=1e-6)
    assert pc == pytest.approx((0.0 + 1.0) / 2)
    assert total == pytest.approx(float(expected_ca) + 0.25, abs=1e-6)


def test_patches_depend_only_on_seed_and_step():
    image, labels = sphere_volume()
    settings = tiny_settings(roi_size=(32, 32, 64))
    data, values, _ = _prepare([image], [labels], settings)
    assert values == [0, 1, 2]
    transform = _transforms(settings, len(values))
    a = _batch(data, 3, transform, settings, 3, "cpu")
    _batch(data, 4, transform, settings, 3, "cpu")
    b = _batch(data, 3, _transforms(settings, len(values)), settings, 3, "cpu")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_padding_of_a_volume_smaller_than_the_patch_is_ignored_not_background():
    image, labels = sphere_volume()
    image, labels = image[:10, :20, :30], labels[:10, :20, :30]
    settings = tiny_settings(roi_size=(32, 32, 64))  # larger than the volume on every side
    data, values, _ = _prepare([image], [labels], settings)
    images, targets = _batch(data, 0, _transforms(settings, len(values)), settings, len(values), "cpu")
    assert targets.shape == (1, 32, 32, 64)
    assert int((targets != IGNORE).sum()) == labels.size  # the padded voxels take part in no loss
    assert sorted(torch.unique(targets[targets != IGNORE]).tolist()) == sorted(np.unique(labels).tolist())
    with pytest.raises(OpenSegError, match="0 is the background class and cannot be ignored"):
        _prepare([image], [labels], tiny_settings(ignore_values=(0,)))


def test_training_writes_a_resumable_checkpoint_that_carries_the_prototypes(trained, tmp_path):
    result, checkpoint = trained
    assert result.steps == 2 and len(result.losses) == 2 and all(np.isfinite(result.losses))
    model = NoveltyModel.load(checkpoint)  # weights_only loading of a checkpoint works
    assert model.class_values == [0, 1, 2] and model.bank.ready
    assert torch.allclose(model.bank.prototypes.norm(dim=1), torch.ones(3))
    assert torch.equal(model.bank.prototypes, result.model.bank.prototypes)
    image, labels = sphere_volume()
    resumed = train_novelty(
        [image], [labels], tiny_settings(epochs=3), checkpoint=checkpoint, resume=True, device="cpu"
    )
    assert resumed.steps == 3 and resumed.losses[:2] == result.losses
    assert NoveltyModel.load(checkpoint).info["trained_steps"] == 3
    with pytest.raises(OpenSegError, match="has trained 3 steps already"):  # it reported 1 step before
        train_novelty(
            [image], [labels], tiny_settings(epochs=1), checkpoint=checkpoint, resume=True, device="cpu"
        )
    with pytest.raises(OpenSegError, match="trained on classes"):
        train_novelty(
            [image],
            [np.minimum(labels, 1)],
            tiny_settings(epochs=4),
            checkpoint=checkpoint,
            resume=True,
            device="cpu",
        )


def test_model_file_round_trip_and_refusals(trained, tmp_path):
    model = trained[0].model
    path = model.save(tmp_path / "model.pt")
    content = torch.load(path, weights_only=True)
    assert "training" not in content and content["class_values"] == [0, 1, 2]
    loaded = NoveltyModel.load(path)
    for key, value in model.network.state_dict().items():
        assert torch.equal(loaded.network.state_dict()[key], value.cpu())
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(OpenSegError, match="not a loadable novelty model"):
        NoveltyModel.load(tmp_path / "junk.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(OpenSegError, match="not a napari-openseg novelty model"):
        NoveltyModel.load(tmp_path / "other.pt")
    with pytest.raises(OpenSegError, match="does not exist"):
        NoveltyModel.load(tmp_path / "missing.pt")
    for damage, message in (
        (lambda c: c.pop("class_values"), "lacks class_values"),
        (lambda c: c.update(downsample=0), "shrink factor is 0"),
        (lambda c: c["bank"].update(unknown=torch.zeros(3)), "unknown prototype has 3 values"),
        (lambda c: c["bank"]["prototypes"].fill_(float("nan")), "NaN or infinite prototypes"),
    ):
        damaged = torch.load(path, weights_only=True)
        damage(damaged)
        torch.save(damaged, tmp_path / "damaged.pt")
        with pytest.raises(OpenSegError, match=message):  # KeyError, ZeroDivisionError, RuntimeError before
            NoveltyModel.load(tmp_path / "damaged.pt")


def test_whole_volume_map_has_the_input_shape_and_uses_the_unknown_prototype(trained):
    model = NoveltyModel.load(trained[1])
    image, labels = sphere_volume()
    big = np.pad(image, ((0, 0), (0, 0), (0, 20)))  # larger than one window: two windows along x
    maps = novelty_map(big, model, device="cpu", keep_raw=True)
    assert maps.fused.shape == big.shape == maps.segmentation.shape
    assert maps.raw.shape == (4, *big.shape)
    assert 0 <= maps.fused.min() and maps.fused.max() <= 1 and not maps.used_unknown
    assert set(np.unique(maps.segmentation)) <= {0, 1, 2}
    assert np.all(maps.fused[~maps.mask] == 0)
    blob = np.zeros(big.shape, bool)
    blob[..., 47:58] = big[..., 47:58] > 0.9
    seeded = model.bank.copy()
    seeded.seed_unknown(unknown_seed_embeddings(big, blob, model, device="cpu"))
    with_unknown = novelty_map(
        big, NoveltyModel(model.network, seeded, model.class_values), device="cpu", adapt_unknown=2
    )
    assert with_unknown.used_unknown
    # seeded on the blob itself, the unknown prototype must make the blob the most novel region
    assert with_unknown.fused[blob].mean() > with_unknown.fused[maps.mask & ~blob].mean()
    with pytest.raises(OpenSegError, match="3D volume"):
        novelty_map(image[0], model)


def test_helpers():
    assert window_starts(100, 64, 0.25) == [0, 36]
    assert window_starts(64, 64, 0.5) == [0] and window_starts(10, 64, 0.5) == [0]
    labels = np.array([0, 3, 7, 9])
    assert class_indices(labels, [0, 3, 7]).tolist() == [0, 1, 2, -1]
    huge = np.array([[0, 2**40], [5, 2**40 + 1]], np.int64)  # a lookup table as long as 2**40 once
    assert class_indices(huge, [2**40, 0]).tolist() == [[1, 0], [-1, -1]]
    image, _ = sphere_volume()
    mask = body_mask(image)
    assert mask[16, 16, 24] and mask[16, 16, 52] and not mask[0, 0, 0]
    assert SHAPE == image.shape


def test_shrunk_labels_keep_every_value_exactly_and_pick_the_nearest_voxel():
    labels = np.zeros((4, 6, 6), np.int64)
    labels[0, 0, 0] = 2**24 + 1  # float32 has no such integer: the old float detour gave 2**24
    labels[2, 2, 4] = 7
    small = labels_to_working(labels, 2)
    assert small.shape == (2, 3, 3) and small.dtype == np.int64
    assert small[0, 0, 0] == 2**24 + 1 and small[1, 1, 2] == 7 and small.sum() == 2**24 + 8
    assert labels_to_working(labels, 1) is labels


def test_the_unet_backbone_has_the_same_heads_and_checks_its_divisor():
    torch.manual_seed(0)
    config = MedOpenSegConfig(
        num_classes=3, embedding_dim=5, roi_size=(8, 16, 24), backbone="unet", feature_size=4
    )
    net = MedOpenSeg(config).eval()
    with torch.no_grad():
        logits, embeddings = net(torch.rand(2, 1, 8, 16, 24))
    assert logits.shape == (2, 3, 8, 16, 24) and embeddings.shape == (2, 5, 8, 16, 24)
    with pytest.raises(ValueError, match="divisible by 8"):
        net(torch.rand(1, 1, 8, 16, 20))
    with pytest.raises(ValueError, match="backbone must be one of"):
        MedOpenSegConfig(backbone="resnet")
    assert MedOpenSegConfig().backbone == "swinunetr"  # model files written before the choice load as before


def test_a_unet_model_file_loads_and_an_unknown_backbone_is_refused(tmp_path):
    from napari_openseg.core.novelty.prototypes import PrototypeBank

    torch.manual_seed(0)
    config = MedOpenSegConfig(
        num_classes=2, embedding_dim=4, roi_size=(8, 16, 16), backbone="unet", feature_size=4
    )
    bank = PrototypeBank([0, 1], 4)
    bank.set_from_means(torch.randn(2, 4), torch.arange(2))
    path = NoveltyModel(MedOpenSeg(config).eval(), bank, [0, 1], 2).save(tmp_path / "unet.pt")
    loaded = NoveltyModel.load(path)  # the file's architecture names its backbone, a string among numbers
    assert loaded.config.backbone == "unet" and loaded.downsample == 2
    for key, value in loaded.network.state_dict().items():
        assert torch.equal(value, NoveltyModel.load(path).network.state_dict()[key])
    content = torch.load(path, weights_only=True)
    content["config"]["backbone"] = "resnet"
    torch.save(content, tmp_path / "resnet.pt")
    with pytest.raises(OpenSegError, match="backbone is 'resnet', not one of"):
        NoveltyModel.load(tmp_path / "resnet.pt")


def test_max_steps_ends_a_run_early_and_a_resume_may_raise_it(tmp_path):
    image, labels = sphere_volume()
    settings = tiny_settings(epochs=5, max_steps=2)
    first = train_novelty([image], [labels], settings, checkpoint=tmp_path / "c.pt", device="cpu")
    assert first.steps == 2 and len(first.losses) == 2
    more = train_novelty(
        [image],
        [labels],
        tiny_settings(epochs=5, max_steps=3),
        checkpoint=tmp_path / "c.pt",
        resume=True,
        device="cpu",
    )
    assert more.steps == 3 and more.losses[:2] == first.losses
    with pytest.raises(OpenSegError, match="max steps must be >= 1"):
        tiny_settings(max_steps=0)


def test_the_model_keeps_its_intensity_signature_and_unlike_volumes_are_matched_or_refused(trained):
    from napari_openseg.core.novelty.modality import (
        REFUSE_ABOVE,
        SAME_BELOW,
        check_intensities,
        signature_distance,
    )
    from napari_openseg.core.preprocess import normalize_intensity

    model = NoveltyModel.load(trained[1])
    reference = model.info["intensity_signature"]
    image, _ = sphere_volume()
    normalized = normalize_intensity(image)
    mask = body_mask(normalized, normalized=True)
    same, notes = check_intensities(normalized, mask, reference)
    assert same is normalized and notes == []  # the training volume itself is used as it is
    brighter = normalized**0.5  # the same tissue order, another histogram: matched
    matched, notes = check_intensities(brighter, mask, reference)
    assert notes and "matched" in notes[0]
    own_before = signature_distance(reference, _signature(brighter, mask))
    assert (
        SAME_BELOW < own_before <= REFUSE_ABOVE
        and signature_distance(reference, _signature(matched, mask)) < 0.02
    )
    inverted = 1.0 - normalized
    with pytest.raises(OpenSegError, match="differ too much from the model's training volumes"):
        check_intensities(inverted, mask, reference)
    forced, notes = check_intensities(inverted, mask, reference, "match")
    assert notes and forced.shape == inverted.shape
    assert check_intensities(inverted, mask, reference, "as-is") == (inverted, [])
    with pytest.raises(OpenSegError, match="differ too much"):
        novelty_map(image.max() - image, model, mask=mask, device="cpu")
    maps = novelty_map(image.max() - image, model, mask=mask, device="cpu", intensity="match")
    assert maps.notes and maps.fused.shape == image.shape


def _signature(values, mask):
    from napari_openseg.core.novelty.modality import intensity_signature

    return intensity_signature(values, mask)


def test_the_body_mask_fills_a_cavity_that_the_first_slice_cuts_open():
    image = np.zeros((6, 20, 20), np.float32)
    image[:, 3:17, 3:17] = 1.0
    image[:3, 7:13, 7:13] = 0.0  # a cavity reaching the volume's first slice: no 3D hole
    mask = body_mask(image)
    assert mask[:3, 7:13, 7:13].all() and not mask[:, :2, :2].any()

"""Prototype bank, novelty scores, fusion, threshold and AUROC on hand-made embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_openseg.core.novelty.prototypes import PrototypeBank
from napari_openseg.core.novelty.scores import (
    appearance_novelty,
    auroc,
    fuse,
    maps_from_raw,
    nearest_class,
    novelty_components,
    otsu_threshold,
    robust_normalize,
    score_channels,
)
from napari_openseg.errors import OpenSegError

E = torch.eye(4)


def axis_bank(momentum: float = 0.9) -> PrototypeBank:
    """Classes 0, 1, 2 with prototypes on the first three axes of R^4."""
    bank = PrototypeBank([0, 1, 2], dim=4, momentum=momentum)
    bank.set_from_means(E[:3], torch.tensor([0, 1, 2]))
    return bank


# ---------------------------------------------------------------------- prototype bank


def test_first_update_sets_the_mean_direction_and_later_ones_move_by_the_momentum():
    bank = PrototypeBank([0, 5], dim=2, momentum=0.9)
    assert not bank.ready and bank.missing_classes() == [0, 5]
    # class 0 sees (2, 0) and (0, 2): the mean of their directions points along (1, 1)
    updated = bank.update(torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, -3.0]]), torch.tensor([0, 0, 1]))
    assert updated == [0, 1] and bank.ready
    assert torch.allclose(bank.prototypes[0], torch.tensor([1.0, 1.0]) / 2**0.5)
    assert torch.allclose(bank.prototypes[1], torch.tensor([0.0, -1.0]))
    # the next mean for class 1 is (1, 0): p <- normalise(0.9 * (0, -1) + 0.1 * (1, 0))
    bank.update(torch.tensor([[5.0, 0.0]]), torch.tensor([1]))
    expected = torch.nn.functional.normalize(torch.tensor([0.1, -0.9]), dim=0)
    assert torch.allclose(bank.prototypes[1], expected, atol=1e-6)
    assert bank.counts.tolist() == [1, 2]
    assert torch.allclose(bank.prototypes.norm(dim=1), torch.ones(2))


def test_update_ignores_negative_classes_and_never_tracks_gradients():
    bank = PrototypeBank([0, 1], dim=3)
    x = torch.randn(6, 3, requires_grad=True)
    bank.update(x, torch.tensor([-1, -1, 0, 0, -1, -1]))
    assert bank.counts.tolist() == [1, 0]
    assert not bank.prototypes.requires_grad
    with pytest.raises(OpenSegError, match="class indices must be < 2"):
        bank.update(x, torch.tensor([0, 1, 2, 0, 0, 0]))
    with pytest.raises(OpenSegError, match='"N F" with F=3'):
        bank.update(torch.zeros(2, 4), torch.tensor([0, 1]))


def test_unknown_prototype_seed_and_unlabelled_adaptation():
    bank = axis_bank(momentum=0.5)
    bank.seed_unknown(torch.tensor([[0.0, 0.0, 0.6, 0.8]]))
    assert torch.allclose(bank.unknown, torch.tensor([0.0, 0.0, 0.6, 0.8]))
    # unlabelled embeddings: some near class 0, a cluster along axis 3 that only the unknown wins
    unlabelled = torch.cat([E[:1].repeat(5, 1), E[3:].repeat(5, 1)])
    won = bank.adapt_unknown(unlabelled, steps=1)
    assert won == pytest.approx(0.5)
    expected = torch.nn.functional.normalize(0.5 * torch.tensor([0.0, 0.0, 0.6, 0.8]) + 0.5 * E[3], dim=0)
    assert torch.allclose(bank.unknown, expected, atol=1e-6)
    bank.adapt_unknown(unlabelled, steps=20)
    assert bank.unknown[3] > 0.99  # converged onto the unlabelled cluster; known prototypes unchanged
    assert torch.allclose(bank.prototypes, E[:3])


def test_seed_free_unknown_starts_at_the_least_familiar_embeddings():
    bank = axis_bank()
    x = torch.cat([E[:3].repeat(30, 1), -E[3:].repeat(1, 1)])
    bank.init_unknown_from_outliers(x, fraction=0.01)
    assert torch.allclose(bank.unknown, -E[3])


def test_bank_save_and_load_round_trip(tmp_path):
    bank = axis_bank()
    bank.seed_unknown(E[3:])
    bank.embedding_scale = 0.25
    path = bank.save(tmp_path / "bank.pt")
    loaded = PrototypeBank.load(path)
    assert loaded.class_values == [0, 1, 2] and loaded.momentum == 0.9
    assert torch.equal(loaded.prototypes, bank.prototypes) and torch.equal(loaded.unknown, bank.unknown)
    assert loaded.counts.tolist() == [1, 1, 1] and loaded.embedding_scale == 0.25
    with pytest.raises(OpenSegError, match="exists"):
        bank.save(path)
    (tmp_path / "other.pt").write_bytes(b"not a file")
    with pytest.raises(OpenSegError, match="not a readable prototype-bank"):
        PrototypeBank.load(tmp_path / "other.pt")


# ---------------------------------------------------------------------- scores


def test_cosine_and_distance_scores_of_hand_made_embeddings():
    bank = axis_bank()
    x = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],  # on prototype 0
            [0.0, 2.0, 0.0, 0.0],  # along prototype 1, twice as long
            [0.0, 0.0, 0.0, 1.0],  # orthogonal to every prototype
            [0.0, 0.0, 0.0, 3.0],  # orthogonal and far away
        ]
    )
    raw = score_channels(x, bank, chunk=3)  # chunk smaller than N: chunking must not change results
    assert torch.allclose(raw[:, 0], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    # sum_c |x - p_c|^2 by hand: on p0: 0 + 2 + 2; 2*e1: 5 + 1 + 5; e3: 2 * 3; 3*e3: 10 * 3
    assert torch.allclose(raw[:, 1], torch.tensor([4.0, 11.0, 6.0, 30.0]))
    assert torch.all(raw[:, 2:] == 0)  # no unknown prototype
    cosine, distance = novelty_components(raw.T.numpy(), 3, use_unknown=False)
    assert np.argmax(cosine) in (2, 3) and np.argmax(distance) == 3  # the far-away voxel scores highest
    assert cosine[0] == pytest.approx(0.0) and cosine[2] == pytest.approx(1.0)
    assert nearest_class(x[:2], bank).tolist() == [0, 1]


def test_unknown_prototype_raises_the_novelty_of_voxels_near_it():
    bank = axis_bank()
    x = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.7, 0.7], [1.0, 0.0, 0.0, 0.0]])
    plain = novelty_components(score_channels(x, bank).T.numpy(), 3, use_unknown=False)
    bank.seed_unknown(E[3:])
    raw = score_channels(x, bank)
    assert torch.allclose(raw[:, 2], torch.tensor([1.0, 0.7 / 0.98**0.5, 0.0]), atol=1e-5)
    cosine, distance = novelty_components(raw.T.numpy(), 3, use_unknown=True)
    # with the unknown prototype the cosine score is a margin: +1 on it, -1 on a known prototype
    assert cosine.tolist() == pytest.approx([1.0, 0.0, -1.0], abs=1e-5)
    assert distance[0] > distance[1] > distance[2]
    assert np.argmax(plain[0]) == 0 and np.argmax(cosine) == 0


def test_robust_normalisation_ignores_outliers_and_the_outside_of_the_mask():
    values = np.linspace(0, 1, 1000, dtype=np.float32)
    values[0], values[-1] = -1000, 1000  # extremes must not squash the rest
    mask = np.ones(1000, bool)
    mask[500:510] = False
    out = robust_normalize(values, mask)
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.all(out[500:510] == 0)
    assert out[250] == pytest.approx(0.25, abs=0.02) and out[750] == pytest.approx(0.75, abs=0.02)
    assert np.all(robust_normalize(np.full(10, 3.0)) == 0)  # a constant map is not novel anywhere


def test_fusion_is_the_weighted_mean_of_the_normalised_maps():
    cosine = np.array([0.0, 1.0, 1.0, 0.2], np.float32)
    distance = np.array([0.0, 0.0, 1.0, 0.6], np.float32)
    appearance = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
    assert fuse([cosine, distance], [0.5, 0.5]).tolist() == pytest.approx([0.0, 0.5, 1.0, 0.4])
    assert fuse([cosine, distance], [1.0, 0.0]).tolist() == pytest.approx(cosine.tolist())
    assert fuse([cosine, distance, appearance], [1, 1, 2]).tolist() == pytest.approx([0.5, 0.25, 1.0, 0.2])
    # a map that is missing leaves with its weight: the others keep their proportions
    assert fuse([cosine, distance, None], [1, 1, 8]).tolist() == pytest.approx([0.0, 0.5, 1.0, 0.4])
    with pytest.raises(OpenSegError, match="not all 0"):
        fuse([cosine, distance], [-1.0, 2.0])
    with pytest.raises(OpenSegError, match="a weight of 0"):
        fuse([cosine, None], [0.0, 1.0])
    with pytest.raises(OpenSegError, match="2 maps but 3"):
        fuse([cosine, distance], [1, 1, 1])


def test_otsu_threshold_splits_two_groups():
    values = np.r_[np.full(700, 0.1), np.full(300, 0.8)].astype(np.float32)
    level = otsu_threshold(values)
    assert 0.1 < level < 0.8
    assert ((values > level) == (values == np.float32(0.8))).all()
    with pytest.raises(OpenSegError, match="no voxels"):
        otsu_threshold(values, np.zeros(1000, bool))


def test_auroc_values_and_errors():
    score = np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.5])
    novel = np.array([0, 0, 0, 1, 1, 1], bool)
    assert auroc(score, novel, ~novel) == 1.0
    assert auroc(-score, novel, ~novel) == 0.0
    assert auroc(np.ones(6), novel, ~novel) == 0.5  # ties count one half
    known = np.array([1, 1, 0, 0, 0, 0], bool)  # voxel 2 takes no part
    assert auroc(
        np.array([0.1, 0.6, 9, 0.5, 0.7, 0.2]), np.array([0, 0, 0, 1, 1, 1], bool), known
    ) == pytest.approx(4 / 6)  # 4 of 6 pairs ordered
    with pytest.raises(OpenSegError, match="at least one novel"):
        auroc(score, np.zeros(6, bool), ~novel)
    with pytest.raises(OpenSegError, match="both novel and known"):
        auroc(score, novel, np.ones(6, bool))
    with pytest.raises(OpenSegError, match="needs finite scores"):  # NaN ranked above everything
        auroc(np.array([np.nan, 0.2, 0.3, 0.9, 0.8, 0.5]), novel, ~novel)


def test_maps_from_raw_flag_the_far_away_block():
    bank = axis_bank()
    emb = torch.zeros(4, 6, 6)
    emb[0] = 1.0  # every voxel on prototype 0 ...
    emb[:, 2:4, 2:4] = torch.tensor([0.0, 0.0, 0.0, 2.0])[:, None, None]  # ... except a novel block
    raw = score_channels(emb.flatten(1).T, bank).T.reshape(4, 6, 6).numpy()
    mask = np.ones((6, 6), bool)
    maps = maps_from_raw(raw, mask, 3, use_unknown=False)
    novel = np.zeros((6, 6), bool)
    novel[2:4, 2:4] = True
    assert np.array_equal(maps.novel_regions(), novel)
    assert maps.fused[novel].min() > maps.fused[~novel].max()
    assert auroc(maps.fused, novel, ~novel) == 1.0
    assert maps.novel_regions(threshold=1.0).sum() == 0
    with pytest.raises(OpenSegError, match="mask is empty"):
        maps_from_raw(raw, np.zeros((6, 6), bool), 3)


def test_appearance_flags_what_departs_from_its_own_class():
    image = np.zeros((1, 20, 20), np.float32)
    classes = np.zeros((1, 20, 20), np.uint8)
    classes[:, :, 10:] = 1
    rng = np.random.default_rng(0)
    image[:, :, 10:] = 0.8 + rng.normal(0, 0.02, (1, 20, 10))  # class 1 is bright, class 0 dark
    image[:, :, :10] = 0.2 + rng.normal(0, 0.02, (1, 20, 10))
    image[0, 4:7, 2:5] = 0.6  # brighter than its class (0), though darker than class 1
    image[0, 14:17, 14:17] = 0.5  # darker than its class (1)
    mask = np.ones(image.shape, bool)
    brighter = appearance_novelty(image, classes, mask, "brighter", sigma=0)
    darker = appearance_novelty(image, classes, mask, "darker", sigma=0)
    either = appearance_novelty(image, classes, mask, "either", sigma=0)
    lesion, hole = np.zeros(image.shape, bool), np.zeros(image.shape, bool)
    lesion[0, 4:7, 2:5], hole[0, 14:17, 14:17] = True, True
    rest = ~(lesion | hole)
    assert brighter[lesion].min() > 5 > brighter[rest].max() and brighter[hole].max() < 0
    assert darker[hole].min() > 5 > darker[rest].max() and darker[lesion].max() < 0
    assert either[lesion | hole].min() > 5 > either[rest].max()
    # plain intensity would rank the dark-class lesion below all of class 1; within its class it ranks first
    assert auroc(brighter, lesion, rest) == 1.0 and auroc(image, lesion, rest) < 0.6
    outside = mask.copy()
    outside[0, :, :3] = False
    assert np.all(appearance_novelty(image, classes, outside, sigma=0)[~outside] == 0)
    with pytest.raises(OpenSegError, match="appearance side"):
        appearance_novelty(image, classes, mask, "lighter")
    with pytest.raises(OpenSegError, match="differ"):
        appearance_novelty(image, classes[:, :10], mask)


def test_maps_from_raw_adds_the_appearance_map_to_the_fused_one():
    bank = axis_bank()
    emb = torch.zeros(4, 6, 6)
    emb[0] = 1.0  # every voxel looks like class 0 to the embeddings ...
    raw = score_channels(emb.flatten(1).T, bank).T.reshape(4, 6, 6).numpy()
    image = np.full((6, 6), 0.3, np.float32)
    image[2:4, 2:4] = 0.9  # ... but a block is much brighter than the rest of its class
    segmentation = np.zeros((6, 6), np.uint8)
    mask = np.ones((6, 6), bool)
    block = np.zeros((6, 6), bool)
    block[2:4, 2:4] = True
    maps = maps_from_raw(raw, mask, 3, False, segmentation=segmentation, image=image, sigma=0)
    assert maps.appearance is not None and auroc(maps.fused, block, ~block) == 1.0
    assert np.array_equal(maps.novel_regions(), block)
    plain = maps_from_raw(raw, mask, 3, False, segmentation=segmentation, image=image, side=None)
    assert plain.appearance is None and np.all(plain.fused == 0)  # the embeddings alone see nothing
    with pytest.raises(OpenSegError, match="one fusion weight per map"):
        maps_from_raw(raw, mask, 3, weights=(0.5, 0.5))

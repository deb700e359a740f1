"""Training-free novelty from the in-context network's features (tiny random network)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_openseg.core.novelty.free import InContextEmbedder, build_bank, training_free_novelty
from napari_openseg.core.support import build_support_set
from napari_openseg.errors import OpenSegError
from tests._novelty_data import sphere_volume


@pytest.fixture(scope="module")
def case():
    from napari_openseg.model.universeg import build_network

    torch.manual_seed(0)
    net = build_network((8, 8, 8), grid_size=32).eval()
    image, labels = sphere_volume()
    support = build_support_set(image, labels, axis=0)
    return net, image, labels, support


def test_bank_has_background_and_every_task_with_unit_prototypes(case):
    net, _, _, support = case
    embedder = InContextEmbedder(support, net, support_size=4, device="cpu")
    assert embedder.tasks == [1, 2] and embedder.dim == 2 * 8
    bank = build_bank(embedder, prototype_slices=4)
    assert bank.class_values == [0, 1, 2] and bank.ready
    assert torch.allclose(bank.prototypes.norm(dim=1), torch.ones(3), atol=1e-5)
    assert bank.embedding_scale > 0


def test_maps_have_the_volume_shape_along_any_axis(case):
    net, image, _, support = case
    maps = training_free_novelty(image, support, net, axis=0, support_size=4, device="cpu")
    assert maps.fused.shape == image.shape == maps.segmentation.shape
    assert 0 <= maps.fused.min() and maps.fused.max() <= 1 and not maps.used_unknown
    assert set(np.unique(maps.segmentation)) <= {0, 1, 2}
    assert np.all(maps.fused[~maps.mask] == 0)
    support_x = build_support_set(image, sphere_volume()[1], axis=2)
    assert (
        training_free_novelty(image, support_x, net, axis=2, support_size=4, device="cpu").fused.shape
        == image.shape
    )


def test_seeded_unknown_prototype_marks_the_seeded_structure(case):
    net, image, _, support = case
    blob = image > 0.9
    maps = training_free_novelty(
        image, support, net, axis=0, support_size=4, device="cpu", unknown_seed=(image, blob)
    )
    assert maps.used_unknown
    assert maps.fused[blob].mean() > maps.fused[maps.mask & ~blob].mean()
    with pytest.raises(OpenSegError, match="the unknown seed mask is empty"):
        training_free_novelty(image, support, net, device="cpu", unknown_seed=(image, np.zeros_like(blob)))


def test_prototype_slices_merge_the_entries_of_one_slice(case):
    from napari_openseg.core.novelty.free import _prototype_slices, slice_key

    _, image, labels, _ = case
    support = build_support_set(image, labels, axis=2)  # non-contiguous slices: every entry is a copy
    slices = _prototype_slices(support, limit=100, seed=0)
    assert len(slices) == len({slice_key(e) for e in support.entries}) < len(support)
    for key, _, label_map in slices:
        assert np.array_equal(label_map, labels[:, :, key[2]])  # both classes marked, the rest background


def test_adapting_the_unknown_prototype_moves_it_and_needs_a_seed(case, monkeypatch):
    from napari_openseg.core.novelty import free as novelty_free

    # Sample every slice and pixel: on this tiny grid the default strides keep only a few blob pixels.
    monkeypatch.setattr(novelty_free, "ADAPT_SLICE_STRIDE", 1)
    monkeypatch.setattr(novelty_free, "ADAPT_STRIDE", 1)
    net, image, _, support = case
    blob = image > 0.9
    seeded = training_free_novelty(
        image, support, net, axis=0, support_size=4, device="cpu", unknown_seed=(image, blob), keep_raw=True
    )
    adapted = training_free_novelty(
        image,
        support,
        net,
        axis=0,
        support_size=4,
        device="cpu",
        unknown_seed=(image, blob),
        adapt_unknown=3,
        keep_raw=True,
    )
    assert adapted.used_unknown and adapted.fused.shape == image.shape
    # The known-class columns do not depend on the unknown prototype; its cosine column moves with it.
    assert np.allclose(adapted.raw[:2], seeded.raw[:2], atol=1e-5)
    assert not np.allclose(adapted.raw[2], seeded.raw[2], atol=1e-3)
    assert adapted.fused[blob].mean() > adapted.fused[adapted.mask & ~blob].mean()
    with pytest.raises(OpenSegError, match="needs an unknown seed"):
        training_free_novelty(image, support, net, device="cpu", adapt_unknown=3)


def test_the_segmentation_holds_only_predicted_classes_even_where_two_touch():
    # label 3 touches label 1; resizing class indices instead of scores would draw 1s and 2s past it
    image = np.zeros((4, 48, 48), np.float32)
    labels = np.zeros((4, 48, 48), np.uint8)
    for value, rows, cols in ((1, (8, 40), (4, 24)), (3, (8, 40), (24, 44)), (2, (42, 47), (4, 10))):
        image[:, rows[0] : rows[1], cols[0] : cols[1]] = value
        labels[:, rows[0] : rows[1], cols[0] : cols[1]] = value
    image += np.random.default_rng(0).normal(0, 0.05, image.shape).astype(np.float32)
    support = build_support_set(image, labels)
    maps = training_free_novelty(image, support, support_size=4, device="cpu", prototype_slices=4)
    segmentation = maps.segmentation  # the default weights tell these three apart
    assert not (segmentation[:, 8:40] == 2).any()
    assert not (segmentation[:, :, 44:] == 1).any()


def test_slices_without_body_are_not_embedded_and_the_rest_is_unchanged(case, monkeypatch):
    net, image, _, support = case
    mask = np.zeros(image.shape, bool)
    mask[3:-3] = True  # the first and last three slices hold no body
    embedded = []
    original = InContextEmbedder.embed

    def counting(self, query, encoded=None):
        embedded.append(query.shape[0])
        return original(self, query, encoded)

    monkeypatch.setattr(InContextEmbedder, "embed", counting)
    options = {"axis": 0, "support_size": 4, "device": "cpu", "keep_raw": True, "batch_size": 1}
    full = training_free_novelty(image, support, net, mask=np.ones(image.shape, bool), **options)
    in_full, embedded[:] = len(embedded), []
    masked = training_free_novelty(image, support, net, mask=mask, **options)
    assert in_full - len(embedded) == 6  # the same prototype slices, six query slices fewer
    assert np.all(masked.raw[:, :3] == 0) and np.all(masked.raw[:, -3:] == 0)
    assert np.all(masked.segmentation[:3] == 0) and np.all(masked.segmentation[-3:] == 0)
    assert np.allclose(masked.raw[:, 3:-3], full.raw[:, 3:-3], atol=1e-5)
    assert np.array_equal(masked.segmentation[3:-3], full.segmentation[3:-3])

"""Synthetic tasks, augmentation and real tasks: seeded, well-formed, and doing what they claim."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_openseg.training.incontext.augment import (
    InTaskAugment,
    TaskAugment,
    augment_entries,
    augment_task,
    boundary,
    sobel,
)
from napari_openseg.training.incontext.synth import SynthConfig, make_family, make_members, synthetic_task
from tests.conftest import SHARED_DATA, needs_shared


def test_synthetic_task_is_seeded_and_well_formed():
    images, masks = synthetic_task((5, 1), 6)
    again, again_masks = synthetic_task((5, 1), 6)
    other, _ = synthetic_task((5, 2), 6)
    assert images.shape == masks.shape == (6, 1, 64, 64)
    assert torch.equal(images, again) and torch.equal(masks, again_masks)
    assert not torch.equal(images, other)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert set(torch.unique(masks).tolist()) <= {0.0, 1.0}
    # The task's label covers a sensible share of the query (entry 0).
    assert 0.005 < float(masks[0].mean()) < 0.7


def test_members_of_a_family_share_labels_but_differ():
    gen = torch.Generator().manual_seed(0)
    family = make_family(gen, SynthConfig(size=48))
    images, labels = make_members(family, 4, gen, SynthConfig(size=48))
    assert labels.shape == (4, 48, 48) and int(labels.max()) < family.n_labels
    overlap = (labels[0] == labels[1]).float().mean()
    assert 0.5 < float(overlap) < 1.0  # same anatomy, deformed
    assert not torch.equal(images[0], images[1])
    # Same label, similar intensity across members: the appearance model is the family's.
    for value in torch.unique(labels[0])[:3]:
        a, b = images[0, 0][labels[0] == value], images[1, 0][labels[1] == value]
        if a.numel() > 50 and b.numel() > 50:
            assert abs(float(a.median()) - float(b.median())) < 0.3


def test_in_task_augmentation_is_per_entry_and_keeps_ranges():
    images, masks = synthetic_task((1, 1), 5)
    copies, copy_masks = images[:1].repeat(5, 1, 1, 1), masks[:1].repeat(5, 1, 1, 1)
    gen = torch.Generator().manual_seed(3)
    strong = InTaskAugment(p_affine=1.0, p_elastic=1.0, p_gamma=1.0, p_noise=1.0)
    out, out_masks = augment_entries(copies, copy_masks, gen, strong)
    assert out.shape == copies.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert set(torch.unique(out_masks).tolist()) <= {0.0, 1.0}
    assert not torch.equal(out[0], out[1]) and not torch.equal(out_masks[0], out_masks[1])
    same = augment_entries(copies, copy_masks, torch.Generator().manual_seed(3), strong)
    assert torch.equal(same[0], out)


def test_task_augmentation_is_shared_by_all_entries():
    images, masks = synthetic_task((2, 2), 4)
    cfg = TaskAugment(p_flip=1.0, p_rot90=0.0, p_invert=1.0, p_boundary=1.0, p_sobel=0.0, p_blur=0.0)
    out, out_masks = augment_task(images, masks, torch.Generator().manual_seed(0), cfg)
    flipped_h = torch.allclose(out, 1 - images.flip(3))
    flipped_v = torch.allclose(out, 1 - images.flip(2))
    assert flipped_h or flipped_v  # every entry got the same flip and the inversion
    dim = 3 if flipped_h else 2
    assert torch.all(out_masks <= masks.flip(dim)) and float(out_masks.sum()) < float(masks.sum())


def test_augmentation_checks_shapes():
    images, masks = synthetic_task((2, 3), 2)
    with pytest.raises(ValueError, match="N 1 g g"):
        augment_entries(images[:, 0], masks[:, 0], torch.Generator())
    with pytest.raises(ValueError, match="N 1 g g"):
        augment_task(images, masks[:1], torch.Generator())


def test_boundary_and_sobel():
    mask = torch.zeros(1, 1, 10, 10)
    mask[..., 2:8, 2:8] = 1
    ring = boundary(mask, 1)
    assert int(ring.sum()) == 36 - 16 and float(ring[0, 0, 4, 4]) == 0 and float(ring[0, 0, 2, 4]) == 1
    step = torch.zeros(1, 1, 8, 8)
    step[..., 4:] = 1
    edges = sobel(step)
    assert float(edges.max()) == pytest.approx(1.0) and float(edges[0, 0, :, 0].max()) == 0.0


@needs_shared
def test_real_tasks_cover_every_label_and_axis():
    from napari_openseg.training.incontext.tasks import (
        build_bank,
        episode_indices,
        sample_episode,
        shared_volumes,
    )
    from napari_openseg.training.splits import hippocampus_splits

    volumes = shared_volumes(SHARED_DATA, "val")
    assert sorted(volumes) == [
        "brain_structures",
        "colin27_aal",
        "colin27_brodmann",
        "hippocampus",
        "mni152_gm_wm",
    ]
    assert [v.subject for v in volumes["hippocampus"]] == hippocampus_splits()["val"]
    bank = build_bank(volumes["hippocampus"][:3], grid=32)
    assert {(t.label, t.axis) for t in bank.tasks} == {(v, a) for v in (1, 2) for a in (0, 1, 2)}
    task = bank.tasks[0]
    assert task.masks.shape[1:] == (1, 32, 32) and bool(task.masks.flatten(1).any(1).all())
    images, masks = sample_episode(bank, task, 4, np.random.default_rng(0))
    assert images.shape == (5, 1, 32, 32) and masks.shape == (5, 1, 32, 32)
    mni = build_bank(volumes["mni152_gm_wm"], grid=32, axes=(1,))
    assert {(t.label, t.axis) for t in mni.tasks} == {(1, 1), (2, 1)}
    # A single-subject task draws support slices away from the query slice; others from other subjects.
    rng = np.random.default_rng(1)
    for _ in range(20):
        picked = episode_indices(mni.tasks[0], 6, rng, min_gap=3)
        assert np.all(np.abs(mni.tasks[0].slices[picked[1:]] - mni.tasks[0].slices[picked[0]]) >= 3)
        picked = episode_indices(bank.tasks[0], 6, rng)
        assert not np.isin(bank.tasks[0].subjects[picked[1:]], bank.tasks[0].subjects[picked[0]]).any()


@needs_shared
def test_empty_target_episodes_take_slices_without_the_label():
    from napari_openseg.training.incontext.episodes import EpisodeConfig, training_batch
    from napari_openseg.training.incontext.tasks import build_bank, sample_episode, shared_volumes

    volumes = shared_volumes(SHARED_DATA, "val")["hippocampus"][:2]
    labelled_only = build_bank(volumes, grid=32)
    bank = build_bank(volumes, grid=32, all_slices=True)
    assert len(bank.images) > len(labelled_only.images)  # the unlabelled ends are kept too
    for task in bank.tasks:
        # Every kept slice of the task's volumes and axis either holds the label or is listed as absent.
        assert len(task.absent_ids) > 0 and not np.isin(task.absent_ids, task.image_ids).any()
    task = bank.tasks[0]
    images, masks = sample_episode(bank, task, 3, np.random.default_rng(0), empty_query=True)
    assert float(masks[0].sum()) == 0 and bool(masks[1:].flatten(1).any(1).all())
    assert any(torch.equal(images[0], bank.images[i].float()) for i in task.absent_ids)
    batch = training_batch(0, 0, EpisodeConfig(batch_size=4, real_fraction=1.0, empty_fraction=1.0), bank)
    assert all(s.endswith(":empty") for s in batch.sources) and float(batch.query_masks.sum()) == 0
    plain = training_batch(0, 0, EpisodeConfig(batch_size=4, real_fraction=1.0), bank)
    assert not any(s.endswith(":empty") for s in plain.sources) and bool(
        plain.query_masks.flatten(1).any(1).all()
    )


def test_cross_entropy_term_pushes_a_blob_off_an_empty_target():
    from napari_openseg.training.incontext.episodes import episode_loss

    target = torch.zeros(1, 1, 16, 16)

    def blob_gradient(bce_weight: float) -> float:
        logits = torch.full((1, 1, 16, 16), -8.0)
        logits[..., 4:12, 4:12] = 8.0
        logits.requires_grad_(True)
        episode_loss(logits, target, bce_weight).backward()
        return float(logits.grad[..., 4:12, 4:12].mean())

    # Soft Dice alone hardly moves a confident blob (its gradient vanishes); cross-entropy does.
    assert 0 < blob_gradient(0.0) < 1e-6
    assert blob_gradient(1.0) > 1e-3

"""propagate() / iter_propagate(): a real (tiny, briefly trained) network carries a painted disc
through a synthetic volume; fronts, stopping, corrections, unordered stacks, results and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_openseg.core.metrics import dice_score
from napari_openseg.core.preprocess import normalize_intensity, to_grid
from napari_openseg.core.progress import Progress
from napari_openseg.core.propagate.fronts import Front, make_fronts
from napari_openseg.core.propagate.memory import slice_embeddings
from napari_openseg.core.propagate.propagation import PropagationResult, iter_propagate, propagate
from napari_openseg.errors import OpenSegError
from tests._blobs import disc_volume, largest_slice, one_thread, train_blob_net

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

#: The bright discs' pixel classifier joins; ``classifier_stop=0`` keeps the confidence rule for
#: them, which these tests are about (tests/propagate/test_classifier.py tests the agreement rule).
FAST = {"device": "cpu", "bank_size": 6, "draws": 2, "classifier_stop": 0.0}


@pytest.fixture(scope="module")
def blob_net():
    return train_blob_net()


@pytest.fixture(scope="module")
def disc():
    image, truth = disc_volume()  # the disc is on slices 4..19 of 24
    prompt = np.zeros_like(truth)
    z = largest_slice(truth)
    prompt[z] = truth[z]
    return image, truth, prompt, z


def drain(generator):
    steps = []
    while True:
        try:
            steps.append(next(generator))
        except StopIteration as stop:
            return steps, stop.value


def test_a_painted_disc_is_carried_through_a_moving_growing_shrinking_volume(blob_net, disc):
    image, truth, prompt, z = disc
    steps, result = drain(iter_propagate(image, prompt, blob_net, **FAST))
    assert isinstance(result, PropagationResult)
    assert result.labels.shape == truth.shape and set(np.unique(result.labels)) <= {0, 1}
    assert dice_score(result.labels == 1, truth == 1) >= 0.8
    assert np.array_equal(result.labels[z], prompt[z])  # the painted slice is kept as painted
    # The disc ends at slices 4 and 19: two empty slices in a row stop each front, so the outermost
    # slices are never predicted and stay empty.
    assert not result.labels[:3].any() and not result.labels[21:].any()
    assert np.isnan(result.confidence[0, [0, 1, z, 22, 23]]).all()
    assert np.all(result.confidence[0, 5:19][np.arange(5, 19) != z] > 0.5)
    assert all(isinstance(s, Progress) for s in steps) and steps[-1].done == steps[-1].total
    predicted = [s.payload["slice"] for s in steps[1:]]
    assert len(predicted) == len(set(predicted))  # no slice predicted twice
    distances = [abs(s - z) for s in predicted]
    assert distances == sorted(distances)  # both fronts advance together, nearest first


def test_two_prompts_share_the_volume_and_meet_half_way(tiny_net):
    image, truth = disc_volume((16, 24, 24), first=0, last=15, seed=1)
    prompt = np.zeros_like(truth)
    prompt[[3, 10]] = truth[[3, 10]]
    steps, result = drain(iter_propagate(image, prompt, tiny_net, min_area=0.0, stop_after=99, **FAST))
    order = [s.payload["slice"] for s in steps[1:]]
    # Slices 4..6 belong to prompt 3 and 7..9 to prompt 10 (the tie at 6.5 cannot happen): each
    # front takes its share, nearest first, and no slice is predicted twice.
    assert sorted(order) == [0, 1, 2, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15]
    assert order[:4] == [2, 4, 9, 11]
    assert result.prompt_slices == {1: [3, 10]}
    assert steps[-1].done == steps[-1].total == 14


def test_a_tie_between_two_prompts_goes_to_the_lower_one(blob_net):
    # The disc is on slices 0..3 and 6..8; prompts on 2 and 6; slice 4 is 2 away from both.
    image, truth = disc_volume((9, 24, 24), first=0, last=8, seed=2)
    truth[4:6] = 0
    image[4:6] = image[0, 0, 0]
    prompt = np.zeros_like(truth)
    prompt[[2, 6]] = truth[[2, 6]]
    steps, result = drain(iter_propagate(image, prompt, blob_net, stop_after=1, **FAST))
    # Slice 4 belongs to the front from slice 2, which still sees the disc on slice 3 and so goes
    # on to slice 4; the front from 6 stops at the empty slice 5 and never reaches slice 4.
    assert [s.payload["slice"] for s in steps[1:]] == [1, 3, 5, 7, 0, 4, 8]
    assert np.isfinite(result.confidence[0, [4, 5]]).all()
    assert not result.labels[4:6].any()


@pytest.mark.parametrize(
    "direction, expected",
    [
        ("forward", [4, 11, 5, 12, 6, 13, 7, 14, 8, 15, 9]),
        ("backward", [2, 9, 1, 8, 0, 7, 6, 5, 4]),
    ],
)
def test_one_direction_runs_each_front_to_the_next_prompt(tiny_net, direction, expected):
    image, truth = disc_volume((16, 24, 24), first=0, last=15, seed=1)
    prompt = np.zeros_like(truth)
    prompt[[3, 10]] = truth[[3, 10]]
    steps, result = drain(
        iter_propagate(image, prompt, tiny_net, min_area=0.0, stop_after=99, direction=direction, **FAST)
    )
    # With no front coming the other way, nothing meets half-way: a front runs to the next prompt.
    assert [s.payload["slice"] for s in steps[1:]] == expected
    assert np.isfinite(result.confidence[0, expected]).all()
    assert np.isnan(np.delete(result.confidence[0], expected)).all()


def test_correcting_the_least_confident_slice_pins_it(blob_net, disc):
    image, truth, prompt, _ = disc
    first = propagate(image, prompt, blob_net, **FAST)
    weakest = first.least_confident_slice()
    assert weakest is not None and np.isfinite(first.confidence[0, weakest])
    assert first.confidence[0, weakest] == np.nanmin(first.confidence)
    edited = first.labels.copy()
    edited[weakest] = truth[weakest]
    edited[weakest, :3, :3] = 1  # the user's mark: a fix that changes something wherever the slice is
    assert not np.array_equal(edited[weakest], first.labels[weakest])
    new_prompt, complete = first.with_corrections(prompt, edited)
    assert complete == [weakest]
    assert np.array_equal(new_prompt[weakest], edited[weakest])
    assert np.array_equal(np.delete(new_prompt, weakest, 0), np.delete(prompt, weakest, 0))
    second = propagate(image, new_prompt, blob_net, complete_slices=complete, **FAST)
    assert np.array_equal(second.labels[weakest], edited[weakest])
    assert np.isnan(second.confidence[0, weakest])
    assert second.complete_slices == [weakest]


def test_erasing_the_object_on_a_slice_stops_it_there(blob_net, disc):
    image, truth, prompt, z = disc
    first = propagate(image, prompt, blob_net, **FAST)
    edited = first.labels.copy()
    edited[z + 4] = 0
    new_prompt, complete = first.with_corrections(prompt, edited)
    assert complete == [z + 4]
    second = propagate(image, new_prompt, blob_net, complete_slices=complete, **FAST)
    assert not second.labels[z + 4 :].any()
    assert second.labels[z + 1 : z + 4].any(axis=(1, 2)).all()
    assert np.isnan(second.confidence[0, z + 4 :]).all()


def test_a_run_of_low_confidence_slices_ends_a_front_and_is_left_empty(blob_net, disc):
    image, truth, prompt, z = disc
    # Every prediction's confidence is below 1: each front stops after `stop_after` slices, and the
    # slices of that run are undone, so only the painted slice remains.
    for stop_after in (2, 3):
        steps, result = drain(
            iter_propagate(image, prompt, blob_net, stop_confidence=1.0, stop_after=stop_after, **FAST)
        )
        predicted = sorted(s.payload["slice"] for s in steps[1:])
        assert predicted == [z + d for d in range(-stop_after, stop_after + 1) if d != 0]
        assert np.array_equal(result.labels, prompt)
        # Both fronts ended on confidence, at the first slice of their run, next to the prompt.
        assert result.confidence_stops == {1: [z - 1, z + 1]}
        assert result.summary()["confidence_stops"] == {"1": [z - 1, z + 1]}
    # A floor below every confidence on the disc changes nothing there.
    plain = propagate(image, prompt, blob_net, **FAST)
    low = propagate(image, prompt, blob_net, stop_confidence=0.05, **FAST)
    assert np.array_equal(plain.labels[5:19], low.labels[5:19])
    assert low.confidence_stops == {}  # the disc vanished: no front ended on confidence


def test_the_stop_rule_counts_runs_of_vanished_or_doubtful_slices():
    # (vanished, doubtful) per slice, stop_after = 2
    front = Front(1, [5, 6, 7, 8, 9])
    for s, (vanished, doubtful) in zip((5, 6, 7), [(False, True), (False, False), (True, False)]):
        front.observe(s, vanished, doubtful, f"written {s}", stop_after=2)
        assert not front.stopped  # a confident slice broke the first run; the second is one long
    assert front.failing_run == 1
    front.observe(8, False, True, "written 8", stop_after=2)
    assert front.stopped and front.failing_run == 2
    assert not front.stopped_on_confidence  # slice 7 vanished: not a confidence stop
    assert front.doubtful == [(8, "written 8")]  # what iter_propagate undoes

    front = Front(1, [4, 3, 2])
    front.observe(4, False, True, "a", stop_after=2)
    front.observe(3, False, True, "b", stop_after=2)
    assert front.stopped and front.stopped_on_confidence and front.doubtful == [(4, "a"), (3, "b")]


def test_a_stopped_front_gives_back_what_it_covered_not_background(blob_net, monkeypatch):
    from napari_openseg.core.propagate import propagation as module

    image, truth = disc_volume((16, 40, 48), first=3, last=12)
    both = np.zeros(truth.shape, np.uint8)
    both[5] = truth[5]  # label 1: the whole disc on slice 5
    part = truth[9].copy()
    part[:, :26] = 0
    both[9] = part * 2  # label 2: part of it on slice 9; its backward front reaches slices 4 and 3
    # Label 2 is made doubtful on slices 4 and 3 (confidence 0.3 < 0.7), whatever the tiny network
    # says there, and sure everywhere else: its backward front stops after slice 3 and gives back
    # what it wrote on 4 and 3, where label 1's front (from slice 5) had already written.
    measure = module._measure

    def doubtful_on_4_and_3(run, value, s, probs, grid_mask):
        measures = measure(run, value, s, probs, grid_mask)
        measures["confidence"] = 0.3 if value == 2 and s in (3, 4) else 0.95
        return measures

    monkeypatch.setattr(module, "_measure", doubtful_on_4_and_3)
    # the network alone: label 2's pixel classifier would see the whole bright disc as its object
    options = dict(stop_confidence=0.7, stop_after=2, min_area=0.0, pixel_classifier="never", **FAST)
    steps, result = drain(iter_propagate(image, both, blob_net, **options))
    label_1 = {
        step.payload["slice"]: step.payload["mask"] for step in steps[1:] if step.payload["label"] == 1
    }
    label_2 = {
        step.payload["slice"]: step.payload["mask"] for step in steps[1:] if step.payload["label"] == 2
    }
    assert label_2[4].any() and label_2[3].any()  # label 2 wrote there before its front stopped
    assert result.confidence_stops == {2: [4]} and not (result.labels[3:5] == 2).any()
    assert label_1[3].sum() > 0 and (result.labels[3][label_1[3]] == 1).all()  # none of label 1's lost
    alone = propagate(image, np.where(both == 1, 1, 0).astype(np.uint8), blob_net, **options)
    for s in (3, 4):
        assert np.array_equal(result.labels[s] == 1, alone.labels[s] == 1)


def test_the_relative_stop_ends_a_front_that_fades_not_one_that_is_steadily_unsure(
    blob_net, disc, monkeypatch
):
    from napari_openseg.core.propagate import propagation as module

    image, truth, prompt, z = disc  # the disc is on slices 4..19
    measure = module._measure
    # Backward front: unsure from its first slice on (0.5, then 0.45), but steadily so. Forward
    # front: sure on its first two slices (0.9), then 0.6 < 0.7 x 0.9 from slice z + 3 on.
    confidence = {z - d: 0.5 if d == 1 else 0.45 for d in range(1, z + 1)}
    confidence.update({z + d: 0.9 if d <= 2 else 0.6 for d in range(1, 24 - z)})

    def scripted(run, value, s, probs, grid_mask):
        return {**measure(run, value, s, probs, grid_mask), "confidence": confidence[s]}

    monkeypatch.setattr(module, "_measure", scripted)
    relative = propagate(image, prompt, blob_net, **FAST)  # the default: 0.7 x the first slice's
    assert relative.confidence_stops == {1: [z + 3]}  # forward ends at z + 3, z + 4, both undone
    assert relative.labels[z + 1 : z + 3].any(axis=(1, 2)).all() and not relative.labels[z + 3 :].any()
    assert relative.labels[5:z].any(axis=(1, 2)).all()  # backward runs on to the disc's end
    # An absolute threshold between the two fronts' levels does the opposite on both.
    absolute = propagate(image, prompt, blob_net, stop_confidence=0.55, stop_ratio=0.0, **FAST)
    assert absolute.confidence_stops == {1: [z - 1]} and not absolute.labels[:z].any()
    assert absolute.labels[z + 3 : 19].any(axis=(1, 2)).all()


def test_undoing_goes_back_through_labels_that_were_undone_themselves():
    from napari_openseg.core.propagate.propagation import _undo, _Written

    labels, best = np.zeros((1, 1, 3), np.uint8), np.zeros((1, 1, 3), np.float32)
    labels[0, 0], best[0, 0] = [7, 7, 7], [0.6, 0.6, 0.6]  # label 7, kept
    everywhere = np.ones((1, 3), bool)
    by_3 = _Written(0, 3, everywhere, labels[0].copy(), best[0].copy())  # label 3 covers 7 (doubtful)
    labels[0, 0], best[0, 0] = [3, 3, 3], [0.7, 0.7, 0.7]
    left = np.array([[True, False, False]])
    by_5 = _Written(0, 5, left, labels[0].copy(), best[0].copy())  # label 5 covers one of 3's (doubtful)
    labels[0, 0, 0], best[0, 0, 0] = 5, 0.8
    undone = {}
    _undo(by_3, labels, best, undone)  # 3 stops: its two voxels go back to 7; the 5 stays
    assert labels[0, 0].tolist() == [5, 7, 7]
    _undo(by_5, labels, best, undone)  # 5 stops: its voxel would go back to 3, itself undone, so to 7
    assert labels[0, 0].tolist() == [7, 7, 7] and np.allclose(best[0, 0], 0.6)


def test_one_prompt_segmentation_of_an_unordered_stack(blob_net, disc):
    image, truth, _, _ = disc
    keep = np.arange(5, 19)  # slices that show the disc
    order = np.random.default_rng(3).permutation(keep)
    stack, stack_truth = image[order], truth[order]
    prompted = int(np.argmax(stack_truth.sum(axis=(1, 2))))
    prompt = np.zeros_like(stack_truth)
    prompt[prompted] = stack_truth[prompted]
    steps, result = drain(iter_propagate(stack, prompt, blob_net, unordered=True, **FAST))
    assert dice_score(result.labels == 1, stack_truth == 1) >= 0.8
    # Every image is segmented: nothing stops in an unordered stack.
    finite = np.isfinite(result.confidence[0])
    assert finite.sum() == len(order) - 1 and not finite[prompted]
    # The first image taken is the one most like the prompt, not the next one in the stack.
    grid, _ = to_grid(torch.from_numpy(normalize_intensity(stack)), 32)
    emb = slice_embeddings(grid)
    similarity = (emb @ emb[prompted]).numpy()
    similarity[prompted] = -np.inf
    assert steps[1].payload["slice"] == int(np.argmax(similarity))


def test_several_labels_are_separate_objects_and_painted_voxels_stay(tiny_net):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(6, 20, 20)).astype(np.float32)
    prompt = np.zeros(image.shape, np.uint16)
    prompt[2, 3:8, 3:8] = 7
    prompt[4, 10:16, 10:16] = 300
    result = propagate(image, prompt, tiny_net, min_area=0.0, stop_after=99, **FAST)
    assert result.label_values == [7, 300] and result.labels.dtype == np.uint16
    assert set(np.unique(result.labels)) <= {0, 7, 300}
    assert np.array_equal(result.labels[2][prompt[2] == 7], np.full(25, 7))
    assert np.array_equal(result.labels[4][prompt[4] == 300], np.full(36, 300))
    assert result.confidence.shape == (2, 6)
    assert np.isnan(result.confidence[0, 2]) and np.isnan(result.confidence[1, 4])
    assert np.isfinite(result.confidence[0, [0, 1, 3, 4, 5]]).all()
    only = propagate(image, prompt, tiny_net, label_values=[300], **FAST)
    assert only.label_values == [300] and not (only.labels == 7).any()


@pytest.mark.parametrize("axis", [1, 2, -1])
def test_any_slice_axis_gives_the_same_result_as_moving_it_first(tiny_net, axis):
    image, truth = disc_volume((10, 12, 14), first=2, last=8, seed=4)
    image, truth = np.moveaxis(image, 0, axis), np.moveaxis(truth, 0, axis)
    prompt = np.zeros_like(truth)
    index = [slice(None)] * 3
    index[axis] = 5
    prompt[tuple(index)] = truth[tuple(index)]
    along = propagate(image, prompt, tiny_net, axis=axis, **FAST)
    moved = propagate(np.moveaxis(image, axis, 0), np.moveaxis(prompt, axis, 0), tiny_net, axis=0, **FAST)
    assert along.labels.shape == image.shape and along.axis == axis % 3
    assert np.array_equal(along.labels, np.moveaxis(moved.labels, 0, axis))
    assert np.allclose(along.confidence, moved.confidence, equal_nan=True)


def test_support_terms_kept_per_entry_give_exactly_the_direct_prediction():
    from napari_openseg.core.propagate.memory import MemoryBank, MemoryEntry
    from napari_openseg.core.propagate.propagation import _encoded_support, _predict
    from napari_openseg.model.fast import fast_forward, prepare_for_inference
    from napari_openseg.model.universeg import build_network

    torch.manual_seed(0)
    net = prepare_for_inference(build_network((8, 8, 8), grid_size=32), torch.device("cpu"), torch.float32)
    images = torch.rand(6, 1, 32, 32)
    masks = (torch.rand(6, 32, 32) > 0.6).float()
    embeddings = slice_embeddings(images)
    bank = MemoryBank(capacity=8, floor=0.0)
    bank.pin(MemoryEntry(images[0, 0], masks[0], 1.0, embeddings[0]))
    for k in range(1, 6):
        bank.offer(MemoryEntry(images[k, 0], masks[k], 0.9, embeddings[k]))
    draws = bank.draw(embeddings[2], size=7, count=3, rng=np.random.default_rng(0))
    query = torch.rand(1, 1, 32, 32).expand(3, -1, -1, -1)
    index = torch.as_tensor(draws)
    with torch.inference_mode():
        direct = fast_forward(net, query, images[index], masks[index].unsqueeze(2))
        unkept = fast_forward(net, query, encoded=_encoded_support(net, bank.entries, draws, keep=False))
        assert all(e.encoded is None for e in bank.entries)  # over the memory budget: nothing is kept
        kept = fast_forward(net, query, encoded=_encoded_support(net, bank.entries, draws))
        again = fast_forward(
            net, query, encoded=_encoded_support(net, bank.entries, draws)
        )  # from the kept terms
    # Terms are computed for the entries drawn, and only for them.
    assert {k for k, e in enumerate(bank.entries) if e.encoded is not None} == set(np.unique(draws).tolist())
    assert torch.allclose(direct, kept, atol=1e-5) and torch.equal(kept, again) and torch.equal(kept, unkept)
    # Draws holding the same entries in another order are one support set, predicted once.
    probs = _predict(net, bank.entries, np.stack([draws[0], draws[0][::-1], draws[1]]), query[0], keep=True)
    assert probs.shape == (3, 32, 32) and torch.equal(probs[0], probs[1])
    assert torch.allclose(probs[2], torch.sigmoid(direct[1, 0]), atol=1e-5)


def test_summary_is_json_ready_and_names_the_weakest_slice():
    confidence = np.array([[np.nan, 0.9, 0.4, np.nan], [0.8, 0.7, np.nan, np.nan]], np.float32)
    result = PropagationResult(np.zeros((4, 2, 2), np.uint8), [1, 2], confidence, 0, {1: [0], 2: [2]})
    assert np.allclose(result.slice_confidence(), [0.8, 0.7, 0.4, np.nan], equal_nan=True)
    assert result.least_confident_slice() == 2
    summary = json.loads(json.dumps(result.summary()))
    assert summary["least_confident_slice"] == 2
    assert summary["slices"][1] == {"index": 1, "confidence": 0.7, "objects": {"1": 0.9, "2": 0.7}}
    assert summary["slices"][3]["confidence"] is None
    assert summary["prompt_slices"] == {"1": [0], "2": [2]}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda im, pr: (im[0], pr[0]), "Z H W"),
        (lambda im, pr: (im, np.zeros_like(pr)), "no painted voxels"),
        (lambda im, pr: (im, pr[:, :-1]), "do not match"),
    ],
)
def test_bad_inputs_say_what_to_do(tiny_net, change, message):
    image, truth = disc_volume((6, 16, 16), first=1, last=4)
    image, prompt = change(image, truth * (np.arange(6) == 2)[:, None, None])
    with pytest.raises(OpenSegError, match=message):
        propagate(image, prompt, tiny_net, device="cpu")


def test_bad_options_say_what_to_do(tiny_net):
    image, truth = disc_volume((6, 16, 16), first=1, last=4)
    prompt = truth * (np.arange(6) == 2)[:, None, None]
    with pytest.raises(OpenSegError, match="label 5 is not painted"):
        propagate(image, prompt, tiny_net, label_values=[5], device="cpu")
    with pytest.raises(OpenSegError, match="label 0 is the background, not an object"):
        propagate(image, prompt, tiny_net, label_values=[0, 1], device="cpu")
    with pytest.raises(OpenSegError, match="complete slice 9 is outside"):
        propagate(image, prompt, tiny_net, complete_slices=[9], device="cpu")
    with pytest.raises(OpenSegError, match="axis"):
        propagate(image, prompt, tiny_net, axis=3, device="cpu")
    with pytest.raises(OpenSegError, match="direction must be one of both, forward, backward"):
        propagate(image, prompt, tiny_net, direction="up", device="cpu")
    with pytest.raises(OpenSegError, match="unknown memory policy"):
        propagate(image, prompt, tiny_net, policy="newest", device="cpu")
    with pytest.raises(OpenSegError, match="stop_confidence in \\[0, 1\\], got 0.02, 0.5, 1.5"):
        propagate(image, prompt, tiny_net, stop_confidence=1.5, device="cpu")


def test_stopping_the_generator_cancels_without_a_result(tiny_net, disc):
    image, _, prompt, _ = disc
    generator = iter_propagate(image, prompt, tiny_net, **FAST)
    next(generator)
    next(generator)
    generator.close()  # what Cancel does; nothing is returned or written
    with pytest.raises(StopIteration):
        next(generator)


def test_a_correction_keeps_the_painted_labels_that_run_did_not_propagate(tiny_net):
    image, truth = disc_volume((6, 16, 16), first=1, last=4)
    prompt = np.zeros(truth.shape, np.uint8)
    prompt[2] = truth[2]
    prompt[3, 0:3, 0:3] = 2  # painted, but this run propagates label 1 only
    first = propagate(image, prompt, tiny_net, label_values=[1], **FAST)
    edited = first.labels.copy()
    edited[3] = truth[3]
    edited[3, 1, 1] = 1  # the user painted label 1 over one of label 2's voxels: the fix wins there
    new_prompt, complete = first.with_corrections(prompt, edited)
    assert complete == [3] and first.changed_slices(edited) == [3]
    assert (new_prompt[3] == 2).sum() == 8 and new_prompt[3, 1, 1] == 1  # label 2 was wiped before
    assert np.array_equal(new_prompt[3] == 1, edited[3] == 1)


def test_a_front_blocked_before_half_way_leaves_the_rest_to_the_other_front():
    """Prompts on 1 and 10, the object erased on 8: slices 6 and 7 used to belong to the front from
    10, which stops at 8, so nothing predicted them."""
    fronts = make_fronts(1, [1, 10], {1, 10, 8}, 14, (-1, 1))
    assert [f.slices for f in fronts] == [[0], [2, 3, 4, 5, 6, 7], [9], [11, 12, 13]]
    assert [f.slices for f in make_fronts(1, [1, 10], {1, 10}, 14, (-1, 1))][1:3] == [
        [2, 3, 4, 5],
        [9, 8, 7, 6],
    ]


def test_progress_shows_what_each_slice_wrote_and_errors_name_the_label(tiny_net):
    image, truth = disc_volume((6, 16, 16), first=1, last=4)
    prompt = np.zeros(truth.shape, np.uint8)
    prompt[2], prompt[3] = truth[2], truth[3] * 2  # label 2 painted where label 1's front goes
    # the random network alone draws beyond the disc; a pixel classifier would keep to the disc
    options = dict(min_area=0.0, stop_after=99, pixel_classifier="never", **FAST)
    steps, result = drain(iter_propagate(image, prompt, tiny_net, **options))
    on_painted = [
        step.payload for step in steps[1:] if step.payload["slice"] == 3 and step.payload["label"] == 1
    ]
    assert on_painted and on_painted[0]["mask"].any()  # label 1 reached label 2's painted slice
    for payload in on_painted:  # what it wrote there, never over the painted voxels (the preview showed them)
        assert not (payload["mask"] & (prompt[3] == 2)).any()
    assert (result.labels[3][prompt[3] == 2] == 2).all()
    speck = np.zeros((6, 64, 64), np.uint8)
    speck[2, 5, 5] = 4  # one voxel: gone on the 32x32 grid
    with pytest.raises(OpenSegError, match="label 4 is too small on the model grid"):
        propagate(np.random.default_rng(0).random((6, 64, 64)), speck, tiny_net, device="cpu")


def test_each_front_gives_its_last_accepted_slices_as_a_support_set_of_their_own(blob_net, disc, monkeypatch):
    from napari_openseg.core.propagate import propagation as module

    image, truth, prompt, z = disc
    # Stated in advance, forward front (z+1, z+2, ...), short-term memory of 2: slice z+1 is predicted
    # from the long-term draws and the painted slice z as the short-term set; z+2 from {z, z+1}. Slice
    # z+2 is made doubtful, so it does not enter: z+3 is predicted from {z, z+1} again, and z+4 from
    # {z+1, z+3}. The long-term draws come first and never hold more than the bank's entries.
    measure, predict, used = module._measure, module._predict, {}

    def doubtful_at_z2(run, value, s, probs, grid_mask):
        measures = measure(run, value, s, probs, grid_mask)
        measures["confidence"] = 0.3 if s == z + 2 else 0.95
        return measures

    def recording(net, entries, sets, image, keep):
        used.setdefault(len(used), [[entries[i].slice_index for i in members] for members in sets])
        return predict(net, entries, sets, image, keep)

    monkeypatch.setattr(module, "_measure", doubtful_at_z2)
    monkeypatch.setattr(module, "_predict", recording)
    steps, _ = drain(
        iter_propagate(image, prompt, blob_net, short_term=2, stop_after=3, direction="forward", **FAST)
    )
    order = [step.payload["slice"] for step in steps[1:]]
    sets = {s: used[k] for k, s in enumerate(order)}
    assert [sets[s][-1] for s in (z + 1, z + 2, z + 3, z + 4)] == [
        [z],
        [z, z + 1],
        [z, z + 1],
        [z + 1, z + 3],
    ]
    assert all(len(sets[s]) == FAST["draws"] + 1 for s in order)
    assert [step.payload["verdict"] for step in steps[1:4]] == ["accepted", "doubtful", "accepted"]
    # Without a short-term memory the slice sees the long-term draws only (the bank before).
    used.clear()
    steps, _ = drain(iter_propagate(image, prompt, blob_net, short_term=0, direction="forward", **FAST))
    assert all(len(sets) == FAST["draws"] for sets in used.values())


def test_the_stop_rule_judges_a_slice_by_its_area_and_confidence():
    from napari_openseg.core.propagate.fronts import StopRule

    rule = StopRule(stop_after=2, min_area=0.1, stop_confidence=0.6, max_growth=1.5)
    # painted area 100: below 10 pixels the object has vanished, whatever the confidence
    assert rule.judge(area=5, confidence=0.99, painted_area=100, last_area=50) == "vanished"
    assert rule.judge(area=0, confidence=0.99, painted_area=5, last_area=5) == "vanished"  # < 1 pixel
    assert rule.judge(area=40, confidence=0.5, painted_area=100, last_area=50) == "doubtful"  # 0.5 < 0.6
    assert rule.judge(area=80, confidence=0.9, painted_area=100, last_area=50) == "doubtful"  # 80 > 1.5 x 50
    assert rule.judge(area=70, confidence=0.9, painted_area=100, last_area=50) == "accepted"
    assert rule.judge(area=70, confidence=0.9, painted_area=100, last_area=None) == "accepted"
    # Relative to the front's first slice: doubtful below 0.8 x 0.7 = 0.56 (absolute threshold off);
    # the first slice itself (first_confidence None) is never doubtful by it.
    relative = StopRule(stop_after=2, min_area=0.1, stop_confidence=0.0, max_growth=1.5, stop_ratio=0.8)
    assert relative.judge(50, 0.55, 100, 50, first_confidence=0.7) == "doubtful"
    assert relative.judge(50, 0.57, 100, 50, first_confidence=0.7) == "accepted"
    assert relative.judge(50, 0.05, 100, 50, first_confidence=None) == "accepted"
    assert relative.judge(5, 0.99, 100, 50, first_confidence=0.7) == "vanished"
    # Both thresholds: the higher one counts.
    both = StopRule(stop_after=2, min_area=0.1, stop_confidence=0.6, max_growth=1.5, stop_ratio=0.8)
    assert both.judge(50, 0.58, 100, 50, first_confidence=0.5) == "doubtful"  # 0.58 < 0.6, > 0.4
    assert both.judge(50, 0.7, 100, 50, first_confidence=0.95) == "doubtful"  # 0.7 < 0.76
    # Where a pixel classifier joins (its agreement given), the agreement takes the confidence's
    # place: a sure slice the classifier disagrees with is doubtful, an unsure one it confirms is
    # accepted; the area rules still apply, and classifier_stop=0 keeps the confidence rule.
    agreeing = StopRule(2, 0.1, 0.6, 1.5, stop_ratio=0.8, classifier_stop=0.3)
    assert agreeing.judge(50, 0.99, 100, 50, 0.99, classifier_agreement=0.25) == "doubtful"
    assert agreeing.judge(50, 0.05, 100, 50, 0.99, classifier_agreement=0.35) == "accepted"
    assert agreeing.judge(80, 0.99, 100, 50, 0.99, classifier_agreement=0.9) == "doubtful"  # grew
    assert agreeing.judge(5, 0.99, 100, 50, 0.99, classifier_agreement=0.9) == "vanished"
    assert agreeing.judge(50, 0.05, 100, 50, 0.99, classifier_agreement=None) == "doubtful"  # not joined
    off = StopRule(2, 0.1, 0.6, 1.5, classifier_stop=0.0)
    assert off.judge(50, 0.99, 100, 50, classifier_agreement=0.0) == "accepted"
    assert off.judge(50, 0.5, 100, 50, classifier_agreement=1.0) == "doubtful"


def test_a_set_of_one_entry_repeated_is_predicted_as_that_entry_alone():
    from napari_openseg.core.propagate.memory import MemoryEntry
    from napari_openseg.core.propagate.propagation import _predict
    from napari_openseg.model.fast import fast_forward, prepare_for_inference
    from napari_openseg.model.universeg import build_network

    torch.manual_seed(0)
    net = prepare_for_inference(build_network((8, 8, 8), grid_size=32), torch.device("cpu"), torch.float32)
    images, masks = torch.rand(2, 1, 32, 32), (torch.rand(2, 32, 32) > 0.6).float()
    entries = [MemoryEntry(images[k, 0], masks[k], 1.0, torch.zeros(4)) for k in range(2)]
    query = torch.rand(1, 32, 32)
    probs = _predict(net, entries, [[1] * 8, [0, 1]], query, keep=False)
    with torch.inference_mode():
        eight = fast_forward(net, query[None], images[[1] * 8][None], masks[[1] * 8][None, :, None])
    assert torch.allclose(probs[0], torch.sigmoid(eight[0, 0]), atol=1e-5)  # the network's mean over copies

"""The self-sorting memory bank's rules on hand-made cases whose outcome is stated before the run.

Embeddings are set by hand (unit vectors at chosen angles in a plane, or axes of 3D space), so every
similarity below is a cosine that can be worked out on paper; the comments give the numbers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from napari_openseg.core.propagate.memory import MemoryBank, MemoryEntry, slice_embeddings
from napari_openseg.errors import OpenSegError

GRID = 8


def at_angle(degrees: float) -> torch.Tensor:
    rad = math.radians(degrees)
    return torch.tensor([math.cos(rad), math.sin(rad), 0.0])


def unit(*xyz: float) -> torch.Tensor:
    v = torch.tensor(xyz, dtype=torch.float32)
    return v / v.norm()


def entry(
    embedding: torch.Tensor, confidence: float = 0.9, name: int = 0, empty: bool = False
) -> MemoryEntry:
    mask = torch.zeros(GRID, GRID)
    if not empty:
        mask[2:5, 2:5] = 1
    image = torch.full((GRID, GRID), name / 100.0)
    return MemoryEntry(image, mask, confidence, embedding.float(), slice_index=name)


def names(bank: MemoryBank) -> list[int]:
    return [e.slice_index for e in bank.entries]


def test_admission_floor_and_empty_masks():
    bank = MemoryBank(capacity=4, floor=0.8)
    bank.pin(entry(at_angle(0), 1.0, name=0))
    assert bank.offer(entry(at_angle(10), 0.79, name=1)) == "below floor"
    assert bank.offer(entry(at_angle(10), 0.95, name=2, empty=True)) == "empty"
    assert bank.offer(entry(at_angle(10), 0.80, name=3)) == "added"
    assert names(bank) == [0, 3]


def test_full_bank_newcomer_replaces_the_entry_most_like_the_one_least_like_it():
    # Bank: prompt P at 0 deg (pinned), A at 10 deg, B at 20 deg. Newcomer N at 90 deg.
    # sim(N, .) = cos 90, cos 80, cos 70 = 0, .17, .34 -> i = P (least similar to N).
    # The unpinned entry most similar to P is A (cos 10 = .985) -> j = A.
    # sim(N, i) = 0 < sim(i, j) = .985 and conf(N) = .85 > conf(A) - .1 = .8 -> N replaces A.
    bank = MemoryBank(capacity=3, floor=0.5)
    bank.pin(entry(at_angle(0), 1.0, name=0))
    assert bank.offer(entry(at_angle(10), 0.9, name=1)) == "added"
    assert bank.offer(entry(at_angle(20), 0.9, name=2)) == "added"
    assert bank.full
    assert bank.offer(entry(at_angle(90), 0.85, name=3)) == "replaced"
    assert sorted(names(bank)) == [0, 2, 3]


def test_newcomer_much_less_confident_than_j_is_refused():
    # Same geometry as above, but conf(N) = .75 is not > conf(A) - .1 = .8.
    bank = MemoryBank(capacity=3, floor=0.5)
    bank.pin(entry(at_angle(0), 1.0, name=0))
    bank.offer(entry(at_angle(10), 0.9, name=1))
    bank.offer(entry(at_angle(20), 0.9, name=2))
    assert bank.offer(entry(at_angle(90), 0.75, name=3)) == "less confident"
    assert names(bank) == [0, 1, 2]


def test_newcomer_that_adds_no_diversity_is_refused():
    # Bank: P = x (pinned), A = y, B = z: mutually orthogonal. N = (1, 1, .9)/|.|, close to all.
    # sim(N, .) = .60, .60, .54 -> i = B; j = A (the only unpinned entry besides B), sim(B, A) = 0.
    # sim(N, i) = .54 is not < 0 -> N would make the bank less diverse: refused, even at confidence 1.
    bank = MemoryBank(capacity=3, floor=0.5)
    bank.pin(entry(unit(1, 0, 0), 1.0, name=0))
    bank.offer(entry(unit(0, 1, 0), 0.9, name=1))
    bank.offer(entry(unit(0, 0, 1), 0.9, name=2))
    assert bank.offer(entry(unit(1, 1, 0.9), 1.0, name=3)) == "redundant"
    assert names(bank) == [0, 1, 2]


def test_pinned_entries_are_never_evicted():
    # P at 0 deg (pinned), A at 15, B at 40; N at 195 deg.
    # sim(N, .) = cos 195, cos 180, cos 155 = -.97, -1, -.91 -> i = A.
    # Most similar to A: P (cos 15 = .97) but P is pinned, so j = B (cos 25 = .91). N replaces B.
    bank = MemoryBank(capacity=3, floor=0.5)
    bank.pin(entry(at_angle(0), 1.0, name=0))
    bank.offer(entry(at_angle(15), 0.9, name=1))
    bank.offer(entry(at_angle(40), 0.9, name=2))
    assert bank.offer(entry(at_angle(195), 0.9, name=3)) == "replaced"
    assert sorted(names(bank)) == [0, 1, 3]
    assert bank.entries[0].pinned and not any(e.pinned for e in bank.entries[1:])


def test_pinned_prompts_may_exceed_the_capacity_and_then_nothing_else_enters():
    bank = MemoryBank(capacity=2, floor=0.0)
    for k, angle in enumerate((0, 40, 80)):
        bank.pin(entry(at_angle(angle), 1.0, name=k))
    assert len(bank) == 3
    assert bank.offer(entry(at_angle(200), 1.0, name=9)) == "no room"
    assert names(bank) == [0, 1, 2]
    with pytest.raises(OpenSegError, match="foreground"):
        bank.pin(entry(at_angle(0), 1.0, empty=True))


def test_fifo_evicts_the_oldest_unpinned_entry_whatever_its_confidence():
    bank = MemoryBank(capacity=3, policy="fifo")
    bank.pin(entry(at_angle(0), 1.0, name=0))
    assert bank.offer(entry(at_angle(10), 0.1, name=1)) == "added"  # no floor
    bank.offer(entry(at_angle(20), 0.9, name=2))
    bank.offer(entry(at_angle(30), 0.9, name=3))  # replaces 1, the oldest
    bank.offer(entry(at_angle(40), 0.9, name=4))  # replaces 2
    assert sorted(names(bank)) == [0, 3, 4]
    assert bank.draw(at_angle(0), 5, 2, np.random.default_rng(0)).tolist() == [[0, 1, 2], [0, 1, 2]]


def test_admit_all_takes_every_prediction_in_place_of_j():
    # The refused "redundant" case above is admitted without confidence control: N replaces j = A.
    bank = MemoryBank(capacity=3, policy="admit-all")
    bank.pin(entry(unit(1, 0, 0), 1.0, name=0))
    bank.offer(entry(unit(0, 1, 0), 0.2, name=1))
    bank.offer(entry(unit(0, 0, 1), 0.2, name=2))
    assert bank.offer(entry(unit(1, 1, 0.9), 0.01, name=3)) == "replaced"
    assert sorted(names(bank)) == [0, 2, 3]


def test_on_ordered_fronts_the_similarity_condition_always_holds_so_admit_all_evicts_alike():
    # Two fronts leave a prompt at 0 deg in 7-degree steps (slices of a volume), alternating sides.
    # With the bank full (P, +7, -7, +14, -14), the newcomer +21 is least like -14 (35 deg): i = -14,
    # j = -7 (7 deg from i), and sim(new, i) = cos 35 < sim(i, j) = cos 7, so the newcomer replaces
    # -7, as admit-all does. Every later offer repeats the pattern (the far end of the other front is
    # i, its neighbour is j): with equal confidences the two banks make the same choices and end with
    # the prompt, +7 (never next to a far end) and the last three slices (docs/performance.md).
    banks = {policy: MemoryBank(capacity=5, policy=policy) for policy in ("self-sorting", "admit-all")}
    for bank in banks.values():
        bank.pin(entry(at_angle(0), 1.0, name=0))
    offers = [sign * 7 * step for step in range(1, 9) for sign in (1, -1)]
    actions = {
        policy: [bank.offer(entry(at_angle(a), 0.9, name=a)) for a in offers]
        for policy, bank in banks.items()
    }
    assert actions["self-sorting"] == actions["admit-all"]
    assert actions["self-sorting"][4:] == ["replaced"] * (len(offers) - 4)
    assert sorted(names(banks["self-sorting"])) == sorted(names(banks["admit-all"])) == [-56, -49, 0, 7, 56]


def test_prompt_only_bank_holds_the_prompts_alone():
    bank = MemoryBank(capacity=3, policy="prompt-only")
    bank.pin(entry(at_angle(0), 1.0, name=0))
    assert bank.offer(entry(at_angle(5), 1.0, name=1)) == "not admitted"
    assert names(bank) == [0]


def test_retrieval_probabilities_are_a_softmax_of_cosine_over_temperature():
    # Entries x and y; query x; temperature .5: logits (1/.5, 0/.5) = (2, 0) -> e^2/(e^2+1) = .8808.
    bank = MemoryBank(capacity=4, temperature=0.5)
    bank.pin(entry(unit(1, 0, 0), name=0))
    bank.offer(entry(unit(0, 1, 0), name=1))
    probabilities = bank.retrieval_probabilities(unit(1, 0, 0))
    assert probabilities == pytest.approx([math.e**2 / (math.e**2 + 1), 1 / (math.e**2 + 1)], abs=1e-9)
    sharper = MemoryBank(capacity=4, temperature=0.1)
    sharper.entries = list(bank.entries)
    assert sharper.retrieval_probabilities(unit(1, 0, 0))[0] > 0.9999


def test_draws_are_with_replacement_seeded_and_follow_the_probabilities():
    bank = MemoryBank(capacity=4, temperature=0.5)
    bank.pin(entry(unit(1, 0, 0), name=0))
    bank.offer(entry(unit(0, 1, 0), name=1))
    first = bank.draw(unit(1, 0, 0), size=4000, count=2, rng=np.random.default_rng(7))
    again = bank.draw(unit(1, 0, 0), size=4000, count=2, rng=np.random.default_rng(7))
    assert first.shape == (2, 4000) and np.array_equal(first, again)
    # 8000 draws with p = .8808: the share of entry 0 is within 4 standard deviations (.0145).
    assert abs(np.mean(first == 0) - 0.8808) < 0.0145
    # Two entries, support size 3: with replacement, so some set repeats an entry.
    small = bank.draw(unit(1, 0, 0), size=3, count=50, rng=np.random.default_rng(1))
    assert any(len(set(row)) < 3 for row in small.tolist())


def test_the_prompt_set_is_the_most_similar_painted_entry_alone():
    # Pinned x (0) and y (1), predicted z (2); the query lies nearest to y, so the last of the 3
    # sets is entry 1 repeated; the other sets are drawn as without the prompt set (same seed).
    bank = MemoryBank(capacity=4, temperature=0.5)
    bank.pin(entry(unit(1, 0, 0), name=0))
    bank.pin(entry(unit(0, 1, 0), name=1))
    bank.offer(entry(unit(0, 0, 1), name=2))
    query = unit(0.2, 1, 0.5)
    sets = bank.draw(query, size=5, count=3, rng=np.random.default_rng(3), prompt_set=True)
    plain = bank.draw(query, size=5, count=3, rng=np.random.default_rng(3))
    assert sets[-1].tolist() == [1] * 5
    assert np.array_equal(sets[:-1], plain[:-1])
    # One set only: nothing to compare it with, so it is drawn as usual.
    single = bank.draw(query, size=5, count=1, rng=np.random.default_rng(3), prompt_set=True)
    assert np.array_equal(single, bank.draw(query, size=5, count=1, rng=np.random.default_rng(3)))
    # FIFO and prompt-only banks return the whole bank in every set, prompt set or not.
    fifo = MemoryBank(capacity=4, policy="fifo")
    fifo.entries = list(bank.entries)
    assert fifo.draw(query, 5, 2, np.random.default_rng(0), prompt_set=True).tolist() == [
        [0, 1, 2],
        [0, 1, 2],
    ]


def test_slice_embeddings_ignore_brightness_offsets_and_are_unit_length():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(3, 1, 64, 64, generator=gen)
    images[1] = images[0] + 0.3
    images[2] = 0.5  # flat
    emb = slice_embeddings(images)
    assert emb.shape == (3, 256)
    assert torch.allclose(emb[0], emb[1], atol=1e-5)
    assert emb[0].norm() == pytest.approx(1.0, abs=1e-5)
    assert torch.count_nonzero(emb[2]) == 0
    with pytest.raises(ValueError, match="N 1 g g"):
        slice_embeddings(images[:, 0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"capacity": 0}, "at least one"),
        ({"policy": "lifo"}, "unknown memory policy"),
        ({"floor": 1.5}, "floor"),
        ({"temperature": 0}, "temperature"),
    ],
)
def test_bad_settings_say_what_is_wrong(kwargs, message):
    with pytest.raises(OpenSegError, match=message):
        MemoryBank(**kwargs)


def test_the_short_term_memory_keeps_the_last_accepted_slices_oldest_out_first():
    from napari_openseg.core.propagate.memory import ShortTermMemory

    recent = ShortTermMemory(2)
    for name in (1, 2, 3):
        assert recent.accept(entry(at_angle(0), name=name))
    assert names(recent) == [2, 3]  # slice 1, the oldest, left when 3 came
    assert not recent.accept(entry(at_angle(0), name=4, empty=True))  # nothing drawn: nothing to show
    assert names(recent) == [2, 3]
    off = ShortTermMemory(0)
    assert not off.accept(entry(at_angle(0), name=5)) and len(off) == 0
    with pytest.raises(OpenSegError, match="0 or more"):
        ShortTermMemory(-1)

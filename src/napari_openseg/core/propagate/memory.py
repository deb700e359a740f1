"""Propagation's two memories: the self-sorting long-term bank (Medical SAM 2, section 3.2) of each
object and the short-term memory of each front (SLM-SAM 2).

The in-context network is the propagator and the memories are its support: every entry is a slice
image on the model grid with its mask (painted or predicted), the confidence of that mask and an
embedding of the image. The long-term bank (:class:`MemoryBank`) keeps the painted slices and the
most confident and most diverse predictions of an object, whichever front made them; the short-term
memory (:class:`ShortTermMemory`) keeps the last few slices one front accepted, the nearest
neighbours of the slice it predicts next, whose object looks most like the one to find.

Embedding. UniverSeg has no query-only encoder: from its first block on, the query's features are
mixed with the mean of the support, so any network feature of a slice would change with the support
drawn for it. The embedding is therefore taken from the image alone: the grid image average-pooled to
at most ``EMBEDDING_GRID`` x ``EMBEDDING_GRID``, minus its mean, scaled to unit length. Cosine
similarity of two embeddings is then the correlation of their coarse intensity patterns: neighbouring
slices of a volume score near 1, distant ones lower, and a global brightness offset does not count.

Rules (``policy="self-sorting"``):

* Prompt entries (painted slices) are *pinned*: always admitted, never evicted, even beyond the
  capacity.
* A prediction is admitted only if its mask has foreground and its confidence reaches ``floor``.
* While the bank holds fewer than ``capacity`` entries, an admissible prediction is appended.
* When it is full, let ``i`` be the entry least similar to the newcomer and ``j`` the unpinned entry
  (other than ``i``) most similar to ``i``; the newcomer replaces ``j`` when
  ``sim(new, i) < sim(i, j)`` and ``conf(new) > conf(j) - margin`` (``margin`` = 0.1): the bank drops
  one of its most redundant entries for one that adds diversity at a comparable confidence.
* Retrieval: before each slice, ``count`` support sets of ``size`` entries are drawn with
  replacement with probabilities ``softmax(cos(embedding, e_k) / temperature)``.
* Prompt set (our addition, ``prompt_set=True``): the last of the ``count`` sets is replaced by the
  painted entry most similar to the slice. Its prediction joins the others, so a bank that drifts
  away from what was painted disagrees with it and its confidence falls (docs/propagation.md).

Short-term memory: the last ``size`` slices a front accepted (predicted and not doubtful), oldest
out first; propagation gives them to the network as a support set of their own.

The other policies are the baselines of the benchmark: ``"fifo"`` (every prediction with foreground
is admitted and the oldest unpinned entry leaves; retrieval returns the whole bank), ``"admit-all"``
(every prediction with foreground is admitted, no confidence floor or condition, and replaces ``j``
of the rule above) and ``"prompt-only"`` (only pinned entries; retrieval returns them all).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from napari_openseg.core.propagate.settings import (
    DEFAULT_CAPACITY,
    DEFAULT_FLOOR,
    DEFAULT_TEMPERATURE,
    POLICIES,
)
from napari_openseg.errors import OpenSegError

log = logging.getLogger(__name__)

Policy = Literal["self-sorting", "fifo", "admit-all", "prompt-only"]

#: Side of the pooled image that forms an embedding.
EMBEDDING_GRID = 16
DEFAULT_MARGIN = 0.1


def slice_embeddings(images: torch.Tensor) -> torch.Tensor:
    """``"N 1 g g"`` grid images -> ``"N D"`` unit-length, zero-mean embeddings.

    A flat image (no contrast) gets the zero vector, which is equally (un)like everything.
    """
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f'images must be "N 1 g g", got {tuple(images.shape)}')
    side = min(EMBEDDING_GRID, int(images.shape[-1]))
    pooled = F.adaptive_avg_pool2d(images.float(), side).flatten(1)
    centred = pooled - pooled.mean(dim=1, keepdim=True)
    return F.normalize(centred, dim=1, eps=1e-6)


@dataclass
class MemoryEntry:
    """One slice in the bank: ``image "g g"`` in [0, 1], ``mask "g g"`` in {0, 1}, ``embedding "D"``."""

    image: torch.Tensor
    mask: torch.Tensor
    confidence: float
    embedding: torch.Tensor
    pinned: bool = False
    slice_index: int | None = None
    admitted_at: int = 0
    #: The network's first-block terms of this entry (computed once, on first use; see propagate).
    encoded: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def foreground(self) -> int:
        return int(self.mask.sum())


class MemoryBank:
    """A bounded, self-sorting set of support entries for one object (one binary task).

    Parameters
    ----------
    capacity
        M, the most entries kept (pinned entries may exceed it; then no prediction enters).
    policy
        ``"self-sorting"`` (the published rules) or a benchmark baseline; see the module docstring.
    floor
        Absolute confidence a prediction needs to be considered (self-sorting only).
    margin
        How much lower than the entry it replaces a newcomer's confidence may be.
    temperature
        Softmax temperature of the retrieval probabilities; smaller favours the most similar entries.
    """

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        policy: Policy = "self-sorting",
        floor: float = DEFAULT_FLOOR,
        margin: float = DEFAULT_MARGIN,
        temperature: float = DEFAULT_TEMPERATURE,
    ):
        if capacity < 1:
            raise OpenSegError(f"the memory bank needs room for at least one entry, got size {capacity}")
        if policy not in POLICIES:
            raise OpenSegError(f"unknown memory policy {policy!r}; choose one of {', '.join(POLICIES)}")
        if not 0.0 <= floor <= 1.0:
            raise OpenSegError(f"the confidence floor must lie in [0, 1], got {floor}")
        if temperature <= 0:
            raise OpenSegError(f"the retrieval temperature must be > 0, got {temperature}")
        self.capacity = int(capacity)
        self.policy = policy
        self.floor = float(floor)
        self.margin = float(margin)
        self.temperature = float(temperature)
        self.entries: list[MemoryEntry] = []
        self._clock = 0

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def full(self) -> bool:
        return len(self.entries) >= self.capacity

    def embeddings(self) -> torch.Tensor:
        """``"M D"`` embeddings of the entries, in bank order."""
        return torch.stack([e.embedding for e in self.entries])

    def _stamp(self, entry: MemoryEntry) -> MemoryEntry:
        self._clock += 1
        entry.admitted_at = self._clock
        return entry

    def pin(self, entry: MemoryEntry) -> None:
        """Add a prompt entry: pinned, always admitted, never evicted."""
        if entry.foreground == 0:
            raise OpenSegError("a prompt slice needs foreground to be used as an example")
        entry.pinned = True
        self.entries.append(self._stamp(entry))

    def offer(self, entry: MemoryEntry) -> str:
        """Consider a prediction for the bank; returns what happened.

        ``"added"`` (appended), ``"replaced"`` (took an entry's place), or why it was refused: ``"empty"``, ``"below floor"``, ``"not admitted"`` (prompt-only),
        ``"no room"`` (only pinned entries left to evict), ``"redundant"``, ``"less confident"``.
        """
        entry.pinned = False
        if self.policy == "prompt-only":
            return "not admitted"
        if entry.foreground == 0:
            return "empty"
        if self.policy == "self-sorting" and entry.confidence < self.floor:
            return "below floor"
        if not self.full:
            self.entries.append(self._stamp(entry))
            return "added"
        if self.policy == "fifo":
            unpinned = [k for k, e in enumerate(self.entries) if not e.pinned]
            if not unpinned:
                return "no room"
            oldest = min(unpinned, key=lambda k: self.entries[k].admitted_at)
            return self._replace(oldest, entry)
        i, j, sim_new_i, sim_i_j = self._redundant_pair(entry)
        if j is None:
            return "no room"
        if self.policy == "admit-all":
            return self._replace(j, entry)
        if not sim_new_i < sim_i_j:
            return "redundant"
        if not entry.confidence > self.entries[j].confidence - self.margin:
            return "less confident"
        return self._replace(j, entry)

    def _redundant_pair(self, entry: MemoryEntry) -> tuple[int, int | None, float, float]:
        """``i`` (least similar to the newcomer), ``j`` (evictable, most similar to ``i``) and the
        similarities ``sim(new, i)``, ``sim(i, j)``."""
        bank = self.embeddings()
        to_new = bank @ entry.embedding
        i = int(torch.argmin(to_new))
        to_i = bank @ bank[i]
        candidates = [k for k, e in enumerate(self.entries) if k != i and not e.pinned]
        if not candidates:
            return i, None, float(to_new[i]), float("nan")
        j = max(candidates, key=lambda k: float(to_i[k]))
        return i, j, float(to_new[i]), float(to_i[j])

    def _replace(self, index: int, entry: MemoryEntry) -> str:
        log.debug(
            "slice %s replaces slice %s in the bank", entry.slice_index, self.entries[index].slice_index
        )
        self.entries[index] = self._stamp(entry)
        return "replaced"

    def most_similar_pinned(self, embedding: torch.Tensor) -> MemoryEntry:
        """The pinned (painted) entry whose embedding is most similar to ``embedding "D"``."""
        return self.entries[self._most_similar_pinned_index(embedding)]

    def _most_similar_pinned_index(self, embedding: torch.Tensor) -> int:
        pinned = [k for k, e in enumerate(self.entries) if e.pinned]
        if not pinned:
            raise OpenSegError("the memory bank has no painted entry: paint the object on at least one slice")
        return max(pinned, key=lambda k: float(self.entries[k].embedding @ embedding))

    def retrieval_probabilities(self, embedding: torch.Tensor) -> np.ndarray:
        """``"M"``: softmax of the cosine similarity of each entry to ``embedding "D"`` / temperature."""
        if not self.entries:
            raise OpenSegError("the memory bank is empty: paint the object on at least one slice")
        logits = (self.embeddings() @ embedding.to(torch.float32)) / self.temperature
        return torch.softmax(logits.double(), dim=0).cpu().numpy()

    def draw(
        self,
        embedding: torch.Tensor,
        size: int,
        count: int,
        rng: np.random.Generator,
        prompt_set: bool = False,
    ) -> np.ndarray:
        """``"count size"`` entry indices: the support sets for the slice with ``embedding "D"``.

        Self-sorting and admit-all banks resample with replacement by similarity; FIFO and
        prompt-only banks return every entry in each set (``size`` is then the bank's length).
        With ``prompt_set`` (self-sorting and admit-all, ``count`` > 1) the last set is the painted
        entry most similar to the slice alone, repeated (see the module docstring).
        """
        if size < 1 or count < 1:
            raise OpenSegError(f"support size and number of draws must be >= 1, got {size}, {count}")
        if self.policy in ("fifo", "prompt-only"):
            return np.tile(np.arange(len(self.entries)), (count, 1))
        probabilities = self.retrieval_probabilities(embedding)
        sets = rng.choice(len(self.entries), size=(count, size), replace=True, p=probabilities)
        if prompt_set and count > 1:
            sets[-1] = self._most_similar_pinned_index(embedding)
        return sets


class ShortTermMemory:
    """The last ``size`` slices one front accepted, oldest out first (``size`` 0 keeps nothing)."""

    def __init__(self, size: int):
        if size < 0:
            raise OpenSegError(f"the short-term memory holds 0 or more slices, got {size}")
        self.size = int(size)
        self.entries: list[MemoryEntry] = []

    def __len__(self) -> int:
        return len(self.entries)

    def accept(self, entry: MemoryEntry) -> bool:
        """Keep ``entry`` (an accepted slice with foreground) as the newest; whether it was kept."""
        if self.size == 0 or entry.foreground == 0:
            return False
        self.entries = [*self.entries, entry][-self.size :]
        return True

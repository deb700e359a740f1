"""Prompt propagation: paint an object on one slice, and the in-context network carries it through
the volume, with a self-sorting memory bank (:mod:`.memory`) as its support set.

Every label value is a separate object with its own bank. An object's *prompts* are the slices where
it is painted; they are pinned in its bank. Fronts move away from each prompt slice by slice
(:mod:`.fronts` says in which order). For each slice the bank draws ``draws`` support sets by
similarity (the last one is the most similar painted slice, see ``prompt_set``), the network
predicts the slice from each, and their combination (:mod:`.ensemble`) is
the prediction; the prediction and its confidence are then offered to the bank. A front stops
when its object has vanished (less than ``min_area`` of the prompt's area) on ``stop_after``
consecutive slices. Objects are combined by the highest probability; painted voxels
are kept as painted.

``complete_slices`` are slices whose labels are complete (a corrected slice): an object absent
there is known to be absent, so its fronts stop there. With ``unordered=True`` the slices are an
unordered stack of 2D images: each object's next image is the one most similar to an entry of its
bank, and nothing stops.

Confidence: see :mod:`.confidence`.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import OpenSegError
from .confidence import combine, consistency, draw_measures
from .engine import ENCODED_SUPPORT_BUDGET, encode_tensors, prepare_network, probabilities
from .ensemble import combine_members
from .fronts import DIRECTIONS, Front, make_fronts, ordered_schedule, similarity_schedule
from .inference import label_dtype
from .memory import (
    DEFAULT_CAPACITY,
    DEFAULT_FLOOR,
    DEFAULT_TEMPERATURE,
    MemoryBank,
    MemoryEntry,
    Policy,
    slice_embeddings,
)
from .preprocess import Aspect, from_grid, masks_to_grid, normalize_intensity, to_grid
from .progress import Progress, run_to_end
from .support import check_image, check_labels

log = logging.getLogger(__name__)

#: Slices moved to the model grid per call, to bound the memory of large volumes.
GRID_CHUNK = 64
#: Support sets drawn per slice and entries per set. On the hippocampus validation subjects 2 x 8
#: gave the same Dice as 3 x 16 at 2.3 times the speed (docs/performance.md).
DEFAULT_DRAWS, DEFAULT_SUPPORT_SIZE = 2, 8
#: Slices less confident than this count towards stopping a front (chosen on hippocampus validation
#: subjects and the white matter of the bundled sample; see docs/propagation.md).
DEFAULT_STOP_CONFIDENCE = 0.6
#: Painted voxels get this "probability" so no prediction overwrites them.
PAINTED = 2.0


@dataclass
class PropagationResult:
    """Labels with the image's shape and the per-slice confidence ``"C N"`` of each object.

    ``confidence[c, s]`` is NaN where object ``label_values[c]`` was not predicted on slice ``s``
    (a prompt slice, or beyond where its front stopped).
    """

    labels: np.ndarray
    label_values: list[int]
    confidence: np.ndarray
    axis: int
    prompt_slices: dict[int, list[int]]
    complete_slices: list[int] = field(default_factory=list)
    #: Per label, the slices where a front stopped because its confidence fell below the stop
    #: threshold while the object was still drawn; a large structure may go on past them.
    confidence_stops: dict[int, list[int]] = field(default_factory=dict)

    def slice_confidence(self) -> np.ndarray:
        """``"N"``: the weakest object's confidence on each slice (NaN where none was predicted)."""
        conf = self.confidence
        predicted = ~np.isnan(conf)
        weakest = np.where(predicted, conf, np.inf).min(axis=0)
        return np.where(predicted.any(axis=0), weakest, np.nan).astype(np.float32)

    def least_confident_slice(self) -> int | None:
        """The predicted slice with the lowest confidence: the first one to check and correct."""
        per_slice = self.slice_confidence()
        if np.all(np.isnan(per_slice)):
            return None
        return int(np.nanargmin(per_slice))

    def confidence_stop_hint(self, setting: str = "the stop confidence") -> str | None:
        """A sentence naming the slices where fronts ended on low confidence, or None; ``setting``
        is what the caller's user knows the stop threshold as (a widget control, a CLI option)."""
        if not self.confidence_stops:
            return None
        where = "; ".join(f"label {v}: slice {', '.join(map(str, s))}" for v, s in self.confidence_stops.items())
        return f"Fronts ended on low confidence ({where}). If an object goes on past there, lower {setting} and run again."

    def summary(self) -> dict:
        """A JSON-ready description: per-slice confidences, prompts, the weakest slice."""
        per_slice = self.slice_confidence()
        as_float = lambda x: None if np.isnan(x) else round(float(x), 4)  # noqa: E731
        return {
            "axis": self.axis,
            "label_values": self.label_values,
            "prompt_slices": {str(v): s for v, s in self.prompt_slices.items()},
            "complete_slices": self.complete_slices,
            "least_confident_slice": self.least_confident_slice(),
            "confidence_stops": {str(v): s for v, s in self.confidence_stops.items()},
            "mean_confidence": None if np.all(np.isnan(per_slice)) else round(float(np.nanmean(per_slice)), 4),
            "slices": [
                {
                    "index": s,
                    "confidence": as_float(per_slice[s]),
                    "objects": {str(v): as_float(self.confidence[c, s]) for c, v in enumerate(self.label_values)},
                }
                for s in range(per_slice.shape[0])
            ],
        }

    def changed_slices(self, edited: np.ndarray) -> list[int]:
        """The slices where ``edited`` (this result's labels after the user's fixes) differs from
        :attr:`labels`."""
        edited = check_labels(edited, self.labels.shape)
        changed = np.moveaxis(edited != self.labels, self.axis, 0)
        return np.flatnonzero(changed.reshape(changed.shape[0], -1).any(axis=1)).tolist()

    def with_corrections(
        self, prompt: np.ndarray, edited: np.ndarray, slices: Sequence[int] | None = None
    ) -> tuple[np.ndarray, list[int]]:
        """The prompt and complete slices for the next run after the user fixed some slices.

        ``edited`` is this result's labels after the user's fixes; ``slices`` are the fixed slices
        (default: :meth:`changed_slices`). Returns ``(new_prompt, complete_slices)``: ``prompt`` with
        those slices taken from ``edited``, and the slices to pass as ``complete_slices`` (the
        earlier ones included). Labels painted in ``prompt`` that this run did not propagate are
        not in ``edited``; they stay on the fixed slices wherever the fix left the voxel empty.
        """
        edited = check_labels(edited, self.labels.shape)
        prompt = check_labels(prompt, self.labels.shape)
        edited_stack = np.moveaxis(edited, self.axis, 0)
        if slices is None:
            slices = self.changed_slices(edited)
        slices = _check_slices(slices, edited_stack.shape[0], "corrected")
        new_prompt = np.array(prompt, dtype=np.result_type(prompt.dtype, edited.dtype))
        new_stack = np.moveaxis(new_prompt, self.axis, 0)
        painted, fixes = new_stack[slices], edited_stack[slices]
        others = (painted != 0) & ~np.isin(painted, self.label_values)
        new_stack[slices] = np.where(others & (fixes == 0), painted, fixes)
        return new_prompt, sorted(set(self.complete_slices) | set(slices))


def _check_slices(slices: Sequence[int], n_slices: int, what: str) -> list[int]:
    result = sorted({int(s) for s in slices})
    bad = [s for s in result if not 0 <= s < n_slices]
    if bad:
        raise OpenSegError(f"{what} slice {bad[0]} is outside 0..{n_slices - 1}")
    return result


def _default_values(prompt_stack: np.ndarray, label_values: Sequence[int] | None) -> list[int]:
    present = sorted(set(np.unique(prompt_stack).tolist()) - {0})
    if not present:
        raise OpenSegError("the prompt holds no painted voxels: paint the object on at least one slice")
    if label_values is None:
        return present
    values = sorted({int(v) for v in label_values})
    if 0 in values:
        raise OpenSegError(f"label 0 is the background, not an object; painted labels: {present}")
    missing = [v for v in values if v not in present]
    if missing:
        raise OpenSegError(f"label {missing[0]} is not painted in the prompt; painted labels: {present}")
    return values


def _blank_slices(stack: np.ndarray) -> list[int]:
    """Slices of ``"N H W"`` with no finite value (NaN padding): nothing can be drawn on them."""
    if stack.dtype.kind != "f":
        return []
    blank = [s for s in range(stack.shape[0]) if not np.isfinite(stack[s]).any()]
    if blank:
        log.warning("%d slice(s) hold no finite values (%s); no object is drawn on them", len(blank),
                    ", ".join(map(str, blank[:10])) + (", ..." if len(blank) > 10 else ""))
    return blank


def _encoded_support(net, bank: MemoryBank, indices: np.ndarray, keep: bool = True):
    """The first block's support terms of the draws ``indices "K S"``.

    The query-independent work on a support entry (:func:`~napari_openseg.core.engine.encode_tensors`)
    is done once per entry and, with ``keep``, kept with it: an entry serves many slices and draws.
    """
    from ..model.fast import EncodedSupport

    unique, position = np.unique(indices, return_inverse=True)
    terms = {int(i): bank.entries[i].encoded for i in unique if bank.entries[i].encoded is not None}
    fresh = [int(i) for i in unique if int(i) not in terms]
    if fresh:
        images = torch.stack([bank.entries[i].image for i in fresh])[:, None, None]
        masks = torch.stack([bank.entries[i].mask for i in fresh])[:, None, None]
        encoded = encode_tensors(net, images, masks)  # one entry per batch item: "n C H W", "n 1 C H W"
        for k, i in enumerate(fresh):
            terms[i] = (encoded.share_mean[k], encoded.conv_term[k, 0])
            if keep:
                bank.entries[i].encoded = terms[i]
    shares = torch.stack([terms[int(i)][0] for i in unique])
    convs = torch.stack([terms[int(i)][1] for i in unique])
    position = torch.as_tensor(position.reshape(indices.shape), device=shares.device)
    return EncodedSupport(share_mean=shares[position].mean(dim=1), conv_term=convs[position])


def _predict(net, bank: MemoryBank, indices: np.ndarray, image: torch.Tensor, keep: bool) -> torch.Tensor:
    """Probabilities ``"K g g"`` of the slice ``image "1 g g"`` from each of the draws ``indices "K S"``."""
    # A support set is a multiset: draws with the same entries give the same prediction, run it once
    # (a bank holding only the prompt gives K identical draws).
    distinct, copies = np.unique(np.sort(indices, axis=1), axis=0, return_inverse=True)
    query = image[None].expand(len(distinct), -1, -1, -1).contiguous(memory_format=torch.channels_last)
    probs = probabilities(net, query, _encoded_support(net, bank, distinct, keep))
    return probs[torch.as_tensor(copies.reshape(-1)), 0]


def _pin_prompts(
    bank: MemoryBank, painted: np.ndarray, grid_images: torch.Tensor, embeddings: torch.Tensor, aspect: Aspect,
    value: int,
) -> list[int]:
    """Pin every slice of ``painted "N H W"`` (one object's mask) that shows the object; their indices."""
    slices = np.flatnonzero(painted.reshape(painted.shape[0], -1).any(axis=1)).tolist()
    grid = grid_images.shape[-1]
    masks = masks_to_grid(torch.from_numpy(painted[slices]).to(grid_images.device), grid, aspect)
    for s, mask in zip(slices, masks):
        if mask.any():  # a painted speck can vanish on a coarse grid
            bank.pin(MemoryEntry(grid_images[s, 0], mask[0].to(grid_images.dtype), 1.0, embeddings[s], slice_index=s))
    if not len(bank):
        raise OpenSegError(
            f"label {value} is too small on the model grid ({grid}x{grid}) on every painted slice; "
            "paint it on a slice where it is larger"
        )
    return slices


def _grid_stack(stack: np.ndarray, grid: int, aspect: Aspect, device: torch.device, dtype: torch.dtype):
    """``"N H W"`` normalised slices -> ``"N 1 g g"`` on ``device`` and the mapping back."""
    chunks, mapping = [], None
    for start in range(0, stack.shape[0], GRID_CHUNK):
        part = torch.from_numpy(np.ascontiguousarray(stack[start : start + GRID_CHUNK])).to(device)
        on_grid, mapping = to_grid(part, grid, aspect)
        chunks.append(on_grid.to(dtype))
    return torch.cat(chunks), mapping


def iter_propagate(
    image: np.ndarray,
    prompt: np.ndarray,
    model=None,
    *,
    axis: int = 0,
    label_values: Sequence[int] | None = None,
    complete_slices: Sequence[int] = (),
    bank_size: int = DEFAULT_CAPACITY,
    policy: Policy = "self-sorting",
    draws: int = DEFAULT_DRAWS,
    support_size: int = DEFAULT_SUPPORT_SIZE,
    floor: float = DEFAULT_FLOOR,
    temperature: float = DEFAULT_TEMPERATURE,
    prompt_set: bool = True,
    stop_after: int = 2,
    min_area: float = 0.02,
    stop_confidence: float = DEFAULT_STOP_CONFIDENCE,
    direction: str = "both",
    unordered: bool = False,
    threshold: float = 0.5,
    device: str | torch.device = "auto",
    precision: str = "float32",
    aspect: Aspect = "pad",
    seed: int = 0,
    rgb: bool | None = None,
) -> Generator[Progress, None, PropagationResult]:
    """Carry the objects painted in ``prompt`` through ``image`` (``"Z H W"``, slices along ``axis``).

    Parameters
    ----------
    prompt
        Labels of the image's shape: the painted slice(s), zeros elsewhere.
    model
        A weights name, a weights file path, or a ``UniverSeg`` network; ``None`` (or
        ``"openseg-default"``) runs the propagation default ``"openseg-propagate"``.
    label_values
        Objects to propagate (default: every label painted in ``prompt``).
    complete_slices
        Slices whose labels are complete (corrections): an object absent there stops there.
    bank_size, policy, floor, temperature
        The memory bank (see :class:`~napari_openseg.core.memory.MemoryBank`).
    draws, support_size
        Support sets drawn per slice (their predictions are combined and give the confidence) and
        entries per set (drawn with replacement, so it may exceed the bank's size).
    prompt_set
        Make the last of the ``draws`` sets the painted slice most similar to the slice being
        predicted (self-sorting and admit-all banks, ``draws`` > 1): drift away from what was
        painted then shows as disagreement between the sets.
    stop_after, min_area, stop_confidence
        A front stops after ``stop_after`` consecutive slices where its object covers less than
        ``min_area`` times its mean painted area or the slice's confidence is below
        ``stop_confidence``; the low-confidence slices of that final run are then left empty (a
        network that draws something on every slice past an object's end gives such slices).
    direction
        ``"both"``, ``"forward"`` (towards higher slice indices) or ``"backward"`` from each prompt.
    unordered
        Treat the slices as an unordered stack of 2D images (one-prompt segmentation).

    Yields progress per predicted slice (``payload``: ``slice``, ``label``, ``mask "H W"`` as
    written, ``confidence``, ``measures``, ``bank`` (what the bank did with it)); returns a
    :class:`PropagationResult`.
    """
    image = check_image(image, rgb)
    if image.ndim != 3:
        raise OpenSegError(
            f"propagation needs a volume or a stack of 2D images (Z H W), got shape {image.shape}; "
            "use segmentation from a support set for a single image"
        )
    prompt = check_labels(prompt, image.shape)
    if not -3 <= axis < 3:
        raise OpenSegError(f"slice axis must be 0, 1 or 2, got {axis}")
    if draws < 1 or stop_after < 1 or support_size < 1:
        raise OpenSegError(
            f"draws, stop_after and support size must be >= 1, got {draws}, {stop_after}, {support_size}"
        )
    if seed < 0:
        raise OpenSegError(f"the seed must be 0 or more, got {seed}")
    if direction not in DIRECTIONS:
        raise OpenSegError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    if not 0.0 <= min_area < 1.0 or not 0.0 <= threshold <= 1.0 or not 0.0 <= stop_confidence <= 1.0:
        raise OpenSegError(f"min_area must lie in [0, 1), threshold and stop_confidence in [0, 1], "
                           f"got {min_area}, {threshold}, {stop_confidence}")
    axis = axis % 3
    stack = np.moveaxis(normalize_intensity(image), axis, 0)
    prompt_stack = np.moveaxis(prompt, axis, 0)
    n_slices = stack.shape[0]
    complete = _check_slices(complete_slices, n_slices, "complete")
    values = _default_values(prompt_stack, label_values)
    blank = _blank_slices(np.moveaxis(image, axis, 0))
    banks = {v: MemoryBank(bank_size, policy, floor, temperature=temperature) for v in values}

    network = prepare_network(model, device, precision, propagation=True)
    net, torch_device, dtype, grid = network.net, network.device, network.dtype, network.grid
    grid_images, mapping = _grid_stack(stack, grid, aspect, torch_device, dtype)
    embeddings = slice_embeddings(grid_images)

    labels = np.zeros(stack.shape, label_dtype(max(values)))
    best = np.zeros(stack.shape, np.float32)
    confidence = np.full((len(values), n_slices), np.nan, np.float32)
    pinned: dict[int, list[int]] = {}
    confidence_stops: dict[int, list[int]] = {}
    undone: dict[int, list[_Written]] = {}
    prompt_area: dict[int, float] = {}
    fronts: list[Front] = []
    remaining: dict[int, list[int]] = {}
    for value in values:
        painted = prompt_stack == value
        pinned[value] = _pin_prompts(banks[value], painted, grid_images, embeddings, aspect, value)
        for s in pinned[value]:
            labels[s][painted[s]] = value
            best[s][painted[s]] = PAINTED
        prompt_area[value] = float(painted[pinned[value]].sum()) / len(pinned[value])
        # a blank slice (no finite value) holds no object: fronts end there, as at a complete slice
        blocked = set(pinned[value]) | {s for s in complete + blank if s not in pinned[value]}
        if unordered:
            remaining[value] = [s for s in range(n_slices) if s not in blocked]
        else:
            fronts += make_fronts(value, pinned[value], blocked, n_slices, DIRECTIONS[direction])

    if unordered:
        total = sum(len(left) for left in remaining.values())
        schedule = ((v, s, None) for v, s in similarity_schedule(remaining, banks, embeddings))
    else:
        total = sum(len(front.slices) for front in fronts)
        schedule = ((front.label, s, front) for front, s in ordered_schedule(fronts))
    rng = np.random.default_rng(seed)
    size = support_size
    entry_bytes = 2 * net.config.encoder_channels[0] * grid * grid * torch.finfo(dtype).bits // 8
    keep = len(values) * bank_size * entry_bytes <= ENCODED_SUPPORT_BUDGET  # else recomputed per slice
    log.info("propagating %s through %d slices (%d steps), bank %d (%s), %d draw(s) of %d",
             values, n_slices, total, bank_size, policy, draws, size)
    done = 0
    yield Progress(0, total, "propagating")
    for value, s, front in schedule:
        bank = banks[value]
        count = draws if policy in ("self-sorting", "admit-all") else 1
        probs = _predict(net, bank, bank.draw(embeddings[s], size, count, rng, prompt_set), grid_images[s], keep)
        mean = combine_members(probs, threshold)
        full = from_grid(mean[None, None], mapping)[0, 0].clamp(0, 1).cpu().numpy()
        mask = full >= threshold
        grid_mask = (mean > threshold).to(dtype)
        measures = draw_measures(probs, threshold)
        reference = bank.most_similar_pinned(embeddings[s])
        measures["consistency"] = consistency(net, grid_images[s, 0], grid_mask, reference.image, reference.mask,
                                              threshold)
        measures["confidence"] = combine(measures)
        vanished = doubtful = False
        if front is not None:
            vanished = mask.sum() < max(1.0, min_area * prompt_area[value])
            doubtful = not vanished and measures["confidence"] < stop_confidence
            if vanished:
                mask[:] = False
        take = mask & (full > best[s])
        written = _Written(s, value, take, labels[s].copy(), best[s].copy()) if doubtful else None
        labels[s][take] = value
        best[s][take] = full[take]
        if front is not None:
            front.observe(s, vanished, doubtful, written, stop_after)
        confidence[values.index(value), s] = measures["confidence"]
        if not mask.any():
            grid_mask = torch.zeros_like(grid_mask)
        action = bank.offer(MemoryEntry(grid_images[s, 0], grid_mask, measures["confidence"], embeddings[s],
                                        slice_index=s))
        done += 1
        if front is not None and front.stopped:
            if front.stopped_on_confidence:
                confidence_stops.setdefault(value, []).append(front.doubtful[0][0])
            for _, doubtful_write in front.doubtful:  # the object had ended there after all
                _undo(doubtful_write, labels, best, undone)
            done += len(front.slices) - front.slices.index(s) - 1
            log.info("label %d vanished at slice %d; its front stops", value, s)
        payload = {"slice": s, "label": value, "mask": take, "confidence": measures["confidence"],
                   "measures": measures, "bank": action}
        yield Progress(done, total, "propagating", payload)

    return PropagationResult(
        labels=np.moveaxis(labels, 0, axis),
        label_values=values,
        confidence=confidence,
        axis=axis,
        prompt_slices=pinned,
        complete_slices=complete,
        confidence_stops={v: sorted(stops) for v, stops in confidence_stops.items()},
    )


@dataclass
class _Written:
    """What a doubtful slice's prediction wrote (``where``) and the labels and probabilities it covered
    there, to give back if its front stops."""

    slice: int
    label: int
    where: np.ndarray
    labels: np.ndarray
    best: np.ndarray


def _undo(written: _Written, labels: np.ndarray, best: np.ndarray, undone: dict[int, list[_Written]]) -> None:
    """Give a stopped front's voxels on one slice back to what they held before it wrote them. A label
    given back that was itself undone on that slice since gets what it had covered, in turn."""
    s = written.slice
    region = written.where & (labels[s] == written.label)
    labels[s][region], best[s][region] = written.labels[region], written.best[region]
    earlier = undone.setdefault(s, [])
    for _ in earlier:  # each pass goes one step back; a chain is never longer than the records
        stale = [(r, region & r.where & (labels[s] == r.label)) for r in earlier]
        stale = [(r, where) for r, where in stale if where.any()]
        if not stale:
            break
        for r, where in stale:
            labels[s][where], best[s][where] = r.labels[where], r.best[where]
    earlier.append(written)


def propagate(image: np.ndarray, prompt: np.ndarray, model=None, **kwargs) -> PropagationResult:
    """Run :func:`iter_propagate` to the end and return its result."""
    return run_to_end(iter_propagate(image, prompt, model, **kwargs))

"""Prompt propagation: paint an object on one slice, and the in-context network carries it through
the volume, with two memories (:mod:`.memory`) as its support.

Every label value is a separate object. An object's *prompts* are the slices where it is painted;
they are pinned in its long-term bank. Fronts move away from each prompt slice by slice
(:mod:`.fronts` says in which order); each front keeps a short-term memory of the last slices it
accepted. For each slice the network predicts the slice from ``draws`` support sets drawn from the
long-term bank by similarity (the last one is the most similar painted slice, see ``prompt_set``)
and from the front's short-term memory as one more set; their combination (:mod:`.ensemble`) is the
prediction. Where an object's pixel classifier passes its test (:mod:`.classifier`), the mean of
the two probabilities is what is written; the memories keep the network's own mask. Its confidence
(:mod:`.confidence`) and area decide, by the front's :class:`~.fronts.StopRule`, whether the slice is
accepted (it joins the short-term memory), doubtful or vanished (where the classifier joins, the
agreement of its mask with the network's takes the confidence's place: ``classifier_stop``); every
prediction is offered to the long-term bank, whose rules decide whether it stays. A run of
``stop_after`` doubtful or vanished slices stops the front and the doubtful ones are undone.
Objects are combined by the highest probability; painted voxels are kept as painted.

``complete_slices`` are slices whose labels are complete (a corrected slice): an object absent
there is known to be absent, so its fronts stop there. With ``unordered=True`` the slices are an
unordered stack of 2D images: each object's next image is the one most similar to an entry of its
bank, and nothing stops.

The work is split in three: :func:`_setup` (checks, the model grid, memories, fronts), the
per-slice step :func:`_predict_slice` (support sets, prediction, confidence) and :func:`_record`
(writing the slice, the stop rule, the memories, undoing a stopped front's doubtful slices).
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from napari_openseg.core.axes import shape_text
from napari_openseg.core.engine import ENCODED_SUPPORT_BUDGET, encode_tensors, prepare_network, probabilities
from napari_openseg.core.engine_settings import DEFAULT_PRECISION
from napari_openseg.core.ensemble import combine_members
from napari_openseg.core.preprocess import Aspect, from_grid, masks_to_grid, normalize_intensity, to_grid
from napari_openseg.core.progress import Progress, run_to_end
from napari_openseg.core.propagate.classifier import ObjectClassifier, SliceFeatures, fit_objects
from napari_openseg.core.propagate.confidence import combine, consistency, draw_measures
from napari_openseg.core.propagate.fronts import (
    Front,
    StopRule,
    make_fronts,
    ordered_schedule,
    similarity_schedule,
)
from napari_openseg.core.propagate.memory import MemoryBank, MemoryEntry, ShortTermMemory, slice_embeddings
from napari_openseg.core.propagate.result import PropagationResult, check_slices
from napari_openseg.core.propagate.settings import (
    DEFAULT_DRAWS,
    DEFAULT_STOP_CONFIDENCE,
    DEFAULT_SUPPORT_SIZE,
    DIRECTIONS,
    PropagationSettings,
)
from napari_openseg.core.support import check_image, check_labels, label_dtype
from napari_openseg.errors import OpenSegError

__all__ = [
    "DEFAULT_DRAWS",
    "DEFAULT_STOP_CONFIDENCE",
    "DEFAULT_SUPPORT_SIZE",
    "PropagationResult",
    "PropagationSettings",
    "iter_propagate",
    "propagate",
]

log = logging.getLogger(__name__)

#: Slices moved to the model grid per call, to bound the memory of large volumes.
GRID_CHUNK = 64
#: Painted voxels get this "probability" so no prediction overwrites them.
PAINTED = 2.0


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
        log.warning(
            "%d slice(s) hold no finite values (%s); no object is drawn on them",
            len(blank),
            ", ".join(map(str, blank[:10])) + (", ..." if len(blank) > 10 else ""),
        )
    return blank


def _encoded_support(net, entries: Sequence[MemoryEntry], indices: np.ndarray, keep: bool = True):
    """The first block's support terms of the draws ``indices "K S"`` (positions in ``entries``).

    The query-independent work on a support entry (:func:`~napari_openseg.core.engine.encode_tensors`)
    is done once per entry and, with ``keep``, kept with it: an entry serves many slices and draws.
    """
    from napari_openseg.model.fast import EncodedSupport

    unique, position = np.unique(indices, return_inverse=True)
    terms = {int(i): entries[i].encoded for i in unique if entries[i].encoded is not None}
    fresh = [int(i) for i in unique if int(i) not in terms]
    if fresh:
        images = torch.stack([entries[i].image for i in fresh])[:, None, None]
        masks = torch.stack([entries[i].mask for i in fresh])[:, None, None]
        encoded = encode_tensors(net, images, masks)  # one entry per batch item: "n C H W", "n 1 C H W"
        for k, i in enumerate(fresh):
            terms[i] = (encoded.share_mean[k], encoded.conv_term[k, 0])
            if keep:
                entries[i].encoded = terms[i]
    shares = torch.stack([terms[int(i)][0] for i in unique])
    convs = torch.stack([terms[int(i)][1] for i in unique])
    position = torch.as_tensor(position.reshape(indices.shape), device=shares.device)
    return EncodedSupport(share_mean=shares[position].mean(dim=1), conv_term=convs[position])


def _predict(
    net, entries: Sequence[MemoryEntry], sets: Sequence[Sequence[int]], image: torch.Tensor, keep: bool
) -> torch.Tensor:
    """Probabilities ``"K g g"`` of the slice ``image "1 g g"`` from each of the K support ``sets``
    (positions in ``entries``; sets may differ in size)."""
    # The network averages over a set's entries, so one entry repeated is that entry alone (the
    # prompt set): predicted from one copy, it costs a copy's work, not the set size's.
    sets = [list(members[:1]) if len(set(members)) == 1 else list(members) for members in sets]
    probs: list[torch.Tensor | None] = [None] * len(sets)
    for size in sorted({len(members) for members in sets}):
        which = [k for k, members in enumerate(sets) if len(members) == size]
        indices = np.asarray([sets[k] for k in which])
        # A support set is a multiset: draws with the same entries give the same prediction, run it
        # once (a bank holding only the prompt gives K identical draws).
        distinct, copies = np.unique(np.sort(indices, axis=1), axis=0, return_inverse=True)
        query = image[None].expand(len(distinct), -1, -1, -1).contiguous(memory_format=torch.channels_last)
        predicted = probabilities(net, query, _encoded_support(net, entries, distinct, keep))[:, 0]
        for k, copy in zip(which, copies.reshape(-1)):
            probs[k] = predicted[copy]
    return torch.stack(probs)


def _pin_prompts(
    bank: MemoryBank,
    painted: np.ndarray,
    grid_images: torch.Tensor,
    embeddings: torch.Tensor,
    aspect: Aspect,
    value: int,
) -> tuple[list[int], dict[int, MemoryEntry]]:
    """Pin every slice of ``painted "N H W"`` (one object's mask) that shows the object; the painted
    slices and the entries pinned, by slice."""
    slices = np.flatnonzero(painted.reshape(painted.shape[0], -1).any(axis=1)).tolist()
    grid = grid_images.shape[-1]
    masks = masks_to_grid(torch.from_numpy(painted[slices]).to(grid_images.device), grid, aspect)
    pinned = {}
    for s, mask in zip(slices, masks):
        if mask.any():  # a painted speck can vanish on a coarse grid
            pinned[s] = MemoryEntry(
                grid_images[s, 0], mask[0].to(grid_images.dtype), 1.0, embeddings[s], slice_index=s
            )
            bank.pin(pinned[s])
    if not pinned:
        raise OpenSegError(
            f"label {value} is too small on the model grid ({grid}x{grid}) on every painted slice; "
            "paint it on a slice where it is larger"
        )
    return slices, pinned


def _grid_stack(stack: np.ndarray, grid: int, aspect: Aspect, device: torch.device, dtype: torch.dtype):
    """``"N H W"`` normalised slices -> ``"N 1 g g"`` on ``device`` and the mapping back."""
    chunks, mapping = [], None
    for start in range(0, stack.shape[0], GRID_CHUNK):
        part = torch.from_numpy(np.ascontiguousarray(stack[start : start + GRID_CHUNK])).to(device)
        on_grid, mapping = to_grid(part, grid, aspect)
        chunks.append(on_grid.to(dtype))
    return torch.cat(chunks), mapping


@dataclass
class _Run:
    """One run's state: the prepared network and slices, each object's memories and fronts, and
    what has been written so far (``"N H W"`` labels and the probability that wrote each voxel)."""

    settings: PropagationSettings
    net: object
    grid_images: torch.Tensor
    embeddings: torch.Tensor
    mapping: object
    axis: int
    values: list[int]
    complete: list[int]
    banks: dict[int, MemoryBank]
    labels: np.ndarray
    best: np.ndarray
    confidence: np.ndarray
    keep: bool
    rng: np.random.Generator
    features: SliceFeatures | None  # None once no object's classifier joins (frees the volume's copy)
    classifiers: dict[int, ObjectClassifier] = field(default_factory=dict)
    prompt_slices: dict[int, list[int]] = field(default_factory=dict)
    painted_area: dict[int, float] = field(default_factory=dict)
    fronts: list[Front] = field(default_factory=list)
    remaining: dict[int, list[int]] = field(default_factory=dict)
    confidence_stops: dict[int, list[int]] = field(default_factory=dict)
    classifier_stops: dict[int, list[int]] = field(default_factory=dict)
    undone: dict[int, list[_Written]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Slices to predict, all objects together (fronts stopped early skip theirs)."""
        if self.settings.unordered:
            return sum(len(left) for left in self.remaining.values())
        return sum(len(front.slices) for front in self.fronts)

    def schedule(self) -> Iterator[tuple[int, int, Front | None]]:
        """``(label, slice, front)`` in the order the slices are predicted (``front`` None: unordered)."""
        if self.settings.unordered:
            return ((v, s, None) for v, s in similarity_schedule(self.remaining, self.banks, self.embeddings))
        return ((front.label, s, front) for front, s in ordered_schedule(self.fronts))

    def result(self) -> PropagationResult:
        return PropagationResult(
            labels=np.moveaxis(self.labels, 0, self.axis),
            label_values=self.values,
            confidence=self.confidence,
            axis=self.axis,
            prompt_slices=self.prompt_slices,
            complete_slices=self.complete,
            confidence_stops={v: sorted(stops) for v, stops in self.confidence_stops.items()},
            classifier_stops={v: sorted(stops) for v, stops in self.classifier_stops.items()},
            classifier_dice={v: c.dice for v, c in self.classifiers.items()},
            classifier_joined=[v for v, c in self.classifiers.items() if c.joins],
        )


def _setup(
    image,
    prompt,
    model,
    axis: int,
    label_values,
    complete_slices,
    settings: PropagationSettings,
    device,
    precision: str,
    rgb,
) -> _Run:
    """Check the inputs, prepare the network and the slices on its grid, pin each object's painted
    slices in its long-term bank, write them, and lay out the fronts."""
    image = check_image(image, rgb)
    if image.ndim != 3:
        raise OpenSegError(
            f"propagation needs a volume or a stack of 2D images (Z H W), got shape {shape_text(image.shape)}; "
            "use segmentation from a support set for a single image"
        )
    prompt = check_labels(prompt, image.shape)
    if not -3 <= axis < 3:
        raise OpenSegError(f"slice axis must be 0, 1 or 2, got {axis}")
    axis = axis % 3
    stack = np.moveaxis(normalize_intensity(image), axis, 0)
    prompt_stack = np.moveaxis(prompt, axis, 0)
    n_slices = stack.shape[0]
    complete = check_slices(complete_slices, n_slices, "complete")
    values = _default_values(prompt_stack, label_values)
    blank = _blank_slices(np.moveaxis(image, axis, 0))

    network = prepare_network(model, device, precision, propagation=True)
    net, torch_device, dtype, grid = network.net, network.device, network.dtype, network.grid
    grid_images, mapping = _grid_stack(stack, grid, settings.aspect, torch_device, dtype)
    entry_bytes = 2 * net.config.encoder_channels[0] * grid * grid * torch.finfo(dtype).bits // 8
    entries = settings.bank_size + 2 * settings.short_term  # per object: its bank and two fronts' memories
    run = _Run(
        settings=settings,
        net=net,
        grid_images=grid_images,
        embeddings=slice_embeddings(grid_images),
        mapping=mapping,
        axis=axis,
        values=values,
        complete=complete,
        banks={
            v: MemoryBank(
                settings.bank_size, settings.policy, settings.floor, temperature=settings.temperature
            )
            for v in values
        },
        labels=np.zeros(stack.shape, label_dtype(max(values))),
        best=np.zeros(stack.shape, np.float32),
        confidence=np.full((len(values), n_slices), np.nan, np.float32),
        keep=len(values) * entries * entry_bytes <= ENCODED_SUPPORT_BUDGET,  # else recomputed per slice
        rng=np.random.default_rng(settings.seed),
        features=SliceFeatures(stack),
    )
    for value in values:
        painted = prompt_stack == value
        slices, pinned = _pin_prompts(
            run.banks[value], painted, grid_images, run.embeddings, settings.aspect, value
        )
        run.prompt_slices[value] = slices
        for s in slices:
            run.labels[s][painted[s]] = value
            run.best[s][painted[s]] = PAINTED
        run.painted_area[value] = float(painted[slices].sum()) / len(slices)
        # a blank slice (no finite value) holds no object: fronts end there, as at a complete slice
        blocked = set(slices) | {s for s in complete + blank if s not in slices}
        if settings.unordered:
            run.remaining[value] = [s for s in range(n_slices) if s not in blocked]
            continue
        for front in make_fronts(value, slices, blocked, n_slices, DIRECTIONS[settings.direction]):
            front.last_area = float(painted[front.origin].sum())
            front.recent = ShortTermMemory(settings.short_term)
            if front.origin in pinned:
                front.recent.accept(pinned[front.origin])
            run.fronts.append(front)
    run.classifiers = fit_objects(run.features, prompt_stack, run.prompt_slices, settings)
    if not any(c.joins for c in run.classifiers.values()):
        run.features = None
    return run


@dataclass
class _Prediction:
    """One slice's prediction for one object: probabilities at full size and its masks."""

    full: np.ndarray  # "H W" probabilities (with a joined pixel classifier: the mean of the two)
    mask: np.ndarray  # "H W" bool
    network_mask: np.ndarray  # "H W" bool: the network's alone (what benchmarks compare with)
    grid_mask: torch.Tensor  # "g g" {0, 1}: the network's own mask, for the memories
    measures: dict[str, float]


def _support_sets(
    run: _Run, value: int, s: int, front: Front | None
) -> tuple[list[MemoryEntry], list[list[int]]]:
    """The entries and the support sets (positions in them) for slice ``s`` of object ``value``:
    ``draws`` sets from the long-term bank (FIFO and prompt-only banks: the whole bank, once), then
    the front's short-term memory as one more set."""
    settings, bank = run.settings, run.banks[value]
    count = settings.draws if settings.policy in ("self-sorting", "admit-all") else 1
    entries = list(bank.entries)
    drawn = bank.draw(run.embeddings[s], settings.support_size, count, run.rng, settings.prompt_set)
    sets = [row.tolist() for row in drawn]
    if front is not None and len(front.recent):
        sets.append(list(range(len(entries), len(entries) + len(front.recent))))
        entries += front.recent.entries
    return entries, sets


def _predict_slice(run: _Run, value: int, s: int, front: Front | None) -> _Prediction:
    """The per-slice step: predict slice ``s`` of object ``value`` from its memories and score it."""
    threshold = run.settings.threshold
    entries, sets = _support_sets(run, value, s, front)
    probs = _predict(run.net, entries, sets, run.grid_images[s], run.keep)
    mean = combine_members(probs, threshold)
    full = from_grid(mean[None, None], run.mapping)[0, 0].clamp(0, 1).cpu().numpy()
    grid_mask = (mean > threshold).to(run.grid_images.dtype)
    measures, network_mask = _measure(run, value, s, probs, grid_mask), full >= threshold
    mask = network_mask
    classifier = run.classifiers.get(value)
    if classifier is not None and classifier.joins:
        # what is written; the bank keeps the network's own mask (docs/propagation.md says why)
        full, measures["classifier_agreement"] = classifier.fuse(full, run.features(s), threshold)
        mask = full >= threshold
    return _Prediction(full, mask, network_mask, grid_mask, measures)


def _measure(run: _Run, value: int, s: int, probs: torch.Tensor, grid_mask: torch.Tensor) -> dict[str, float]:
    """The confidence measures of slice ``s`` of object ``value`` from its members ``probs "K g g"``
    and their combined mask (:mod:`.confidence`); ``"confidence"`` is their product."""
    threshold = run.settings.threshold
    measures = draw_measures(probs, threshold)
    reference = run.banks[value].most_similar_pinned(run.embeddings[s])
    measures["consistency"] = consistency(
        run.net, run.grid_images[s, 0], grid_mask, reference.image, reference.mask, threshold
    )
    measures["confidence"] = combine(measures)
    return measures


def _record(run: _Run, value: int, s: int, front: Front | None, predicted: _Prediction) -> tuple[dict, int]:
    """Write one slice's prediction, judge it by the stop rule, update the memories, and undo a
    stopped front's doubtful slices. Returns the progress payload and the front's slices skipped."""
    settings = run.settings
    mask, full, conf = predicted.mask, predicted.full, predicted.measures["confidence"]
    verdict = "unordered"
    if front is not None:
        if front.first_confidence is None:
            front.first_confidence = conf
        rule, agreement = StopRule.of(settings), predicted.measures.get("classifier_agreement")
        verdict = rule.judge(
            float(mask.sum()),
            conf,
            run.painted_area[value],
            front.last_area,
            front.first_confidence,
            agreement,
        )
        if verdict == "vanished":
            mask = np.zeros_like(mask)
    labels, best = run.labels, run.best
    take = mask & (full > best[s])
    written = _Written(s, value, take, labels[s].copy(), best[s].copy()) if verdict == "doubtful" else None
    labels[s][take] = value
    best[s][take] = full[take]
    run.confidence[run.values.index(value), s] = conf
    grid_mask = predicted.grid_mask if mask.any() else torch.zeros_like(predicted.grid_mask)
    entry = MemoryEntry(run.grid_images[s, 0], grid_mask, conf, run.embeddings[s], slice_index=s)
    action = run.banks[value].offer(entry)
    skipped = 0
    if front is not None:
        front.observe(s, verdict == "vanished", verdict == "doubtful", written, settings.stop_after)
        if verdict == "accepted":
            front.last_area = float(mask.sum())
            front.recent.accept(entry)
        if front.stopped:
            if front.stopped_on_confidence:  # on the classifier's agreement where that is the rule
                stops = run.classifier_stops if rule.by_agreement(agreement) else run.confidence_stops
                stops.setdefault(value, []).append(front.doubtful[0][0])
            for _, doubtful_write in front.doubtful:  # the object had ended there after all
                _undo(doubtful_write, labels, best, run.undone)
            skipped = len(front.slices) - front.slices.index(s) - 1
            log.info("label %d ended at slice %d; its front stops", value, s)
    payload = {
        "slice": s,
        "label": value,
        "mask": take,
        "network_mask": predicted.network_mask,
        "confidence": conf,
        "measures": predicted.measures,
        "bank": action,
        "verdict": verdict,
    }
    return payload, skipped


def iter_propagate(
    image: np.ndarray,
    prompt: np.ndarray,
    model=None,
    *,
    axis: int = 0,
    label_values: Sequence[int] | None = None,
    complete_slices: Sequence[int] = (),
    device: str | torch.device = "auto",
    precision: str = DEFAULT_PRECISION,
    rgb: bool | None = None,
    **options,
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
    **options
        Fields of :class:`~napari_openseg.core.propagate.settings.PropagationSettings`
        (memories, draws, stop rule, direction, unordered, pixel classifier, threshold, aspect, seed).

    Yields progress per predicted slice (``payload``: ``slice``, ``label``, ``mask "H W"`` as
    written, ``network_mask`` (the network's alone, before a joined pixel classifier), ``confidence``,
    ``measures`` (with ``classifier_agreement`` where the classifier joins), ``bank`` (what the
    long-term bank did with it),
    ``verdict`` (``"accepted"``, ``"doubtful"``, ``"vanished"``; ``"unordered"`` for stacks));
    returns a :class:`PropagationResult`.
    """
    settings = PropagationSettings.from_options(**options)
    run = _setup(image, prompt, model, axis, label_values, complete_slices, settings, device, precision, rgb)
    total = run.total
    log.info(
        "propagating %s through %d slices (%d steps), bank %d (%s), short-term %d, %d draw(s) of %d",
        run.values,
        run.labels.shape[0],
        total,
        settings.bank_size,
        settings.policy,
        settings.short_term,
        settings.draws,
        settings.support_size,
    )
    done = 0
    yield Progress(0, total, "propagating")
    for value, s, front in run.schedule():
        payload, skipped = _record(run, value, s, front, _predict_slice(run, value, s, front))
        done += 1 + skipped
        yield Progress(done, total, "propagating", payload)
    return run.result()


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

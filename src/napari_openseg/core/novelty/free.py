"""Training-free novelty maps: prototypes of the in-context network's features, from a support set.

No network is trained. For every known task ``t`` (a label value of the support set) the in-context
network sees a query slice with a support subset of task ``t`` and yields its last decoder features
``"C g g"`` (:func:`~napari_openseg.model.fast.fast_features`); a pixel's embedding is the
concatenation over tasks, ``"(T C)"``. Prototypes: up to ``prototype_slices`` distinct support slices
are embedded the same way (each with a context that leaves its own slice out, so the network cannot
copy the answer), and every class's prototype (background = pixels of those slices that no entry
marks) is the mean direction of its pixels' embeddings. The embedding scale is set so that those
embeddings have unit mean length, as a trained network's are (see :mod:`~napari_openseg.core.novelty.scores`).

Scores are computed on the model grid per slice and resized back with the inverse grid mapping; the
known-class segmentation is the nearest prototype.

With an unknown seed and ``adapt_unknown`` > 0, a first pass embeds every ``ADAPT_SLICE_STRIDE``-th
slice and keeps every ``ADAPT_STRIDE``-th grid pixel inside the body (no labels); the unknown
prototype is adapted on that sample (:meth:`~napari_openseg.core.novelty.prototypes.PrototypeBank.adapt_unknown`,
moving average 0.9) before the scoring pass, as for trained models.
"""

from __future__ import annotations

import logging
from collections.abc import Generator

import numpy as np
import torch

from napari_openseg.core.engine import auto_batch_size, prepare_network
from napari_openseg.core.engine_settings import DEFAULT_ASPECT
from napari_openseg.core.novelty.model import body_mask, check_mask, check_seed, check_volume
from napari_openseg.core.novelty.prototypes import DEFAULT_MOMENTUM, PrototypeBank
from napari_openseg.core.novelty.scores import (
    NoveltyMaps,
    class_similarities,
    maps_from_raw,
    score_channels,
)
from napari_openseg.core.novelty.settings import (
    DEFAULT_FREE_SUPPORT_SIZE,
    DEFAULT_PROTOTYPE_SLICES,
    FREE_OPTIONS,
    NoveltySettings,
)
from napari_openseg.core.novelty.volume_map import ADAPT_STRIDE
from napari_openseg.core.preprocess import from_grid, masks_to_grid, normalize_intensity, to_grid
from napari_openseg.core.progress import Progress, run_to_end
from napari_openseg.core.support import SupportSet, label_dtype, load_support
from napari_openseg.errors import OpenSegError

log = logging.getLogger(__name__)

#: The adaptation sample: every ADAPT_SLICE_STRIDE-th slice and, as for trained models, every
#: ADAPT_STRIDE-th grid pixel per axis.
ADAPT_SLICE_STRIDE = ADAPT_STRIDE


def slice_key(entry) -> tuple:
    """Which slice an entry was cut from (entries of one slice share it)."""
    if entry.slice_index is None:
        return (entry.source, id(entry.image))
    return (entry.source, entry.axis, entry.slice_index)


class InContextEmbedder:
    """Embeds slices with the in-context network, one fixed support subset per known task."""

    def __init__(
        self,
        support: SupportSet,
        model=None,
        *,
        support_size: int = DEFAULT_FREE_SUPPORT_SIZE,
        seed: int = 0,
        device: str | torch.device = "auto",
        batch_size: int | None = None,
    ):
        self.tasks = support.validate()
        self.support = support
        self.network = prepare_network(model, device, "float32")
        self.device, self.net, self.grid = self.network.device, self.network.net, self.network.grid
        self.batch_size = batch_size or auto_batch_size(support_size, self.device)
        rng = np.random.default_rng(seed)
        self.subsets = {t: support.sample(t, support_size, rng) for t in self.tasks}
        self._encoded = {t: self._encode(self.subsets[t]) for t in self.tasks}

    def _encode(self, entries):
        return self.network.encode(entries, DEFAULT_ASPECT)

    @property
    def dim(self) -> int:
        return len(self.tasks) * self.net.config.decoder_channels[-1]

    def embed(self, query: torch.Tensor, encoded: dict | None = None) -> torch.Tensor:
        """``query "B 1 g g"`` -> embeddings ``"B (T C) g g"``."""
        encoded = encoded or self._encoded
        return torch.cat([self.network.features(query, encoded[t]) for t in self.tasks], dim=1)

    def leave_out(self, key: tuple) -> dict:
        """Encoded supports without the entries of slice ``key`` (kept if nothing else is left)."""
        result = {}
        for t in self.tasks:
            others = [e for e in self.subsets[t] if slice_key(e) != key]
            if len(others) == len(self.subsets[t]):
                result[t] = self._encoded[t]
            else:
                rest = [e for e in self.support.task(t) if slice_key(e) != key][: len(self.subsets[t])]
                result[t] = self._encode(rest) if rest else self._encoded[t]
        return result


def _prototype_slices(
    support: SupportSet, limit: int, seed: int
) -> list[tuple[tuple, np.ndarray, np.ndarray]]:
    """Distinct support slices ``(key, image "H W", class label map "H W")``; unmarked pixels are 0."""
    by_image: dict[tuple, list] = {}
    for entry in support.entries:
        by_image.setdefault(slice_key(entry), []).append(entry)
    groups = list(by_image.values())
    rng = np.random.default_rng(seed)
    if len(groups) > limit:
        groups = [groups[i] for i in sorted(rng.choice(len(groups), limit, replace=False))]
    slices = []
    for group in groups:
        labels = np.zeros(group[0].image.shape, np.int64)
        for entry in group:
            labels[entry.mask] = entry.label
        slices.append((slice_key(group[0]), group[0].image, labels))
    return slices


def build_bank(
    embedder: InContextEmbedder, prototype_slices: int = DEFAULT_PROTOTYPE_SLICES, seed: int = 0
) -> PrototypeBank:
    """Prototype bank of the support's classes (background 0 included) in the embedder's space."""
    values = [0] + list(embedder.tasks)
    bank = PrototypeBank(values, embedder.dim, momentum=0.0)
    all_emb, all_cls = [], []
    for key, image, labels in _prototype_slices(embedder.support, prototype_slices, seed):
        query, _ = to_grid(torch.from_numpy(image[None]).float().to(embedder.device), embedder.grid)
        emb = embedder.embed(query, embedder.leave_out(key))[0]  # "E g g"
        for index, value in enumerate(values):
            cls_mask = masks_to_grid(
                torch.from_numpy(labels[None] == value).to(embedder.device), embedder.grid
            )
            picked = cls_mask[0, 0].bool()
            if picked.any():
                all_emb.append(emb[:, picked].T.cpu())
                all_cls.append(torch.full((int(picked.sum()),), index))
    embeddings, classes = torch.cat(all_emb), torch.cat(all_cls)
    bank.set_from_means(embeddings, classes)
    if not bank.ready:
        raise OpenSegError(f"no support pixels for classes {bank.missing_classes()}")
    bank.embedding_scale = float(1.0 / embeddings.norm(dim=1).mean().clamp_min(1e-8))
    return bank


def _slices(volume: np.ndarray, axis: int) -> np.ndarray:
    if not -3 <= axis < 3:
        raise OpenSegError(f"slice axis must be 0, 1 or 2, got {axis}")
    return np.moveaxis(volume, axis, 0)


def seed_unknown_from(
    embedder: InContextEmbedder, bank: PrototypeBank, image: np.ndarray, seed_mask: np.ndarray, axis: int = 0
) -> None:
    """Seed ``bank``'s unknown prototype from one painted instance (``seed_mask``) in ``image``."""
    image, seed_mask = check_seed(image, seed_mask)
    stack, masks = _slices(normalize_intensity(image), axis), _slices(seed_mask, axis)
    found = []
    for index in np.flatnonzero(masks.any(axis=(1, 2))):
        query, _ = to_grid(torch.from_numpy(stack[index][None]).to(embedder.device), embedder.grid)
        picked = masks_to_grid(torch.from_numpy(masks[index][None]).to(embedder.device), embedder.grid)[
            0, 0
        ].bool()
        if picked.any():
            found.append(embedder.embed(query)[0][:, picked].T.cpu())
    if not found:
        raise OpenSegError("the unknown seed is thinner than one model-grid pixel; paint a larger region")
    bank.seed_unknown(torch.cat(found), "one painted instance (training-free)")


def _body_embeddings(embedder: InContextEmbedder, slices: np.ndarray, body: np.ndarray) -> torch.Tensor:
    """Embeddings ``"N E"`` of every ``ADAPT_STRIDE``-th grid pixel inside ``body`` of ``slices "B H W"``."""
    query, _ = to_grid(torch.from_numpy(np.ascontiguousarray(slices)).to(embedder.device), embedder.grid)
    inside = masks_to_grid(torch.from_numpy(np.ascontiguousarray(body)).to(embedder.device), embedder.grid)
    s = ADAPT_STRIDE
    emb = embedder.embed(query)[:, :, ::s, ::s]  # "B E g/s g/s"
    return emb.permute(0, 2, 3, 1)[inside[:, 0, ::s, ::s].bool()].float().cpu()


def iter_training_free_novelty(
    image: np.ndarray,
    support: SupportSet,
    model=None,
    *,
    settings: NoveltySettings | None = None,
    axis: int = 0,
    mask: np.ndarray | None = None,
    unknown_seed: tuple[np.ndarray, np.ndarray] | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
    keep_raw: bool = False,
    **options,
) -> Generator[Progress, None, NoveltyMaps]:
    """Novelty maps of a ``"D H W"`` volume from a support set, with no training.

    ``model``: in-context weights name, file or network (default weights when None);
    ``unknown_seed``: optional ``(image, mask)`` with one painted instance of an unseen structure;
    ``settings``: :class:`~napari_openseg.core.novelty.settings.NoveltySettings` (default: the
    defaults), of which a training-free map uses ``support_size``, ``seed``, ``prototype_slices``,
    ``adapt_unknown`` (steps adapting the unknown prototype on this volume's unlabelled embeddings;
    needs the seed) and ``weights``, ``side``, ``sigma`` (fusion and appearance map,
    :func:`~napari_openseg.core.novelty.scores.maps_from_raw`); ``options``: those fields as keywords,
    over ``settings``. Yields progress per batch of slices; returns
    :class:`~napari_openseg.core.novelty.scores.NoveltyMaps`.
    """
    settings = NoveltySettings.merge(settings, options, FREE_OPTIONS, "a training-free map")
    adapt_unknown = settings.adapt_unknown
    image = check_volume(image)
    support = load_support(support)
    mask = check_mask(mask, image.shape)
    if unknown_seed is not None:  # checked before the support set is encoded
        unknown_seed = check_seed(*unknown_seed)
    normalized = normalize_intensity(image)
    mask = body_mask(normalized, normalized=True) if mask is None else mask
    if adapt_unknown and unknown_seed is None:
        raise OpenSegError("adapting the unknown prototype needs an unknown seed: paint one unseen structure")
    if batch_size is not None and batch_size < 1:
        raise OpenSegError(f"batch size must be >= 1 (or left out for automatic), got {batch_size}")
    embedder = InContextEmbedder(
        support,
        model,
        support_size=settings.support_size,
        seed=settings.seed,
        device=device,
        batch_size=batch_size,
    )
    bank = build_bank(embedder, settings.prototype_slices, settings.seed)
    if unknown_seed is not None:
        seed_unknown_from(embedder, bank, unknown_seed[0], unknown_seed[1], axis)
    stack = _slices(normalized, axis)
    n = stack.shape[0]
    # Slices without a voxel of the body are never scored (every map is 0 outside it): skip them.
    inside = np.flatnonzero(_slices(mask, axis).any(axis=(1, 2)))
    sampled = list(inside[::ADAPT_SLICE_STRIDE]) if adapt_unknown else []
    adapt_batches = range(0, len(sampled), embedder.batch_size)
    total = n + len(adapt_batches)
    yield Progress(0, total, "training-free novelty")
    if adapt_unknown:
        sample, body = [], _slices(mask, axis)
        for done, first in enumerate(adapt_batches, start=1):
            picked = sampled[first : first + embedder.batch_size]
            sample.append(_body_embeddings(embedder, stack[picked], body[picked]))
            yield Progress(done, total, "adapting the unknown prototype")
        # The bank built here replaces prototypes by their means (momentum 0); the unknown one adapts
        # with the usual moving average.
        won = bank.adapt_unknown(torch.cat(sample), steps=adapt_unknown, momentum=DEFAULT_MOMENTUM)
        log.info(
            "unknown prototype adapted on %d embeddings; it wins %.2f%% of them",
            sum(len(x) for x in sample),
            100 * won,
        )
    raw = np.zeros((4, *stack.shape), np.float32)
    # class indices, not label values; index 0 (background) where a slice is not embedded
    nearest = np.zeros(stack.shape, np.min_scalar_type(bank.num_classes))
    for first in range(0, len(inside), embedder.batch_size):
        picked = inside[first : first + embedder.batch_size]
        query, mapping = to_grid(
            torch.from_numpy(np.ascontiguousarray(stack[picked])).to(embedder.device), embedder.grid
        )
        emb = embedder.embed(query)  # "b E g g"
        flat = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
        scores = score_channels(flat, bank).reshape(emb.shape[0], *emb.shape[2:], 4).permute(0, 3, 1, 2)
        raw[:, picked] = from_grid(scores, mapping).permute(1, 0, 2, 3).cpu().numpy()
        # resize the similarities, not the class indices: indices 0 and 3 side by side would blend into 1
        sims = class_similarities(flat, bank).reshape(emb.shape[0], *emb.shape[2:], -1).permute(0, 3, 1, 2)
        nearest[picked] = from_grid(sims, mapping).argmax(dim=1).cpu().numpy()
        done = n - len(inside) + first + len(picked)
        yield Progress(len(adapt_batches) + done, total, "training-free novelty")
    raw = np.moveaxis(raw, 1, axis % 3 + 1)
    values = np.asarray(bank.class_values, dtype=label_dtype(max(bank.class_values)))
    segmentation = np.moveaxis(values[nearest], 0, axis)
    return maps_from_raw(
        raw,
        mask,
        bank.num_classes,
        bank.unknown is not None,
        settings.weights,
        segmentation,
        keep_raw,
        normalized,
        settings.side,
        settings.sigma,
        settings.threshold,
    )


def training_free_novelty(image: np.ndarray, support: SupportSet, model=None, **kwargs) -> NoveltyMaps:
    """Run :func:`iter_training_free_novelty` to the end."""
    return run_to_end(iter_training_free_novelty(image, support, model, **kwargs))

"""Novelty maps of whole volumes with a trained MedOpenSeg model (sliding-window inference).

The volume is normalised (:func:`~napari_openseg.core.preprocess.normalize_intensity`), shrunk by the
model's ``downsample`` factor, and cut into overlapping ``roi_size`` windows. Each window's
embeddings are turned into the four raw score channels at once
(:func:`~napari_openseg.core.novelty.scores.score_channels`), so the ``"F D H W"`` embedding volume is never
held: only the class logits and four score channels are accumulated, blended with MONAI's Gaussian
importance map. The blended maps are resized to the input's shape, normalised inside the body mask and
fused (:func:`~napari_openseg.core.novelty.scores.maps_from_raw`) with the appearance map, which compares each
voxel's intensity with the voxels of the known class the segmentation head gives it.

A model trained by this version stores the intensity signature of its training volumes; a volume
whose intensities differ is matched to them or refused (:mod:`~napari_openseg.core.novelty.modality`).

When the bank has an unknown prototype and ``adapt_unknown`` > 0, a first, non-overlapping pass
collects a strided sample of the volume's embeddings inside the body (no labels) and adapts a copy
of the bank's unknown prototype on them before the scoring pass.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Generator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_openseg.core.device import resolve_device
from napari_openseg.core.novelty.modality import check_intensities
from napari_openseg.core.novelty.model import (
    NoveltyModel,
    body_mask,
    check_mask,
    check_seed,
    check_volume,
    labels_to_working,
    to_working,
)
from napari_openseg.core.novelty.scores import NoveltyMaps, maps_from_raw, score_channels
from napari_openseg.core.novelty.settings import TRAINED_OPTIONS, NoveltySettings
from napari_openseg.core.preprocess import normalize_intensity
from napari_openseg.core.progress import Progress, run_to_end
from napari_openseg.errors import OpenSegError

log = logging.getLogger(__name__)

#: Embeddings kept per window for adapting the unknown prototype: every STRIDE-th voxel per axis.
ADAPT_STRIDE = 4


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start positions of windows of ``roi`` covering ``size`` with the given overlap fraction."""
    if size <= roi:
        return [0]
    step = max(1, int(round(roi * (1.0 - overlap))))
    starts = list(range(0, size - roi, step))
    return starts + [size - roi]


def _windows(shape: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> list[tuple[slice, ...]]:
    axes = [window_starts(s, r, overlap) for s, r in zip(shape, roi)]
    return [tuple(slice(a, a + r) for a, r in zip(start, roi)) for start in itertools.product(*axes)]


def _pad_to(x: torch.Tensor, roi: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zero-pad ``"1 1 d h w"`` at the end so every side is at least the window's."""
    shape = tuple(x.shape[2:])
    pads = [max(0, r - s) for s, r in zip(shape, roi)]
    if any(pads):
        x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]))
    return x, shape


def _gaussian(roi: tuple[int, ...], device: torch.device) -> torch.Tensor:
    from monai.data.utils import compute_importance_map

    return compute_importance_map(roi, mode="gaussian", sigma_scale=0.125, device=device).float()


def _resize_to(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``"C d h w"`` -> ``"C *shape"`` (trilinear), one channel at a time to bound memory."""
    if tuple(x.shape[1:]) == tuple(shape):
        return x
    return torch.cat(
        [F.interpolate(c[None, None], size=shape, mode="trilinear", align_corners=False)[0] for c in x]
    )


def iter_novelty_map(
    image: np.ndarray,
    model: NoveltyModel | str | Path,
    *,
    settings: NoveltySettings | None = None,
    mask: np.ndarray | None = None,
    device: str | torch.device = "auto",
    keep_raw: bool = False,
    **options,
) -> Generator[Progress, None, NoveltyMaps]:
    """Novelty maps and known-class segmentation of a ``"D H W"`` volume.

    Parameters
    ----------
    model
        A :class:`NoveltyModel` or the path of a model file.
    settings
        How the map is made (:class:`~napari_openseg.core.novelty.settings.NoveltySettings`; default:
        the defaults); the fields it uses, below, may also be given as keywords (``**options``),
        which replace the settings' values.
    mask
        Foreground in which scores are normalised; default :func:`body_mask` of the image.
    use_unknown
        Use the bank's unknown prototype (when it has one) in the scores.
    adapt_unknown
        Adaptation steps of the unknown prototype on this volume's unlabelled embeddings (0: none).
    seed_free
        When the bank has no unknown prototype, start one from this volume's least familiar
        embeddings (:meth:`~napari_openseg.core.novelty.prototypes.PrototypeBank.init_unknown_from_outliers`)
        and adapt it ``adapt_unknown`` steps.
    weights, side, sigma
        Fusion weights of cosine, distance and appearance novelty; which departures from its class
        count as novel (``"brighter"``, ``"darker"``, ``"either"``; None: no appearance map); the
        smoothing of the intensities it compares (:func:`~napari_openseg.core.novelty.scores.maps_from_raw`).
    intensity
        ``"auto"``, ``"match"`` or ``"as-is"``: how a volume unlike the training volumes is treated
        (:func:`~napari_openseg.core.novelty.modality.check_intensities`).
    overlap
        Overlap of the sliding windows, a fraction of a window.

    Yields progress per window; returns :class:`~napari_openseg.core.novelty.scores.NoveltyMaps` whose
    ``segmentation`` holds the known-class label values.
    """
    settings = NoveltySettings.merge(settings, options, TRAINED_OPTIONS, "a trained model's map")
    use_unknown, adapt_unknown, overlap = settings.use_unknown, settings.adapt_unknown, settings.overlap
    image = check_volume(image)
    mask = check_mask(mask, image.shape)
    if isinstance(model, (str, Path)):
        model = NoveltyModel.load(model)
    torch_device = resolve_device(device)
    net = model.network.to(torch_device).eval()
    bank = model.bank.copy()
    if not bank.ready:
        raise OpenSegError(
            f"the model's prototypes were never set for classes {bank.missing_classes()}; "
            "train it longer or on volumes that contain these classes"
        )
    seed_free = settings.seed_free and use_unknown and bank.unknown is None
    use_unknown = use_unknown and (bank.unknown is not None or seed_free)
    normalized = normalize_intensity(image)
    mask = body_mask(normalized, normalized=True) if mask is None else mask
    signature = model.info.get("intensity_signature")
    normalized, notes = check_intensities(normalized, mask, signature, settings.intensity)

    factor = model.downsample
    volume, shape = _pad_to(to_working(normalized, factor).to(torch_device), model.config.roi_size)
    roi = model.config.roi_size
    windows = _windows(tuple(volume.shape[2:]), roi, overlap)
    adapt = use_unknown and (adapt_unknown > 0 or seed_free)
    adapt_windows = _windows(tuple(volume.shape[2:]), roi, 0.0) if adapt else []
    total = len(windows) + len(adapt_windows)
    done = 0
    yield Progress(0, total, "novelty map")

    if adapt:
        small_mask = torch.from_numpy(labels_to_working(mask.astype(np.uint8), factor).astype(bool))
        small_mask = F.pad(
            small_mask,
            [0, volume.shape[4] - shape[2], 0, volume.shape[3] - shape[1], 0, volume.shape[2] - shape[0]],
        )
        sample = []
        for window in adapt_windows:
            with torch.inference_mode():
                _, emb = net(volume[(slice(None), slice(None), *window)])
            s = ADAPT_STRIDE
            picked = small_mask[window][::s, ::s, ::s].to(torch_device)
            sample.append(emb[0, :, ::s, ::s, ::s].permute(1, 2, 3, 0)[picked].float().cpu())
            done += 1
            yield Progress(done, total, "adapting the unknown prototype")
        sample = torch.cat(sample)
        if seed_free:
            bank.init_unknown_from_outliers(sample)
        won = bank.adapt_unknown(sample, steps=adapt_unknown) if adapt_unknown > 0 else 0.0
        log.info("unknown prototype adapted on %d embeddings; it wins %.2f%% of them", len(sample), 100 * won)

    k = model.config.num_classes
    weight_map = _gaussian(roi, torch_device)
    accum = torch.zeros((k + 4, *volume.shape[2:]), device=torch_device)
    coverage = torch.zeros(volume.shape[2:], device=torch_device)
    for window in windows:
        with torch.inference_mode():
            logits, emb = net(volume[(slice(None), slice(None), *window)])
            flat = emb[0].flatten(1).T
            raw = score_channels(flat, bank).T.reshape(4, *roi)
            accum[(slice(None), *window)] += torch.cat([logits[0].float(), raw]) * weight_map
            coverage[window] += weight_map
        done += 1
        yield Progress(done, total, "novelty map")

    crop = (slice(None), *(slice(0, s) for s in shape))
    accum = (accum / coverage.clamp_min(1e-8))[crop].cpu()
    raw = _resize_to(accum[k:], image.shape).numpy()
    segmentation = _segmentation(accum[:k], image.shape, model.class_values)
    maps = maps_from_raw(
        raw,
        mask,
        k,
        use_unknown,
        settings.weights,
        segmentation,
        keep_raw,
        normalized,
        settings.side,
        settings.sigma,
        settings.threshold,
    )
    maps.notes = notes
    return maps


def _segmentation(logits: torch.Tensor, shape: tuple[int, ...], class_values: list[int]) -> np.ndarray:
    """Argmax over resized logits ``"K d h w"``, one class at a time, as label values."""
    from napari_openseg.core.support import label_dtype

    best = best_index = None
    for index, channel in enumerate(logits):
        value = _resize_to(channel[None], shape)[0]
        if best is None:
            best, best_index = value, torch.zeros(shape, dtype=torch.long)
        else:
            better = value > best
            best = torch.where(better, value, best)
            best_index[better] = index
    lookup = np.asarray(class_values, dtype=label_dtype(max(class_values)))
    return lookup[best_index.numpy()]


def novelty_map(image: np.ndarray, model: NoveltyModel | str | Path, **kwargs) -> NoveltyMaps:
    """Run :func:`iter_novelty_map` to the end."""
    return run_to_end(iter_novelty_map(image, model, **kwargs))


def unknown_seed_embeddings(
    image: np.ndarray, seed_mask: np.ndarray, model: NoveltyModel, device: str | torch.device = "auto"
) -> torch.Tensor:
    """Embeddings ``"N F"`` of the voxels of ``seed_mask`` (one painted instance of an unseen structure),
    from the windows that cover it."""
    image, seed_mask = check_seed(image, seed_mask)
    torch_device = resolve_device(device)
    net = model.network.to(torch_device).eval()
    factor, roi = model.downsample, model.config.roi_size
    volume, shape = _pad_to(to_working(normalize_intensity(image), factor).to(torch_device), roi)
    small = labels_to_working(seed_mask.astype(np.uint8), factor).astype(bool)
    if not small.any():  # a structure thinner than the working grid: keep its nearest voxels
        small = np.zeros(shape, bool)
        idx = np.argwhere(seed_mask) // factor
        small[tuple(idx.T)] = True
    padded = np.zeros(volume.shape[2:], bool)
    padded[: shape[0], : shape[1], : shape[2]] = small
    found = []
    taken = np.zeros_like(padded)
    for window in _windows(tuple(volume.shape[2:]), roi, 0.0):
        picked = padded[window] & ~taken[window]
        if not picked.any():
            continue
        with torch.inference_mode():
            _, emb = net(volume[(slice(None), slice(None), *window)])
        found.append(emb[0].permute(1, 2, 3, 0)[torch.from_numpy(picked).to(torch_device)].float().cpu())
        taken[window] |= picked
    return torch.cat(found)

"""Voxel-wise novelty from a prototype bank: cosine, Euclidean distance sum (EDS), fusion, threshold.

For a voxel with raw embedding ``x`` (and ``x^ = x / |x|``), known prototypes ``p_c`` and, if the bank
has one, the unknown prototype ``p_u`` (all unit length):

* **cosine novelty** ``n_cos = 1 - max_c x^.p_c``: low similarity to the closest known class
  (MedOpenSeg eq. 7). With an unknown prototype, ``n_cos = x^.p_u - max_c x^.p_c``: how much closer
  the voxel points to the unknown than to the best known class.
* **distance novelty** ``n_eds = sum_c |s x - p_c|^2`` (eq. 8), on the *raw* embedding scaled by the
  bank's ``embedding_scale`` ``s``. On unit vectors the sum would reduce to ``2K - 2 x^.sum_c p_c``, an
  alignment with the prototypes' sum only (constant when the prototypes sum to zero); on raw
  embeddings it also grows with ``|x|``, which the prototype-consistency loss pulls towards 1 for
  known classes, so it carries what the cosine cannot see. With an unknown prototype,
  ``n_eds = sum_c |s x - p_c|^2 - K |s x - p_u|^2``.
* Each map is normalised robustly inside a foreground mask: its 1st and 99th percentiles there map
  to 0 and 1, values are clipped to [0, 1], and voxels outside the mask are 0. Percentiles instead of
  min/max keep a few extreme voxels from squashing the rest of the map.
* **appearance novelty** (not in the paper): how unlike *its own* known class a voxel looks. Each voxel
  belongs to the known class the model gives it; its intensity, smoothed with a Gaussian of ``sigma``
  voxels, is compared with the intensities of the voxels of the same class in this volume inside
  the mask, as a robust z-score ``(v - median) / (1.4826 MAD)``. ``side`` says which departures count:
  ``"brighter"`` (FLAIR and T2 lesions, contrast uptake), ``"darker"`` or ``"either"``. Embeddings
  trained or prompted on healthy classes often place a lesion next to the class it sits in (a
  tumour inside the brain is "brain" to them); its intensity still differs from that class's.
* **Fused** novelty is the weighted mean of the normalised maps. They lie on the same [0, 1] scale, so
  the mean is a soft "low cosine and high EDS" (the paper's dual criterion): a voxel must look novel
  to every score to reach the top, while a voxel that only one score flags still rises, which keeps
  the sensitivity that a hard AND (or a product, which one near-zero score kills) would lose.
* The **novel region** is the fused map above a level (default
  :data:`~napari_openseg.core.novelty.settings.NOVEL_THRESHOLD`); as every map is normalised inside
  the mask, the level is relative to the volume's own distribution. :func:`otsu_threshold` stays for
  other uses (the body mask): on fused maps it flagged half a head (docs/novelty.md).

Every function works on chunks of voxels so that memory stays bounded (``"N K"`` similarities are
never built for all voxels at once).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from napari_openseg.core.engine_settings import check_choice
from napari_openseg.core.novelty.prototypes import PrototypeBank
from napari_openseg.core.novelty.settings import (  # the maps' defaults and choices live there
    APPEARANCE_SIDES,
    APPEARANCE_SIGMA,
    DEFAULT_SIDE,
    DEFAULT_WEIGHTS,
    NOVEL_THRESHOLD,
    check_fusion_weights,
    check_weights,
)
from napari_openseg.errors import OpenSegError

#: Voxels per chunk when scoring embeddings (bounds the ``"N K"`` similarity matrices).
SCORE_CHUNK = 1 << 18
#: Raw score channels, in the order :func:`score_channels` stacks them.
CHANNELS = ("cos_known", "eds_known", "cos_unknown", "dist_unknown")
#: Voxels per class used for its median and spread (a strided sample of larger classes).
APPEARANCE_SAMPLE = 1_000_000


def score_channels(embeddings: torch.Tensor, bank: PrototypeBank, chunk: int = SCORE_CHUNK) -> torch.Tensor:
    """Raw per-voxel scores ``"N 4"`` from ``embeddings "N F"`` (columns as :data:`CHANNELS`).

    The unknown columns are 0 when the bank has no unknown prototype.
    """
    if embeddings.dim() != 2 or embeddings.shape[1] != bank.dim:
        raise OpenSegError(f'embeddings must be "N F" with F={bank.dim}, got {tuple(embeddings.shape)}')
    device = embeddings.device
    protos = bank.prototypes.to(device=device, dtype=torch.float32)
    unknown = bank.unknown.to(device=device, dtype=torch.float32) if bank.unknown is not None else None
    out = torch.zeros(embeddings.shape[0], len(CHANNELS), device=device)
    proto_sq = (protos * protos).sum(dim=1)  # 1 for observed prototypes, 0 for unobserved ones
    for start in range(0, embeddings.shape[0], chunk):
        x = embeddings[start : start + chunk].float() * bank.embedding_scale
        x_sq = (x * x).sum(dim=1, keepdim=True)
        direction = F.normalize(x, dim=1)
        sims = direction @ protos.T
        out[start : start + chunk, 0] = sims.max(dim=1).values
        # sum_c |x - p_c|^2 = K |x|^2 - 2 x . sum_c p_c + sum_c |p_c|^2, without the "N K" distances
        out[start : start + chunk, 1] = (
            protos.shape[0] * x_sq[:, 0] - 2.0 * (x @ protos.sum(dim=0)) + proto_sq.sum()
        )
        if unknown is not None:
            out[start : start + chunk, 2] = direction @ unknown
            out[start : start + chunk, 3] = x_sq[:, 0] - 2.0 * (x @ unknown) + (unknown * unknown).sum()
    return out


def class_similarities(
    embeddings: torch.Tensor, bank: PrototypeBank, chunk: int = SCORE_CHUNK
) -> torch.Tensor:
    """Cosine similarity ``"N K"`` of each of ``embeddings "N F"`` to each known prototype."""
    protos = bank.prototypes.to(device=embeddings.device, dtype=torch.float32)
    parts = [
        F.normalize(embeddings[s : s + chunk].float(), dim=1) @ protos.T
        for s in range(0, embeddings.shape[0], chunk)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, protos.shape[0], device=embeddings.device)


def nearest_class(embeddings: torch.Tensor, bank: PrototypeBank, chunk: int = SCORE_CHUNK) -> torch.Tensor:
    """Index of the most similar known prototype (cosine) for each of ``embeddings "N F"``."""
    return class_similarities(embeddings, bank, chunk).argmax(dim=1)


def novelty_components(
    raw: np.ndarray, num_classes: int, use_unknown: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine and distance novelty (higher = more novel) from raw channels ``"4 *shape"``."""
    raw = np.asarray(raw, dtype=np.float32)
    if raw.shape[0] != len(CHANNELS):
        raise OpenSegError(f'raw scores must be "{len(CHANNELS)} *shape", got {raw.shape}')
    cosine = 1.0 - raw[0]
    distance = raw[1].copy()
    if use_unknown:
        cosine = raw[2] - raw[0]
        distance = raw[1] - num_classes * raw[3]
    return cosine.astype(np.float32), distance.astype(np.float32)


def robust_normalize(
    values: np.ndarray, mask: np.ndarray | None = None, low: float = 1.0, high: float = 99.0
) -> np.ndarray:
    """Map the ``low``/``high`` percentiles inside ``mask`` to 0/1, clip, and zero the outside."""
    values = np.asarray(values, dtype=np.float32)
    inside = np.ones(values.shape, bool) if mask is None else np.asarray(mask, bool)
    if inside.shape != values.shape:
        raise OpenSegError(f"mask of shape {inside.shape} does not match scores of shape {values.shape}")
    sample = values[inside]
    out = np.zeros(values.shape, np.float32)
    if sample.size == 0:
        return out
    if sample.size > 4_000_000:  # percentiles of a strided subsample are as good and much faster
        sample = sample[:: sample.size // 2_000_000]
    lo, hi = np.percentile(sample, [low, high])
    scale = 1.0 / (hi - lo) if hi > lo else 0.0
    np.subtract(values, lo, out=out)
    out *= scale
    np.clip(out, 0.0, 1.0, out=out)
    out[~inside] = 0.0
    return out


def fuse(maps, weights) -> np.ndarray:
    """Fused novelty: weighted mean of *normalised* maps (see the module docstring).

    ``maps`` and ``weights`` pair up; a map that is None is left out with its weight.
    """
    if len(maps) != len(weights):
        raise OpenSegError(f"{len(maps)} maps but {len(weights)} fusion weights")
    pairs = [(np.asarray(m, np.float32), w) for m, w in zip(maps, check_weights(weights)) if m is not None]
    total = sum(w for _, w in pairs)
    if not pairs or total <= 0:
        raise OpenSegError("the fusion weights give every available map a weight of 0")
    fused = np.zeros(pairs[0][0].shape, np.float32)
    for values, weight in pairs:
        fused += np.float32(weight / total) * values
    return fused


def appearance_novelty(
    image: np.ndarray,
    classes: np.ndarray,
    mask: np.ndarray,
    side: str = DEFAULT_SIDE,
    sigma: float = APPEARANCE_SIGMA,
) -> np.ndarray:
    """Robust z-score of each voxel's smoothed intensity within its own class, inside ``mask``.

    ``image``: intensities (normalised); ``classes``: the known class of every voxel (label values or
    indices); ``side``: ``"brighter"``, ``"darker"`` or ``"either"`` (absolute z). 0 outside the mask
    and in classes with fewer than 10 voxels in it. Not normalised to [0, 1].
    """
    from scipy import ndimage

    check_choice("appearance side", side, APPEARANCE_SIDES)
    image = np.asarray(image, np.float32)
    classes, mask = np.asarray(classes), np.asarray(mask, bool)
    if not (image.shape == classes.shape == mask.shape):
        raise OpenSegError(f"image {image.shape}, classes {classes.shape} and mask {mask.shape} differ")
    smooth = ndimage.gaussian_filter(image, sigma) if sigma > 0 else image
    out = np.zeros(image.shape, np.float32)
    inside = classes[mask]
    values = smooth[mask]
    z = np.zeros(values.shape, np.float32)
    for value in np.unique(inside):
        members = inside == value
        sample = values[members]
        if sample.size < 10:
            continue
        if sample.size > APPEARANCE_SAMPLE:
            sample = sample[:: sample.size // APPEARANCE_SAMPLE]
        median = np.median(sample)
        spread = 1.4826 * np.median(np.abs(sample - median))
        spread = max(float(spread), 1e-3 * max(1.0, float(np.abs(sample).max())))
        z[members] = (values[members] - median) / spread
    if side == "darker":
        z = -z
    elif side == "either":
        z = np.abs(z)
    out[mask] = z
    return out


def otsu_threshold(values: np.ndarray, mask: np.ndarray | None = None, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` inside ``mask`` (the split maximising between-class variance)."""
    sample = np.asarray(values, np.float32)
    if mask is not None:
        sample = sample[np.asarray(mask, bool)]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        raise OpenSegError("no voxels inside the mask: nothing to threshold")
    lo, hi = float(sample.min()), float(sample.max())
    if hi <= lo:
        return hi
    hist, edges = np.histogram(sample, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(hist * centres)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def auroc(score: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` separating ``positive`` from ``negative`` voxels.

    Voxels in neither mask are ignored. Ties count one half (Mann-Whitney U statistic).
    """
    score = np.asarray(score, np.float64)
    positive, negative = np.asarray(positive, bool), np.asarray(negative, bool)
    if not (score.shape == positive.shape == negative.shape):
        raise OpenSegError(
            f"score {score.shape}, positive {positive.shape} and negative {negative.shape} differ"
        )
    if (positive & negative).any():
        raise OpenSegError("a voxel cannot be both novel and known")
    if not np.isfinite(score[positive | negative]).all():  # NaN would rank above every value
        raise OpenSegError("AUROC needs finite scores; the map holds NaN or infinite values in the masks")
    pos, neg = score[positive], score[negative]
    if pos.size == 0 or neg.size == 0:
        raise OpenSegError("AUROC needs at least one novel and one known voxel")
    values = np.concatenate([pos, neg])
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(values.size, np.float64)
    # average rank of each run of equal values
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], values.size]
    run_rank = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(run_rank, ends - starts)
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


@dataclass
class NoveltyMaps:
    """Novelty of one volume; every map has the image's shape.

    ``fused``, ``cosine``, ``distance``, ``appearance``: normalised novelty in [0, 1] (0 outside
    ``mask``; ``appearance`` None when it was not computed); ``threshold``: the novel region's level
    of ``fused`` (:data:`~napari_openseg.core.novelty.settings.NOVEL_THRESHOLD` unless chosen);
    ``segmentation``: known-class labels (label values) when the model gives them; ``raw``: the raw
    channels ``"4 *shape"`` if kept; ``notes``: what was done to the input that a user should know
    (for example intensities matched to a model's training volumes).
    """

    fused: np.ndarray
    cosine: np.ndarray
    distance: np.ndarray
    mask: np.ndarray
    threshold: float
    segmentation: np.ndarray | None = None
    used_unknown: bool = False
    raw: np.ndarray | None = None
    appearance: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    def novel_regions(self, threshold: float | None = None) -> np.ndarray:
        """Voxels of the mask whose fused novelty exceeds ``threshold`` (default: the maps' own)."""
        level = self.threshold if threshold is None else float(threshold)
        return (self.fused > level) & self.mask


def maps_from_raw(
    raw: np.ndarray,
    mask: np.ndarray,
    num_classes: int,
    use_unknown: bool = True,
    weights=DEFAULT_WEIGHTS,
    segmentation: np.ndarray | None = None,
    keep_raw: bool = False,
    image: np.ndarray | None = None,
    side: str | None = DEFAULT_SIDE,
    sigma: float = APPEARANCE_SIGMA,
    threshold: float = NOVEL_THRESHOLD,
) -> NoveltyMaps:
    """Normalise, fuse and threshold raw score channels ``"4 *shape"`` inside ``mask``.

    ``weights``: of cosine, distance and appearance novelty
    (:data:`~napari_openseg.core.novelty.settings.SCORES`). The appearance map is computed when
    ``image`` (the normalised intensities) and ``segmentation`` are given and ``side`` is not None;
    ``threshold``: the novel region's level of fused novelty.
    """
    mask = np.asarray(mask, bool)
    if not mask.any():
        raise OpenSegError("the foreground mask is empty: there is no body to score")
    weights = check_fusion_weights(weights)
    cosine, distance = novelty_components(raw, num_classes, use_unknown)
    cosine = robust_normalize(cosine, mask)
    distance = robust_normalize(distance, mask)
    appearance = None
    if image is not None and segmentation is not None and side is not None:
        appearance = robust_normalize(appearance_novelty(image, segmentation, mask, side, sigma), mask)
    fused = fuse([cosine, distance, appearance], weights)
    return NoveltyMaps(
        fused=fused,
        cosine=cosine,
        distance=distance,
        mask=mask,
        threshold=threshold,
        segmentation=segmentation,
        used_unknown=use_unknown,
        raw=raw if keep_raw else None,
        appearance=appearance,
    )

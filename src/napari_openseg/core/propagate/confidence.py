"""How sure the in-context network is of one slice's prediction, without an IoU head.

Three measures, each in [0, 1], from what the network has:

* ``sharpness``: the soft Dice between the mean probability ``p`` of the slice and its own
  thresholded mask: 1 when every pixel is clearly in or out, lower when many pixels sit near 0.5
  (where nothing is drawn, the same for the background, ``1 - p`` against an all-ones mask);
* ``agreement``: the mean pairwise Dice between the masks predicted from the K support sets drawn
  from the bank (1 with one draw): support sets that disagree mean an uncertain slice (propagation
  makes one of them the painted slice alone, so drift away from the painted object lowers it);
* ``consistency``: the prediction is used as the only support to segment the most similar painted
  slice back, and the result is compared with what was painted there (Dice). A mask that does not
  show the object faithfully cannot give the painted mask back; this catches confident mistakes that
  the first two miss (a sharp, agreed, but wrong mask).

The confidence is the product of the measures in :data:`CONFIDENCE_TERMS`. Empty predictions have
nothing to check: their consistency is 1 and their confidence comes from the other terms.
"""

from __future__ import annotations

import numpy as np
import torch

from napari_openseg.core.engine_settings import DEFAULT_THRESHOLD

#: The measures whose product is the confidence (see docs/performance.md for how each tracks Dice).
CONFIDENCE_TERMS: tuple[str, ...] = ("sharpness", "agreement", "consistency")


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    """Dice of two binary masks of one shape; 1.0 when both are empty."""
    total = float(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * float((a * b).sum()) / total


def draw_measures(probs: torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """``sharpness`` and ``agreement`` of one slice's predictions ``probs "K g g"`` (K draws)."""
    if probs.dim() != 3:
        raise ValueError(f'probs must be "K g g", got {tuple(probs.shape)}')
    probs = probs.float()
    mean = probs.mean(dim=0)
    hard = (mean > threshold).float()
    if not hard.any():  # nothing drawn: score how clearly the pixels are out (the background's soft Dice)
        background = 1.0 - mean
        sharpness = float(2 * background.sum() / (background.sum() + background.numel()))
    else:
        sharpness = float(2 * (mean * hard).sum() / (mean.sum() + hard.sum()))
    masks = (probs > threshold).float().flatten(1)
    k = masks.shape[0]
    if k == 1:
        return {"sharpness": sharpness, "agreement": 1.0}
    overlap = masks @ masks.T
    sizes = masks.sum(dim=1)
    sums = sizes[:, None] + sizes[None, :]
    dice = torch.where(sums > 0, 2 * overlap / sums.clamp(min=1), torch.ones_like(sums))
    agreement = float((dice.sum() - dice.diagonal().sum()) / (k * (k - 1)))
    return {"sharpness": sharpness, "agreement": agreement}


def consistency(
    net,
    image: torch.Tensor,
    mask: torch.Tensor,
    reference_image: torch.Tensor,
    reference_mask: torch.Tensor,
    threshold: float = DEFAULT_THRESHOLD,
) -> float:
    """Dice with which ``(image, mask)`` (``"g g"``), as the only support, segments
    ``reference_image`` back into ``reference_mask``; 1.0 for an empty ``mask``."""
    from napari_openseg.model.fast import fast_forward

    if not mask.any():
        return 1.0
    with torch.inference_mode():
        query = reference_image[None, None].contiguous(memory_format=torch.channels_last)
        logits = fast_forward(net, query, image[None, None, None], mask[None, None, None])
    back = (torch.sigmoid(logits.float())[0, 0] > threshold).float()
    return _dice(back, reference_mask.float())


def combine(measures: dict[str, float]) -> float:
    """The confidence: the product of the :data:`CONFIDENCE_TERMS` present in ``measures``."""
    return float(np.prod([measures[term] for term in CONFIDENCE_TERMS if term in measures]))

"""Losses of MedOpenSeg training: Dice-cross-entropy with ignored voxels, and the prototype-guided loss.

Class targets are ``"B D H W"`` class indices; ``-1`` marks voxels that take no part in any loss
(structures held out as unseen, or labels the user did not want to train on).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -1


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice (MONAI ``DiceLoss``, batch-wise) plus cross-entropy over the voxels that count.

    ``logits "B K D H W"``, ``target "B D H W"`` (class indices, ``-1`` ignored).
    """
    from monai.losses import DiceLoss

    if logits.dim() != 5 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f'expected logits "B K D H W" and target "B D H W", got {tuple(logits.shape)} '
            f"and {tuple(target.shape)}"
        )
    valid = target != IGNORE
    if not valid.any():
        return logits.sum() * 0.0
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE)
    keep = valid.unsqueeze(1).to(logits.dtype)
    probs = torch.softmax(logits, dim=1) * keep
    onehot = F.one_hot(target.clamp_min(0), logits.shape[1]).permute(0, 4, 1, 2, 3).to(logits.dtype) * keep
    dice = DiceLoss(include_background=True, batch=True)(probs, onehot)
    return dice + ce


def prototype_guided_loss(
    embeddings: torch.Tensor, target: torch.Tensor, prototypes: torch.Tensor, lambda_pc: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MedOpenSeg's PGR loss ``L_CA + lambda_pc * L_PC`` (eqs. 2-5); returns ``(total, ca, pc)``.

    ``embeddings "B F D H W"`` (raw, as the embedding head gives them), ``target "B D H W"``,
    ``prototypes "K F"`` (unit length, no gradient). ``L_CA`` is the cross-entropy of a softmax over
    negative squared distances to the prototypes, averaged over voxels; ``L_PC`` the squared distance to
    the own prototype, averaged within each class present and then over those classes.
    """
    if embeddings.dim() != 5 or prototypes.dim() != 2 or embeddings.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f'expected embeddings "B F D H W" and prototypes "K F", got '
            f"{tuple(embeddings.shape)} and {tuple(prototypes.shape)}"
        )
    valid = target != IGNORE
    if not valid.any():
        zero = embeddings.sum() * 0.0
        return zero, zero, zero
    x = embeddings.permute(0, 2, 3, 4, 1)[valid]
    y = target[valid]
    p = prototypes.detach().to(x.dtype)
    squared = (x * x).sum(dim=1, keepdim=True) - 2.0 * x @ p.T + (p * p).sum(dim=1)
    ca = F.cross_entropy(-squared, y)
    own = squared.gather(1, y[:, None])[:, 0]
    present = torch.unique(y)
    per_class = torch.zeros(prototypes.shape[0], device=x.device, dtype=x.dtype).index_add_(0, y, own)
    counts = torch.bincount(y, minlength=prototypes.shape[0]).to(x.dtype)
    pc = (per_class[present] / counts[present]).mean()
    return ca + lambda_pc * pc, ca, pc

"""Combining an ensemble: the K predictions of one task from K support sets drawn for it.

Members that agree on how large an object is but not exactly on where its edges lie have a mean
probability that is low along those edges, so the thresholded mean is smaller than any member: at
S = 1 the plain mean of five members lost to a single member (docs/model-card.md). The combination
used here is *area-matched*: per image, the mean probability ranks the pixels (where the object is)
and the members' mean foreground area says how many of them are foreground (how large it is). The
mean is remapped monotonically so that the usual threshold gives exactly that mask: pixel order is
kept, so probability layers and task argmax still read as before.
"""

from __future__ import annotations

import torch

from napari_openseg.core.engine_settings import DEFAULT_THRESHOLD

#: How ensembles are combined: ``"area-matched"`` (default) or ``"mean"`` (the plain mean).
RULES = ("area-matched", "mean")


def area_matched(
    mean: torch.Tensor, area: torch.Tensor, threshold: float = DEFAULT_THRESHOLD
) -> torch.Tensor:
    """Remap ``mean "... H W"`` so that thresholding at ``threshold`` keeps, per image, the
    ``area "..."`` (rounded) most probable pixels; an area of 0 leaves every pixel below it."""
    flat = mean.float().flatten(-2)
    count = area.round().long().clamp(0, flat.shape[-1])
    ranked = flat.sort(dim=-1, descending=True).values
    nth = ranked.gather(-1, (count - 1).clamp(min=0)[..., None])
    cut = torch.where(count[..., None] > 0, nth, ranked[..., :1] + 1e-6).clamp(1e-6, 1 - 1e-6)
    below = threshold * flat / cut
    above = threshold + (1 - threshold) * (flat - cut) / (1 - cut)
    remapped = torch.where(flat >= cut, above, below).clamp(0, 1)
    return remapped.reshape(mean.shape).to(mean.dtype)


class EnsembleMean:
    """Adds up members one at a time (``add``) and combines them (``result``) by ``rule``.

    Only the running sum and each image's running foreground area are kept, not the members.
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, rule: str = "area-matched"):
        if rule not in RULES:
            raise ValueError(f"ensemble rule must be one of {', '.join(RULES)}, got {rule!r}")
        self.threshold, self.rule = float(threshold), rule
        self.total: torch.Tensor | None = None
        self.area: torch.Tensor | None = None
        self.members = 0

    def add(self, probabilities: torch.Tensor) -> None:
        """One member's probabilities ``"... H W"`` (the same shape every time)."""
        probabilities = probabilities.float()
        area = (probabilities >= self.threshold).sum(dim=(-2, -1)).float()
        if self.total is None:
            self.total, self.area = probabilities.clone(), area
        else:
            self.total += probabilities
            self.area += area
        self.members += 1

    def result(self) -> torch.Tensor:
        if self.total is None:
            raise ValueError("an ensemble needs at least one member")
        mean = self.total / self.members
        if self.members == 1 or self.rule == "mean":
            return mean
        return area_matched(mean, self.area / self.members, self.threshold)


def combine_members(
    members: torch.Tensor, threshold: float = DEFAULT_THRESHOLD, rule: str = "area-matched"
) -> torch.Tensor:
    """Members stacked as ``"K ... H W"`` -> their combination ``"... H W"`` (see :class:`EnsembleMean`)."""
    ensemble = EnsembleMean(threshold, rule)
    for member in members:
        ensemble.add(member)
    return ensemble.result()

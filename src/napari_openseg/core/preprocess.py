"""Intensity normalisation and the mapping between any slice size and the model's square grid.

Aspect ratio: by default (``aspect="pad"``) a slice is zero-padded, centred, to a square and then
resized, so shapes are never distorted; the inverse resizes back to the square and crops the padding
off. ``aspect="stretch"`` resizes each axis independently instead (UniverSeg's MegaMedical
convention). Images are resized bilinearly with antialiasing; masks the same way and then
thresholded at 0.5, so a structure thinner than about one grid pixel can vanish on a small grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from napari_openseg.core.engine_settings import ASPECTS, DEFAULT_ASPECT, check_choice
from napari_openseg.errors import OpenSegError

Aspect = Literal["pad", "stretch"]
RGB_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def is_rgb(image: np.ndarray, rgb: bool | None = None) -> bool:
    """Whether ``image`` has a trailing RGB(A) axis: ``rgb=None`` says so for a 2D image with a last
    axis of 3 or 4; ``True`` for any number of leading axes (3 or 4 channels needed); ``False`` never."""
    image = np.asarray(image)
    if rgb is None:
        return image.ndim == 3 and image.shape[-1] in (3, 4) and min(image.shape[:2]) > 4
    if rgb and image.shape[-1] not in (3, 4):
        raise OpenSegError(
            f"an RGB image needs 3 or 4 channels on its last axis, got shape {image.shape} "
            "(array order, channels last)"
        )
    return bool(rgb)


def to_single_channel(image: np.ndarray, rgb: bool | None = None) -> np.ndarray:
    """Collapse a trailing RGB(A) axis to luminance (see :func:`is_rgb` for ``rgb``)."""
    image = np.asarray(image)
    if not is_rgb(image, rgb):
        return image
    return image[..., :3].astype(np.float32) @ RGB_WEIGHTS


def colour_channels(image: np.ndarray, rgb: bool | None = None) -> np.ndarray | None:
    """The colour channels ``"... 3"`` of an RGB(A) image, normalised together to [0, 1] (so that
    their ratios stay), or ``None`` for a single-channel image (see :func:`is_rgb` for ``rgb``)."""
    image = np.asarray(image)
    if not is_rgb(image, rgb):
        return None
    return normalize_intensity(image[..., :3])


def normalize_intensity(array: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Map intensities of any dtype into ``[0, 1]`` (float32) by robust percentiles of the whole array.

    NaN and -inf become 0, +inf becomes 1. One normalisation per array (not per slice) keeps the
    slices of a volume comparable with each other.
    """
    values = np.asarray(array)
    if values.dtype == bool:
        return values.astype(np.float32)
    values = values.astype(np.float32, copy=False)
    finite = np.isfinite(values)
    all_finite = bool(finite.all())
    if not all_finite and not finite.any():
        return np.zeros(values.shape, np.float32)
    sample = values.ravel() if all_finite else values[finite]
    if sample.size > 2_000_000:  # percentiles of a strided subsample are as good and much faster
        sample = sample[:: sample.size // 1_000_000]
    lo, hi = np.percentile(sample, [low, high])
    if hi <= lo:
        lo, hi = float(sample.min()), float(sample.max())
    scale = 1.0 / (hi - lo) if hi > lo else 0.0
    # in float32 and in place: float64 temporaries cost seven copies of a large volume
    out = np.subtract(values, np.float32(lo), dtype=np.float32)
    out *= np.float32(scale)
    if not all_finite:
        bad = ~finite
        out[bad] = np.where(values[bad] > 0, 1.0, 0.0)
    np.clip(out, 0.0, 1.0, out=out)
    return out


@dataclass(frozen=True)
class GridMapping:
    """How slices of ``shape`` (H, W) were placed on a ``grid`` x ``grid`` model input."""

    shape: tuple[int, int]
    grid: int
    aspect: Aspect = DEFAULT_ASPECT

    @property
    def padded_shape(self) -> tuple[int, int]:
        if self.aspect == "stretch":
            return self.shape
        side = max(self.shape)
        return side, side

    @property
    def offsets(self) -> tuple[int, int]:
        padded = self.padded_shape
        return (padded[0] - self.shape[0]) // 2, (padded[1] - self.shape[1]) // 2


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``"N C H W"``; antialiased when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    dtype = x.dtype
    y = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=shrinking)
    return y.to(dtype)


def to_grid(
    slices: torch.Tensor, grid: int, aspect: Aspect = DEFAULT_ASPECT
) -> tuple[torch.Tensor, GridMapping]:
    """``"N H W"`` float slices -> ``"N 1 grid grid"`` and the mapping that undoes it.

    With ``"pad"`` the long axis is resized first, and the short one is then padded to the long one's
    length and resized: the numbers of padding to a square and resizing it (bilinear resizing is
    separable), without the square at full resolution (a 4 x 20000 slice made a 20000 x 20000 one).
    """
    if slices.dim() != 3:
        raise ValueError(f'slices must be "N H W", got {tuple(slices.shape)}')
    check_choice("aspect", aspect, ASPECTS)
    mapping = GridMapping((int(slices.shape[1]), int(slices.shape[2])), int(grid), aspect)
    x = slices.unsqueeze(1)
    (h, w), (side, _), (oy, ox) = mapping.shape, mapping.padded_shape, mapping.offsets
    if aspect == "stretch" or h == w:
        return _resize(x, (grid, grid)), mapping
    if h < w:
        x = F.pad(_resize(x, (h, grid)), (0, 0, oy, side - h - oy))
    else:
        x = F.pad(_resize(x, (grid, w)), (ox, side - w - ox, 0, 0))
    return _resize(x, (grid, grid)), mapping


def masks_to_grid(masks: torch.Tensor, grid: int, aspect: Aspect = DEFAULT_ASPECT) -> torch.Tensor:
    """``"N H W"`` binary masks -> ``"N 1 grid grid"`` binary float masks."""
    soft, _ = to_grid(masks.float(), grid, aspect)
    return (soft > 0.5).to(soft.dtype)


def from_grid(values: torch.Tensor, mapping: GridMapping) -> torch.Tensor:
    """Exact inverse placement of :func:`to_grid`: ``"N C grid grid"`` -> ``"N C H W"``.

    The long axis is resized whole; along the short one only the rows (or columns) inside the image
    are computed, so no square of the long side is made."""
    (h, w), (side, _), (oy, ox) = mapping.shape, mapping.padded_shape, mapping.offsets
    if mapping.aspect == "stretch" or h == w:
        return _resize(values, mapping.shape)
    grid = int(values.shape[-1])
    if h < w:
        weights = _axis_weights(grid, side, values.device)[:, oy : oy + h]  # "g h"
        return torch.einsum("ncgw,gh->nchw", _resize(values, (grid, w)).float(), weights).to(values.dtype)
    weights = _axis_weights(grid, side, values.device)[:, ox : ox + w]  # "g w"
    return torch.einsum("nchg,gw->nchw", _resize(values, (h, grid)).float(), weights).to(values.dtype)


def _axis_weights(size: int, new_size: int, device: torch.device) -> torch.Tensor:
    """``"size new_size"``: row ``i`` is what :func:`_resize` makes of a unit impulse at position ``i``
    when it resizes one axis from ``size`` to ``new_size`` (it is linear: these weights are its matrix)."""
    impulses = torch.eye(size, device=device).reshape(size, 1, 1, size)
    return _resize(impulses, (1, new_size))[:, 0, 0]

"""Augmentation of training episodes on the model grid (torch, batched, seeded by a generator).

Two kinds, as in UniverSeg (Butoi et al. 2023, section 3.2):

* **in-task** (:func:`augment_entries`): each image/mask pair (the query and every support entry)
  gets its own random affine + elastic warp, flips, gamma, contrast, blur and noise;
* **task-level** (:func:`augment_task`): one transformation drawn per task and applied to the query
  and all its support entries alike, which makes a new task: flips and 90-degree rotations,
  intensity inversion, the label's boundary instead of the label, Sobel-filtered images, ...

Images are ``"N 1 g g"`` in [0, 1], masks ``"N 1 g g"`` in {0, 1}; outputs keep both properties.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from napari_openseg.training.incontext.synth import gaussian_blur, smooth_field


@dataclass(frozen=True)
class InTaskAugment:
    """Probabilities and ranges of the per-entry augmentations."""

    p_affine: float = 0.5
    rotate_degrees: float = 20.0
    scale: tuple[float, float] = (0.85, 1.15)
    translate: float = 0.08
    shear: float = 0.1
    p_elastic: float = 0.3
    elastic_pixels: float = 2.5
    p_flip: float = 0.1
    p_gamma: float = 0.4
    log_gamma: float = 0.4
    p_contrast: float = 0.3
    p_blur: float = 0.15
    p_noise: float = 0.3
    noise: float = 0.05


@dataclass(frozen=True)
class TaskAugment:
    """Probabilities of the task-level augmentations."""

    p_flip: float = 0.5
    p_rot90: float = 0.3
    p_invert: float = 0.2
    p_boundary: float = 0.1
    p_sobel: float = 0.1
    p_blur: float = 0.05


def check_pair(images: torch.Tensor, masks: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``images`` and ``masks`` are both ``"N 1 g g"`` of one shape."""
    if images.dim() != 4 or images.shape[1] != 1 or masks.shape != images.shape:
        raise ValueError(
            f'images and masks must both be "N 1 g g", got {tuple(images.shape)} and {tuple(masks.shape)}'
        )


def _coin(gen: torch.Generator, p: float, n: int = 1) -> torch.Tensor:
    return torch.rand(n, generator=gen) < p


def _uniform(gen: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def _affine_matrices(gen: torch.Generator, n: int, cfg: InTaskAugment) -> torch.Tensor:
    """``"N 2 3"`` random affine maps in normalised coordinates (identity where not drawn)."""
    angle = _uniform(gen, n, -1, 1) * math.radians(cfg.rotate_degrees)
    scale = torch.exp(_uniform(gen, n, math.log(cfg.scale[0]), math.log(cfg.scale[1])))
    shear = _uniform(gen, n, -cfg.shear, cfg.shear)
    shift = _uniform(gen, 2 * n, -cfg.translate, cfg.translate).view(n, 2) * 2
    cos, sin = torch.cos(angle), torch.sin(angle)
    linear = torch.stack([torch.stack([cos, -sin + shear], -1), torch.stack([sin, cos], -1)], -2)
    linear = linear / scale.view(n, 1, 1)
    matrices = torch.cat([linear, shift.unsqueeze(-1)], dim=-1)
    keep = ~_coin(gen, cfg.p_affine, n)
    matrices[keep] = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    return matrices


def spatial(images: torch.Tensor, masks: torch.Tensor, gen: torch.Generator, cfg: InTaskAugment):
    """Per-entry affine + elastic warp and flips, one resampling for both."""
    n, _, size, _ = images.shape
    grid = F.affine_grid(_affine_matrices(gen, n, cfg), [n, 1, size, size], align_corners=False)
    elastic = smooth_field(gen, 2, 6, size, n) * (cfg.elastic_pixels * 2.0 / size)
    elastic = elastic * _coin(gen, cfg.p_elastic, n).view(n, 1, 1, 1)
    grid = grid + elastic.permute(0, 2, 3, 1)
    flip_x = _coin(gen, cfg.p_flip, n).view(n, 1, 1)
    flip_y = _coin(gen, cfg.p_flip, n).view(n, 1, 1)
    grid = torch.stack(
        [torch.where(flip_x, -grid[..., 0], grid[..., 0]), torch.where(flip_y, -grid[..., 1], grid[..., 1])],
        dim=-1,
    )
    warped = F.grid_sample(
        torch.cat([images, masks], 1), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return warped[:, :1], (warped[:, 1:] > 0.5).to(masks.dtype)


def intensity(images: torch.Tensor, gen: torch.Generator, cfg: InTaskAugment) -> torch.Tensor:
    """Per-entry gamma, contrast, blur and noise; the result is clipped to [0, 1]."""
    n = images.shape[0]
    gamma = torch.exp(_uniform(gen, n, -cfg.log_gamma, cfg.log_gamma))
    gamma = torch.where(_coin(gen, cfg.p_gamma, n), gamma, torch.ones(n))
    images = images.clamp(0, 1) ** gamma.view(n, 1, 1, 1)
    contrast = torch.where(_coin(gen, cfg.p_contrast, n), _uniform(gen, n, 0.6, 1.4), torch.ones(n))
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = (images - mean) * contrast.view(n, 1, 1, 1) + mean
    blurred = _coin(gen, cfg.p_blur, n)
    if blurred.any():
        images = images.clone()
        images[blurred] = gaussian_blur(images[blurred], float(_uniform(gen, 1, 0.5, 1.2)))
    sigma = torch.where(_coin(gen, cfg.p_noise, n), _uniform(gen, n, 0, cfg.noise), torch.zeros(n))
    images = images + sigma.view(n, 1, 1, 1) * torch.randn(images.shape, generator=gen)
    return images.clamp(0, 1)


def augment_entries(
    images: torch.Tensor, masks: torch.Tensor, gen: torch.Generator, cfg: InTaskAugment = InTaskAugment()
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-task augmentation, independently per entry: ``"N 1 g g"`` images and masks."""
    check_pair(images, masks)
    images, masks = spatial(images, masks, gen, cfg)
    return intensity(images, gen, cfg), masks


def boundary(masks: torch.Tensor, width: int = 1) -> torch.Tensor:
    """Inner boundary of binary masks ``"N 1 g g"``: the mask minus its erosion by ``width`` pixels."""
    k = 2 * width + 1
    eroded = -F.max_pool2d(-masks, k, stride=1, padding=width)
    return (masks - eroded).clamp(0, 1)


def sobel(images: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of ``"N 1 g g"``, each image rescaled to [0, 1]."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=images.dtype)
    kernels = torch.stack([kx, kx.T]).unsqueeze(1)
    grads = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernels)
    magnitude = grads.pow(2).sum(dim=1, keepdim=True).sqrt()
    top = magnitude.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    return magnitude / top


def augment_task(
    images: torch.Tensor, masks: torch.Tensor, gen: torch.Generator, cfg: TaskAugment = TaskAugment()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Task-level augmentation: one draw applied to every entry of the task (query and support)."""
    check_pair(images, masks)
    if _coin(gen, cfg.p_flip):
        dim = 2 + int(torch.randint(2, (), generator=gen))
        images, masks = images.flip(dim), masks.flip(dim)
    if _coin(gen, cfg.p_rot90):
        k = int(torch.randint(1, 4, (), generator=gen))
        images, masks = images.rot90(k, (2, 3)), masks.rot90(k, (2, 3))
    if _coin(gen, cfg.p_invert):
        images = 1.0 - images
    if _coin(gen, cfg.p_sobel):
        images = sobel(images)
    elif _coin(gen, cfg.p_blur):
        images = gaussian_blur(images, float(_uniform(gen, 1, 1.0, 2.0)))
    if _coin(gen, cfg.p_boundary):
        masks = boundary(masks, 1 + int(torch.randint(2, (), generator=gen)))
    return images.contiguous(), masks.contiguous()

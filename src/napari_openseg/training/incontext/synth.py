"""Synthetic segmentation tasks: SynthMorph-style random label maps with random appearance.

A *family* plays the part of a dataset: one base label map (the argmax of smooth random fields, one
field per label, as in SynthMorph) and one appearance model (per-label mean intensity and texture,
noise, bias-field and blur ranges). A *member* of the family is one "subject": the base fields are
warped by a smooth random deformation and perturbed before the argmax, so every member has the same
labels with different shapes, and its image is drawn from the family's appearance model with fresh
noise, texture, bias field and blur. A *task* is one label (or a union of a few) of a family; query
and support entries are members of the same family.

Everything is seeded: the same ``(seed, family, member)`` gives the same arrays. Images are
normalised with :func:`~napari_openseg.core.preprocess.normalize_intensity`, as at inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from napari_openseg.core.preprocess import normalize_intensity


@dataclass(frozen=True)
class SynthConfig:
    """Ranges the generator draws from; the defaults are the ones the default weights used."""

    size: int = 64
    labels: tuple[int, int] = (3, 12)
    shape_resolution: tuple[int, int] = (3, 12)
    warp_pixels: tuple[float, float] = (0.5, 5.0)
    member_jitter: tuple[float, float] = (0.0, 0.6)
    texture: tuple[float, float] = (0.0, 0.25)
    noise: tuple[float, float] = (0.0, 0.08)
    bias: tuple[float, float] = (0.0, 0.5)
    blur_pixels: tuple[float, float] = (0.0, 1.2)
    intensity_jitter: float = 0.05
    object_probability: float = 0.5


@dataclass
class SynthFamily:
    """One family: base fields ``"L g g"`` and the appearance parameters of each label."""

    base_fields: torch.Tensor
    means: torch.Tensor
    texture_amplitude: torch.Tensor
    texture_resolution: int
    warp_pixels: float
    member_jitter: float
    noise: float
    bias: float
    blur_pixels: float
    jitter_resolution: int

    @property
    def n_labels(self) -> int:
        return int(self.base_fields.shape[0])


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    """Integer in ``[low, high]``."""
    return int(torch.randint(low, high + 1, (), generator=gen))


def smooth_field(
    gen: torch.Generator, channels: int, resolution: int, size: int, count: int = 1
) -> torch.Tensor:
    """``"count channels size size"`` smooth noise: normal noise at ``resolution`` upsampled bicubically."""
    coarse = torch.randn(count, channels, resolution, resolution, generator=gen)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)


def make_family(gen: torch.Generator, config: SynthConfig = SynthConfig()) -> SynthFamily:
    """Draw one family from ``gen``."""
    n_labels = _randint(gen, *config.labels)
    resolution = _randint(gen, *config.shape_resolution)
    base = smooth_field(gen, n_labels, resolution, config.size)[0]
    # Some labels get a head start, so families mix large and small structures.
    base = base + 0.8 * torch.rand(n_labels, 1, 1, generator=gen)
    if float(torch.rand((), generator=gen)) < config.object_probability:
        base[0] += _object_prior(gen, config.size)
    return SynthFamily(
        base_fields=base,
        means=torch.rand(n_labels, generator=gen),
        texture_amplitude=torch.rand(n_labels, generator=gen) * _uniform(gen, *config.texture),
        texture_resolution=_randint(gen, 4, 24),
        warp_pixels=_uniform(gen, *config.warp_pixels),
        member_jitter=_uniform(gen, *config.member_jitter),
        noise=_uniform(gen, *config.noise),
        bias=_uniform(gen, *config.bias),
        blur_pixels=_uniform(gen, *config.blur_pixels),
        jitter_resolution=_randint(gen, 3, 10),
    )


def _object_prior(gen: torch.Generator, size: int) -> torch.Tensor:
    """A bowl that makes label 0 the background around one off-centre elliptical "object", as in
    medical crops, instead of labels tiling the whole field."""
    axis = torch.linspace(-1.0, 1.0, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    cy, cx = (_uniform(gen, -0.3, 0.3) for _ in range(2))
    ry, rx = (_uniform(gen, 0.35, 0.8) for _ in range(2))
    radius2 = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    return _uniform(gen, 1.5, 4.0) * (radius2 - 1.0)


def _warp(fields: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """Resample ``"N C g g"`` at identity + ``displacement "N 2 g g"`` (in pixels), border-padded."""
    n, _, size, _ = fields.shape
    axis = torch.linspace(-1.0, 1.0, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    identity = torch.stack([xx, yy], dim=-1).expand(n, size, size, 2)
    grid = identity + displacement.permute(0, 2, 3, 1) * (2.0 / size)
    return F.grid_sample(fields, grid, mode="bilinear", padding_mode="border", align_corners=True)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``"N 1 H W"`` with ``sigma`` in pixels (no-op below 0.3)."""
    if sigma < 0.3:
        return images
    radius = max(1, int(math.ceil(2.5 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(out, kernel.view(1, 1, -1, 1))


def make_members(
    family: SynthFamily, count: int, gen: torch.Generator, config: SynthConfig = SynthConfig()
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` members of ``family``: images ``"N 1 g g"`` in [0, 1] and label maps ``"N g g"`` (int64)."""
    size = family.base_fields.shape[-1]
    n_labels = family.n_labels
    fields = family.base_fields.expand(count, -1, -1, -1)
    fields = fields + family.member_jitter * smooth_field(
        gen, n_labels, family.jitter_resolution, size, count
    )
    displacement = smooth_field(gen, 2, 5, size, count) * family.warp_pixels
    labels = _warp(fields, displacement).argmax(dim=1)

    jitter = config.intensity_jitter * torch.randn(count, n_labels, generator=gen)
    means = (family.means + jitter).gather(1, labels.flatten(1)).view(count, 1, size, size)
    texture = smooth_field(gen, n_labels, family.texture_resolution, size, count)
    texture = (texture * family.texture_amplitude.view(1, -1, 1, 1)).gather(1, labels.unsqueeze(1))
    images = gaussian_blur(means + texture, family.blur_pixels)
    bias = torch.exp(family.bias * smooth_field(gen, 1, 3, size, count))
    images = images * bias + family.noise * torch.randn(images.shape, generator=gen)
    normalized = np.stack([normalize_intensity(im) for im in images[:, 0].numpy()])
    return torch.from_numpy(normalized).unsqueeze(1), labels


def task_mask(labels: torch.Tensor, gen: torch.Generator, n_labels: int) -> torch.Tensor:
    """Binary masks ``"N 1 g g"`` of one task of the family: a label of the first member (the query)
    that covers between 0.5 % and 60 % of it, sometimes merged with one or two other labels."""
    fractions = torch.bincount(labels[0].flatten(), minlength=n_labels).float() / labels[0].numel()
    usable = torch.nonzero((fractions > 0.005) & (fractions < 0.6)).flatten()
    if len(usable) == 0:
        usable = torch.nonzero(fractions > 0).flatten()
    chosen = usable[torch.randint(len(usable), (1,), generator=gen)]
    if float(torch.rand((), generator=gen)) < 0.25 and n_labels > 2:
        extra = torch.randint(n_labels, (_randint(gen, 1, 2),), generator=gen)
        if fractions[torch.unique(torch.cat([chosen, extra]))].sum() < 0.7:
            chosen = torch.cat([chosen, extra])
    return torch.isin(labels, chosen).unsqueeze(1).float()


def synthetic_task(
    seed: int | tuple[int, ...], count: int, config: SynthConfig = SynthConfig()
) -> tuple[torch.Tensor, torch.Tensor]:
    """One task of a new family: ``count`` images ``"N 1 g g"`` and masks ``"N 1 g g"``.

    Entry 0 is meant as the query and the rest as its support set.
    """
    gen = torch.Generator().manual_seed(_seed_int(seed))
    family = make_family(gen, config)
    images, labels = make_members(family, count, gen, config)
    return images, task_mask(labels, gen, family.n_labels)


def _seed_int(seed: int | tuple[int, ...]) -> int:
    parts = seed if isinstance(seed, tuple) else (seed,)
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)

"""Intensity normalisation and the grid mapping with its inverse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_openseg.core.preprocess import (
    from_grid,
    masks_to_grid,
    normalize_intensity,
    to_grid,
    to_single_channel,
)
from napari_openseg.errors import OpenSegError


@pytest.mark.parametrize(
    "array",
    [
        np.arange(256, dtype=np.uint8).reshape(16, 16),
        (np.arange(256, dtype=np.uint16) * 200).reshape(16, 16),
        (np.arange(256, dtype=np.int16) * 12 - 1024).reshape(16, 16),  # CT-like, negative values
        np.linspace(-3.5, 9.0, 256, dtype=np.float64).reshape(16, 16),
    ],
)
def test_any_dtype_maps_into_unit_interval_preserving_order(array):
    out = normalize_intensity(array)
    assert out.dtype == np.float32 and out.shape == array.shape
    assert out.min() == 0.0 and out.max() == 1.0
    flat = out.ravel()
    assert np.all(np.diff(flat) >= 0)  # the ramp stays monotonic


def test_nan_and_inf_are_handled():
    array = np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)
    array[0, 0], array[0, 1], array[0, 2] = np.nan, np.inf, -np.inf
    out = normalize_intensity(array)
    assert np.all(np.isfinite(out))
    assert out[0, 0] == 0.0 and out[0, 1] == 1.0 and out[0, 2] == 0.0


def test_constant_and_all_nan_images_become_zeros():
    assert np.all(normalize_intensity(np.full((4, 4), 7.0)) == 0.0)
    assert np.all(normalize_intensity(np.full((4, 4), np.nan)) == 0.0)


def test_rgb_becomes_luminance():
    rgb = np.zeros((8, 9, 3), np.uint8)
    rgb[..., 1] = 200
    gray = to_single_channel(rgb)
    assert gray.shape == (8, 9)
    assert np.allclose(gray, 0.587 * 200)
    assert to_single_channel(np.zeros((5, 8, 9))).shape == (5, 8, 9)  # a volume is left alone
    with pytest.raises(OpenSegError, match="3 or 4 channels"):
        to_single_channel(np.zeros((8, 9, 5)), rgb=True)


def smooth_image(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return (0.5 + 0.25 * np.sin(x / 6.0) + 0.25 * np.cos(y / 9.0)).astype(np.float32)


@pytest.mark.parametrize("aspect", ["pad", "stretch"])
@pytest.mark.parametrize("shape", [(37, 53), (90, 41), (64, 64), (200, 120)])
def test_grid_mapping_round_trips_non_square_slices(shape, aspect):
    image = torch.from_numpy(smooth_image(*shape))[None]
    grid, mapping = to_grid(image, 64, aspect)
    assert grid.shape == (1, 1, 64, 64)
    back = from_grid(grid, mapping)
    assert back.shape == (1, 1, *shape)
    assert (back[0, 0] - image[0]).abs().mean().item() < 0.02


def test_pad_keeps_the_aspect_ratio():
    image = torch.zeros(1, 40, 80)
    image[:, :, :40] = 1.0  # left half bright
    grid, mapping = to_grid(image, 64, "pad")
    assert mapping.padded_shape == (80, 80) and mapping.offsets == (20, 0)
    # the content fills the middle half of the rows; padding above and below is zero
    assert grid[0, 0, :12].abs().max() == 0 and grid[0, 0, 52:].abs().max() == 0
    assert grid[0, 0, 20:44, 4:28].min() > 0.99


def test_masks_survive_the_round_trip():
    mask = np.zeros((45, 70), bool)
    mask[10:30, 20:55] = True
    mapped = masks_to_grid(torch.from_numpy(mask)[None], 64)
    assert set(torch.unique(mapped).tolist()) <= {0.0, 1.0}
    _, mapping = to_grid(torch.zeros(1, 45, 70), 64)
    back = from_grid(mapped, mapping)[0, 0].numpy() > 0.5
    dice = 2 * (back & mask).sum() / (back.sum() + mask.sum())
    assert dice > 0.97


def test_unknown_aspect_is_refused():
    with pytest.raises(OpenSegError, match="aspect"):
        to_grid(torch.zeros(1, 8, 8), 8, "crop")


@pytest.mark.parametrize("shape", [(37, 53), (90, 41), (4, 300), (300, 5), (1, 7), (130, 127)])
@pytest.mark.parametrize("grid", [32, 128])
def test_the_grid_mapping_gives_the_numbers_of_padding_to_a_square_without_making_one(shape, grid):
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    slices = torch.rand(2, *shape, generator=gen)
    grid_slices, mapping = to_grid(slices, grid)
    (side, _), (oy, ox) = mapping.padded_shape, mapping.offsets
    square = F.pad(slices[:, None], (ox, side - shape[1] - ox, oy, side - shape[0] - oy))
    shrink = side > grid
    direct = F.interpolate(square, size=(grid, grid), mode="bilinear", align_corners=False, antialias=shrink)
    assert torch.allclose(grid_slices, direct, atol=1e-6)
    values = torch.rand(2, 3, grid, grid, generator=gen)
    back = F.interpolate(
        values, size=(side, side), mode="bilinear", align_corners=False, antialias=side < grid
    )
    back = back[..., oy : oy + shape[0], ox : ox + shape[1]]
    assert torch.allclose(from_grid(values, mapping), back, atol=1e-6)

"""A tiny UniverSeg trained for a few seconds to segment bright blobs, and synthetic blob volumes.

The network learns one thing from the support: the object is the bright, roughly round region. That
is enough for propagation tests to run a real network (not a stub) whose output depends on the
image, while keeping the test suite fast on a CPU.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from napari_openseg.core.preprocess import normalize_intensity
from napari_openseg.model.fast import fast_forward
from napari_openseg.model.universeg import UniverSeg, build_network

GRID = 32


@pytest.fixture(scope="module")
def one_thread():
    """Run torch on one thread for a test module: tiny networks are fastest so, above all on a shared
    2-core machine, where two threads can be ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blob_images(count: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` normalised images ``"N 1 g g"`` of one noisy bright disc each, and its masks."""
    axis = torch.arange(GRID, dtype=torch.float32)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    radius = 2 + 8 * torch.rand(count, 1, 1, generator=gen)
    cy, cx = 6 + 20 * torch.rand(2, count, 1, 1, generator=gen)
    masks = (((yy - cy) ** 2 + (xx - cx) ** 2) <= radius**2).float()
    images = 0.3 + 0.5 * masks + 0.08 * torch.randn(count, GRID, GRID, generator=gen)
    images = torch.stack([torch.from_numpy(normalize_intensity(im.numpy())) for im in images])
    return images.unsqueeze(1), masks.unsqueeze(1)


@functools.cache
def train_blob_net(steps: int = 60, seed: int = 0) -> UniverSeg:
    """(8, 8, 8) features on a 32 grid, Adam on soft Dice, batches of 8 queries with 3 supports.

    Trained once per test session (cached); callers must not modify it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine runs tiny convolutions fastest on one thread
    try:
        torch.manual_seed(seed)
        net = build_network((8, 8, 8), grid_size=GRID)
        optimiser = torch.optim.Adam(net.parameters(), 1e-2)
        gen = torch.Generator().manual_seed(seed + 1)
        batch, support = 8, 3
        for _ in range(steps):
            images, masks = blob_images(batch * (support + 1), gen)
            images = images.view(batch, support + 1, 1, GRID, GRID)
            masks = masks.view(batch, support + 1, 1, GRID, GRID)
            prob = torch.sigmoid(fast_forward(net, images[:, 0], images[:, 1:], masks[:, 1:]))
            target = masks[:, 0]
            loss = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    finally:
        torch.set_num_threads(threads)
    return net.eval()


def disc_volume(
    shape: tuple[int, int, int] = (24, 40, 48), first: int = 4, last: int = 19, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A bright disc that moves diagonally, grows and then shrinks on slices ``first..last``."""
    rng = np.random.default_rng(seed)
    depth, height, width = shape
    yy, xx = np.mgrid[:height, :width]
    truth = np.zeros(shape, np.uint8)
    for z in range(first, last + 1):
        t = (z - first + 0.5) / (last - first + 1)
        radius = 3 + 7 * np.sin(np.pi * t)
        cy, cx = 0.3 * height + 0.4 * height * t, 0.3 * width + 0.4 * width * t
        truth[z] = ((yy - cy) ** 2 + (xx - cx) ** 2) <= radius**2
    image = (0.3 + 0.5 * truth + rng.normal(0, 0.08, shape)).astype(np.float32)
    return image, truth


def largest_slice(truth: np.ndarray) -> int:
    return int(np.argmax(truth.reshape(truth.shape[0], -1).sum(axis=1)))

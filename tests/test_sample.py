"""The bundled sample and the slices the demo treats as painted."""

from __future__ import annotations

import numpy as np

from napari_openseg.sample import evenly_spaced_slices


def test_evenly_spaced_slices_lie_strictly_inside_the_labelled_range():
    labels = np.zeros((4, 20, 6), np.uint8)
    labels[:, 2:12, :] = 1  # labelled slices 2..11 along axis 1
    assert evenly_spaced_slices(labels, 1, 2).tolist() == [5, 8]  # linspace(2, 11, 4) without its ends
    assert evenly_spaced_slices(labels, 1, 8).tolist() == [3, 4, 5, 6, 7, 8, 9, 10]
    assert evenly_spaced_slices(labels, 0, 2).tolist() == [1, 2]  # every slice labelled along axis 0

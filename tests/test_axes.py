"""Shapes and axes in messages say their order (array order, NIfTI's reversed)."""

import numpy as np
import pytest

from napari_openseg.core.axes import axis_text, shape_text
from napari_openseg.core.novelty.free import iter_training_free_novelty
from napari_openseg.core.novelty.model import check_volume
from napari_openseg.core.propagate.propagation import iter_propagate
from napari_openseg.core.support import SupportSet
from napari_openseg.errors import OpenSegError


def test_a_volume_shape_names_both_orders():
    assert (
        shape_text((34, 52, 35))
        == "(34, 52, 35) in array order (35 x 52 x 34 as NIfTI tools such as FSL list it)"
    )
    assert shape_text((40, 50)) == "(40, 50) (rows, columns)"


def test_an_axis_names_the_nifti_axis_it_is():
    assert axis_text(0) == "axis 0 (array order: the NIfTI file's third axis)"
    assert axis_text(2) == "axis 2 (array order: the NIfTI file's first axis)"
    assert axis_text(-1) == "axis 2 (array order: the NIfTI file's first axis)"
    assert axis_text(1, ndim=2) == "axis 1"


def test_novelty_names_the_order_of_the_shapes_it_refuses():
    with pytest.raises(OpenSegError, match=r"\(6, 7\) \(rows, columns\)"):
        check_volume(np.zeros((6, 7), np.float32))
    volume = np.zeros((4, 6, 8), np.float32)
    with pytest.raises(
        OpenSegError, match=r"mask of shape \(4, 6, 7\) in array order \(7 x 6 x 4 .*\(8 x 6 x 4"
    ):
        next(iter_training_free_novelty(volume, SupportSet(), mask=np.zeros((4, 6, 7), bool)))


def test_propagation_names_the_order_of_a_shape_it_refuses():
    with pytest.raises(OpenSegError, match=r"shape \(2, 3, 4, 5\) in array order \(5 x 4 x 3 x 2 "):
        next(iter_propagate(np.zeros((2, 3, 4, 5), np.float32), np.zeros((2, 3, 4, 5), np.uint8)))
    with pytest.raises(OpenSegError, match=r"got shape \(8, 9\) \(rows, columns\)"):
        next(iter_propagate(np.zeros((8, 9), np.float32), np.zeros((8, 9), np.uint8)))

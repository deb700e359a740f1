"""How shapes and axes are written in messages, so that nobody has to guess the order.

The project's arrays are in numpy's order, which for a NIfTI volume is the file's axes reversed:
a volume that nibabel's header, FSL or ITK-SNAP list as 35 x 52 x 34 is the array ``(34, 52, 35)``
here, and the NIfTI's third axis is axis 0 (napari's slider). Every message that shows a shape or an
axis of a volume says which order it uses, through these two functions.
"""

from __future__ import annotations

from collections.abc import Sequence

_ORDINALS = ("first", "second", "third", "fourth", "fifth")


def shape_text(shape: Sequence[int]) -> str:
    """``"(34, 52, 35) in array order (35 x 52 x 34 as NIfTI tools list it)"``; 2D shapes are
    ``"(rows, columns)"`` and say so."""
    dims = tuple(int(n) for n in shape)
    if len(dims) == 2:
        return f"({dims[0]}, {dims[1]}) (rows, columns)"
    if len(dims) < 2:
        return str(dims)
    reversed_dims = " x ".join(str(n) for n in reversed(dims))
    return f"{dims} in array order ({reversed_dims} as NIfTI tools such as FSL list it)"


def axis_text(axis: int, ndim: int = 3) -> str:
    """``"axis 0 (array order: the NIfTI file's third axis)"`` for a volume; a plain ``"axis 0"`` for
    fewer than three axes."""
    axis = int(axis)
    if ndim < 3 or not -ndim <= axis < ndim:
        return f"axis {axis}"
    nifti = ndim - 1 - axis % ndim
    name = _ORDINALS[nifti] if nifti < len(_ORDINALS) else f"{nifti + 1}th"
    return f"axis {axis % ndim} (array order: the NIfTI file's {name} axis)"

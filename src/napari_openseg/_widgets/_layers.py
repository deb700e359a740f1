"""Small helpers every widget uses to read layers and to write the layers the plugin owns.

Ownership: a layer this plugin creates carries ``layer.metadata["openseg"] = {"role": ..., "source":
<unique id of the layer it was computed from>}``. :func:`put_output_layer` only ever replaces such a
layer (same role, same source) that nobody has painted on since: once a user paints on an output
labels layer it is marked ``"edited"`` and becomes theirs, so a later run makes a new layer instead.
Only the layer objects the plugin made count: a duplicate of an output (which shares its metadata) is
the user's.
Geometry (scale, translate, rotate, shear, affine, units, axis labels) and the NIfTI reference of the
source (``metadata["nifti"]``, so that saving gives the file its source's affine back) are copied.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import numpy as np

from napari_openseg.core.axes import axis_text, shape_text
from napari_openseg.errors import OpenSegError

OWNER_KEY = "openseg"
NIFTI_KEY = "nifti"
GEOMETRY = ("scale", "translate", "rotate", "shear", "affine", "units", "axis_labels")


def image_layers(viewer) -> list:
    """Image layers of the viewer, in layer-list order."""
    from napari.layers import Image

    return [layer for layer in viewer.layers if isinstance(layer, Image)]


def labels_layers(viewer, include_owned: bool = True) -> list:
    """Labels layers of the viewer; ``include_owned=False`` leaves out the plugin's own outputs."""
    from napari.layers import Labels

    return [
        layer
        for layer in viewer.layers
        if isinstance(layer, Labels) and (include_owned or owner_info(layer) is None)
    ]


#: The layer objects this plugin made. The metadata alone does not tell: napari's "Duplicate Layer"
#: gives the copy the very same metadata, and the copy (with the user's fixes) is the user's.
_MADE: weakref.WeakSet = weakref.WeakSet()


def owner_info(layer) -> dict | None:
    """``{"role": ..., "source": ...}`` for a layer this plugin made, else ``None``."""
    if layer not in _MADE:
        return None
    info = layer.metadata.get(OWNER_KEY) if isinstance(layer.metadata, dict) else None
    return info if isinstance(info, dict) else None


def is_preview(layer) -> bool:
    """A layer the plugin fills in while a job runs and removes at its end (never a layer to paint on)."""
    info = owner_info(layer)
    return info is not None and str(info.get("role", "")).endswith("preview")


def layer_image(layer) -> tuple[np.ndarray, bool]:
    """The pixel array of an image layer and whether its last axis is RGB(A).

    Multiscale layers give their full-resolution level. An RGB(A) layer with more than two spatial
    axes (an RGB volume) is refused with what to do.
    """
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    rgb = bool(getattr(layer, "rgb", False))
    if rgb and np.ndim(data) > 3:
        raise OpenSegError(
            f"layer '{layer.name}' is an RGB volume of shape {shape_text(np.shape(data))}; napari-openseg "
            "segments single-channel images: convert it to greyscale or split the channels "
            "(layer context menu > Split RGB) and use one channel"
        )
    return data, rgb


def geometry_of(layer, ndim: int | None = None) -> dict[str, Any]:
    """Keyword arguments that give a new layer ``layer``'s placement in the world.

    ``ndim`` (default: the layer's) lets the new layer have fewer axes (the last ones are kept),
    e.g. a 2D result of one slice of a volume.
    """
    ndim = layer.ndim if ndim is None else ndim
    drop = layer.ndim - ndim
    if drop < 0:
        raise ValueError(f"cannot place a {ndim}D layer like the {layer.ndim}D layer {layer.name!r}")
    keep = slice(drop, None)
    geometry = {
        "scale": tuple(np.asarray(layer.scale)[keep]),
        "translate": tuple(np.asarray(layer.translate)[keep]),
        "units": tuple(layer.units)[keep],
        "axis_labels": tuple(layer.axis_labels)[keep],
    }
    if drop == 0:
        geometry["rotate"] = np.array(layer.rotate)
        geometry["shear"] = np.array(layer.shear)
        geometry["affine"] = np.array(layer.affine.affine_matrix)
    return geometry


def place_like(layer, source) -> None:
    """Give an existing ``layer`` the placement of ``source`` (see :func:`geometry_of`), rotation and
    shear included."""
    for key, value in geometry_of(source, layer.ndim).items():
        setattr(layer, key, value)


def output_metadata(source, role: str) -> dict:
    """Metadata of an output layer made from ``source``: ownership, and the source's NIfTI reference."""
    metadata = {OWNER_KEY: {"role": role, "source": str(source.unique_id)}}
    nifti = source.metadata.get(NIFTI_KEY) if isinstance(source.metadata, dict) else None
    if nifti is not None:
        metadata[NIFTI_KEY] = nifti
    return metadata


def owned_roles(viewer, source) -> dict[str, Any]:
    """The plugin's unedited layers made from ``source`` (a layer), by role."""
    found = {}
    for layer in viewer.layers:
        info = owner_info(layer)
        if info and info.get("source") == str(source.unique_id) and not info.get("edited"):
            found.setdefault(str(info.get("role")), layer)
    return found


def find_owned_layer(viewer, role: str, source) -> Any | None:
    """The layer this plugin made for ``role`` from ``source`` (a layer), if it still exists."""
    return owned_roles(viewer, source).get(role)


def put_output_layer(
    viewer,
    source,
    data: np.ndarray,
    *,
    role: str,
    name: str,
    layer_type: str = "labels",
    **kwargs: Any,
):
    """Add the plugin's output layer for (``role``, ``source``), or replace the one made earlier.

    Parameters
    ----------
    source
        The layer the result was computed from; its geometry and NIfTI reference are copied.
    data
        The result, with ``source``'s spatial shape (or its last axes; see :func:`geometry_of`).
    role
        What the layer is (``"segmentation"``, ``"probability:1"``, ...): one layer per role and source.
    name
        Name for a new layer; napari makes it unique if a user's layer already has it. A replaced
        layer keeps the name it has (the user may have renamed it).
    layer_type
        ``"labels"`` or ``"image"``; extra ``kwargs`` go to ``viewer.add_<layer_type>``.
    """
    if layer_type not in ("labels", "image"):
        raise ValueError(f"layer_type must be 'labels' or 'image', got {layer_type!r}")
    geometry = geometry_of(source, np.ndim(data))
    metadata = output_metadata(source, role)
    existing = find_owned_layer(viewer, role, source)
    expected_type = "Labels" if layer_type == "labels" else "Image"
    if existing is not None and type(existing).__name__ == expected_type:
        place_like(existing, source)
        existing.data = data
        existing.metadata.update(metadata)
        for key, value in kwargs.items():
            if key in ("colormap", "contrast_limits", "opacity", "blending", "visible"):
                setattr(existing, key, value)
        existing.refresh()
        return existing
    if existing is not None:  # same role but another kind of layer: ours, so it may go
        viewer.layers.remove(existing)
    from napari.layers import Image, Labels

    kind = Image if layer_type == "image" else Labels
    layer = kind(data, name=name, metadata=metadata, **geometry, **kwargs)
    if layer_type == "labels":
        layer.events.paint.connect(_mark_edited)
    _MADE.add(layer)  # before it joins the viewer: widgets that list layers on insertion see it as ours
    return viewer.add_layer(layer)


def _mark_edited(event) -> None:
    info = owner_info(event.source)
    if info is not None:
        info["edited"] = True


def remove_owned_layers(viewer, layers: Iterable) -> None:
    """Remove layers, but only those this plugin made (a safety net for previews)."""
    for layer in list(layers):
        if layer is not None and owner_info(layer) is not None and layer in viewer.layers:
            viewer.layers.remove(layer)


def slice_axis(viewer, layer) -> int:
    """The layer axis the viewer slices along: the one just before the two displayed ones in the
    viewer's dims order (so a transposed view slices along whatever axis it shows as the slider)."""
    if layer.ndim < 3:
        return 0
    offset = viewer.dims.ndim - layer.ndim
    order = list(viewer.dims.order)
    for world_axis in reversed(order[:-2]):
        axis = world_axis - offset
        if 0 <= axis < layer.ndim:
            return axis
    return 0


def current_slice(viewer, layer, axis: int) -> int:
    """Index along ``axis`` of ``layer`` of the slice the viewer shows now."""
    point = np.asarray(viewer.dims.point)[viewer.dims.ndim - layer.ndim :]
    data_point = np.asarray(layer.world_to_data(point))
    index = int(np.round(data_point[axis]))
    size = np.shape(layer.data)[axis]
    if not 0 <= index < size:
        raise OpenSegError(
            f"the viewer is at index {index} along {axis_text(axis, layer.ndim)}, outside layer '{layer.name}' "
            f"(0..{size - 1}); move the slider onto the layer"
        )
    return index

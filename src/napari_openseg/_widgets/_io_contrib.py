"""napari reader, writers and sample data (the ``readers``, ``writers`` and ``sample_data`` of
``napari.yaml``). File formats themselves live in :mod:`napari_openseg.io` and
:mod:`napari_openseg.core.support`; this module only turns them into layer data and back.

NIfTI (``.nii``, ``.nii.gz``)
    Read through :func:`napari_openseg.io.read_image`: the array is in (z, y, x) order and the voxel
    spacing becomes the layer's ``scale``. The file's affine and header travel in
    ``layer.metadata["nifti"]``, so writing the layer (or a segmentation of it) gives the new file
    the source's affine back. The world placement shown in napari is spacing only (no rotation or
    origin from the affine).

    A file opens as a **labels** layer when its header's intent is "label", or when its values are
    whole numbers and either its name says so (a word starting with ``label``, ``seg``, ``mask``,
    ``dseg``, ``aseg``, ``aparc``, ``parc``, ``roi`` or ``annot``) or it has at most
    :data:`MAX_UNHINTED_LABELS` distinct values. Anything else opens as an image. A labels layer
    whose file name has no labels hint is named ``"<stem> labels"``, so that an image and its labels
    kept under one name in two folders (``imagesTr/x.nii.gz``, ``labelsTr/x.nii.gz``) open as ``x``
    and ``x labels`` rather than ``x`` and ``x [1]``.

Support-set files (``.npz`` written by napari-openseg)
    Dropping one adds its entries to the viewer's support set (shown in the support-set widget); no
    layer is added. Other ``.npz`` files are declined so that other readers can try them.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from napari_openseg._widgets._layers import NIFTI_KEY
from napari_openseg.core.support import FORMAT_NAME, METADATA_KEY, label_dtype
from napari_openseg.errors import OpenSegError
from napari_openseg.file_limits import MAX_SUPPORT_EXPANSION, read_npz
from napari_openseg.io import NIFTI_SUFFIXES, ImageData, read_image, smallest_integer_array
from napari_openseg.io import write_image as write_image_file

log = logging.getLogger(__name__)

MAX_UNHINTED_LABELS = 32
LABEL_NAME_HINT = re.compile(r"^(label|seg|mask|dseg|aseg|aparc|parc|roi|annot)", re.IGNORECASE)


# --- reading -----------------------------------------------------------------------------------


def get_reader(path: str | list[str]):
    """The reader function for ``path``, or ``None`` when this plugin does not read it."""
    if isinstance(path, list):
        readers = [get_reader(p) for p in path]
        if not path or any(reader is None for reader in readers):
            return None
        return lambda paths: [layer for p, r in zip(paths, readers, strict=True) for layer in r(p)]
    name = str(path).lower()
    if name.endswith(NIFTI_SUFFIXES):
        return read_nifti
    if name.endswith(".npz") and is_support_file(path):
        return read_support_file
    return None


def has_label_name(path: str | Path) -> bool:
    """Whether a word of the file name (split at ``_ - . space``) starts with a labels hint."""
    words = re.split(r"[_\-.\s]+", Path(path).name)
    return any(LABEL_NAME_HINT.match(word) for word in words if word)


def looks_like_labels(image: ImageData) -> bool:
    """Whether a NIfTI file holds a label map rather than intensities (see the module docstring)."""
    header = image.header
    intent = header is not None and hasattr(header, "get_intent") and header.get_intent()[0] == "label"
    data = image.data
    if data.dtype == bool:
        return True
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        return False
    # even a "label" intent needs whole numbers: labels are integers, and casting would lose the rest
    hinted = intent or (image.path is not None and has_label_name(image.path))
    limit = 65535 if hinted else MAX_UNHINTED_LABELS
    sample = data.ravel()[:: max(1, data.size // 1_000_000)]  # cheap early rejection first
    for values in (sample, data):
        if np.issubdtype(values.dtype, np.floating) and not np.all(np.isfinite(values)):
            return False
        distinct = np.unique(values)
        if distinct.size > limit or distinct.min() < 0 or not np.all(np.mod(distinct, 1) == 0):
            return False
    return True


def nifti_layer_data(image: ImageData) -> tuple[np.ndarray, dict[str, Any], str]:
    """One layer-data tuple for a NIfTI volume read by :func:`napari_openseg.io.read_image`."""
    kind = "labels" if looks_like_labels(image) else "image"
    data = image.data
    if kind == "labels" and not np.issubdtype(data.dtype, np.integer):
        data = data.astype(label_dtype(int(data.max()) if data.size else 0))
    meta = {
        "affine": image.affine,
        "header": image.header,
        "shape": tuple(image.data.shape),
        "path": str(image.path) if image.path else None,
    }
    name = image.name
    if kind == "labels" and not (image.path is not None and has_label_name(image.path)):
        name = f"{name} labels"
    kwargs = {"name": name, "scale": tuple(image.spacing), "metadata": {NIFTI_KEY: meta}}
    if kind == "image":
        kwargs["rgb"] = False  # a last axis of 3 or 4 voxels is space, not colour (napari would guess RGB)
    return data, kwargs, kind


def read_nifti(path: str) -> list[tuple]:
    """napari reader: a NIfTI file -> one image or labels layer."""
    return [nifti_layer_data(read_image(path))]


def is_support_file(path: str | Path) -> bool:
    """Whether ``path`` is a support-set file written by napari-openseg (reads only its index and
    metadata, never pickled objects)."""
    try:  # sizes checked before reading: a crafted metadata member cannot take the viewer's memory
        meta = read_npz(path, [METADATA_KEY], MAX_SUPPORT_EXPANSION).get(METADATA_KEY)
    except OpenSegError:
        return False
    return meta is not None and f'"format": "{FORMAT_NAME}"' in str(meta)


def read_support_file(path: str) -> list[tuple]:
    """napari reader: add a support-set file's entries to the current viewer's support set."""
    import napari
    from napari.utils.notifications import show_info

    from napari_openseg._widgets._session import get_session

    viewer = napari.current_viewer()
    if viewer is None:
        log.warning("no napari viewer to load the support set %s into", path)
        return [(None,)]
    session = get_session(viewer)
    count = session.load_support(path)
    held = "" if count else ", all of them already in the set"
    show_info(
        f"added {count} support entries from {Path(path).name}{held} (now {len(session.support)}); "
        "see them in Plugins > OpenSeg > Support set"
    )
    return [(None,)]  # napari's marker for "read, but no layer to add"


# --- writing -----------------------------------------------------------------------------------


def _reference(data: np.ndarray, meta: dict) -> ImageData:
    """Geometry for a written file: the source NIfTI's affine and header when the layer came from
    one with the same shape, else an affine made of the layer's scale and translate."""
    metadata = meta.get("metadata") or {}
    nifti = metadata.get(NIFTI_KEY) if isinstance(metadata, dict) else None
    if nifti and nifti.get("affine") is not None and tuple(nifti.get("shape", ())) == data.shape:
        return ImageData(data=data, affine=np.asarray(nifti["affine"]), header=nifti.get("header"))
    ndim = data.ndim
    scale = tuple(meta.get("scale") or (1.0,) * ndim)[-ndim:]
    translate = tuple(meta.get("translate") or (0.0,) * ndim)[-ndim:]
    affine = np.eye(4)
    for nifti_axis, array_axis in enumerate(reversed(range(min(ndim, 3)))):  # arrays are (z, y, x)
        affine[nifti_axis, nifti_axis] = scale[ndim - min(ndim, 3) + array_axis]
        affine[nifti_axis, 3] = translate[ndim - min(ndim, 3) + array_axis]
    return ImageData(data=data, spacing=scale, affine=affine)


def _write(path: str, data: Any, meta: dict, labels: bool = False) -> list[str]:
    if not str(path).lower().endswith(NIFTI_SUFFIXES):
        return []
    from napari.utils.notifications import show_error, show_warning

    try:
        if meta.get("rgb"):
            raise OpenSegError("NIfTI holds single-channel images; split the RGB channels before saving")
        array = np.asarray(data[0] if meta.get("multiscale") else data)
        if labels:
            array = _label_array(array)
        reference = _reference(array, meta)
        if reference.header is None and _is_rotated(meta):
            show_warning(
                f"{Path(path).name}: the layer's rotation, shear or affine is not written, only "
                "its scale and translate"
            )
        # napari's save dialog has already asked before replacing an existing file
        write_image_file(path, array, reference, overwrite=True)
    except Exception as err:
        # napari turns a writer's ValueError (OpenSegError is one) into "not a valid writer": say why first
        show_error(f"Saving {Path(path).name} failed: {err}")
        raise
    return [str(path)]


def _label_array(array: np.ndarray) -> np.ndarray:
    """Labels in the smallest type that holds them (napari makes int64 labels, which NIfTI tools dislike)."""
    if array.dtype == bool or np.issubdtype(array.dtype, np.integer):
        return smallest_integer_array(array)
    return array


def _is_rotated(meta: dict) -> bool:
    rotate = np.asarray(meta.get("rotate", 0.0), float)
    shear = np.asarray(meta.get("shear", 0.0), float)
    affine = meta.get("affine")
    affine = np.asarray(getattr(affine, "affine_matrix", affine) if affine is not None else np.eye(2), float)
    return (
        (rotate.ndim == 2 and not np.allclose(rotate, np.eye(len(rotate))))
        or bool(np.any(shear != 0))
        or (affine.ndim == 2 and not np.allclose(affine, np.eye(len(affine))))
    )


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """napari writer: a labels layer -> NIfTI in the smallest unsigned type that holds its values,
    with its source's affine when it has one."""
    return _write(path, data, meta, labels=True)


def write_image(path: str, data: Any, meta: dict) -> list[str]:
    """napari writer: a single-channel image layer -> NIfTI (an RGB image is refused)."""
    return _write(path, data, meta)


# --- sample data -------------------------------------------------------------------------------


def sample_data() -> list[tuple]:
    """napari sample: the bundled MNI152 2 mm T1 and its grey/white-matter labels."""
    from napari_openseg.sample import SAMPLE_LABEL_NAMES, load_sample

    image, labels = load_sample()
    image_data, image_kwargs, _ = nifti_layer_data(image)
    labels_data, labels_kwargs, _ = nifti_layer_data(labels)
    image_kwargs["name"] = "MNI152 T1"
    labels_kwargs["name"] = "MNI152 GM-WM labels"
    labels_kwargs["features"] = {
        "index": [0, *SAMPLE_LABEL_NAMES],
        "tissue": ["background", *SAMPLE_LABEL_NAMES.values()],
    }
    return [(image_data, image_kwargs, "image"), (labels_data, labels_kwargs, "labels")]

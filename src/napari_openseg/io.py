"""Reading and writing images, volumes and label maps: NIfTI, TIFF, NumPy and 2D PNG/JPEG.

Array order: NIfTI volumes are returned with their voxel axes *reversed* (nibabel's ``i, j, k`` becomes
``k, j, i``), so that axis 0 is the slice axis of an axial acquisition and the last two axes are rows
and columns, as napari and TIFF stacks expect. Writing reverses them back, so a round trip keeps the
file's affine and header. Every write goes to a temporary file in the target folder that is renamed
into place only when complete: a failed or cancelled write leaves nothing behind.
"""

from __future__ import annotations

import gzip
import logging
import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_openseg.errors import OpenSegError
from napari_openseg.file_limits import (
    CHUNK,
    EXPANSION_FLOOR,
    MAX_DEFLATE_EXPANSION,
    array_bytes,
    check_budget,
    check_stored_size,
    describe_array,
    drain,
    read_npy,
)
from napari_openseg.output_files import NEW_FILE_MODE, atomic_path, check_output, same_file  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
TIFF_SUFFIXES = (".tif", ".tiff")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
#: The suffix a result of each input format is written with (pictures as TIFF: results are not pictures).
OUTPUT_SUFFIX = {"nifti": ".nii.gz", "tiff": ".tif", "npy": ".npy", "picture": ".tif"}


@dataclass
class ImageData:
    """An array with the geometry it came with.

    ``spacing`` is per axis of ``data`` (after the NIfTI axis reversal); ``affine`` and ``header`` are
    the NIfTI originals (nibabel axis order) and are reused when a result is written as NIfTI.
    """

    data: np.ndarray
    spacing: tuple[float, ...] = ()
    affine: np.ndarray | None = None
    header: Any = None
    path: Path | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.spacing:
            self.spacing = (1.0,) * self.data.ndim

    @property
    def name(self) -> str:
        return strip_suffix(self.path) if self.path else "image"

    @property
    def rgb(self) -> bool | None:
        """Whether the last axis is colour, as the file says (NIfTI never, TIFF by its samples per
        pixel, a picture by its shape); None where the file cannot tell (``.npy``)."""
        return self.extra.get("rgb")


def strip_suffix(path: str | Path) -> str:
    """File name without its image suffix (``.nii.gz`` counts as one)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES + TIFF_SUFFIXES + PICTURE_SUFFIXES + (".npy", ".npz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def image_format(path: str | Path) -> str:
    """``"nifti" | "tiff" | "npy" | "picture"``, or an ``OpenSegError`` naming the supported suffixes."""
    name = str(path).lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(TIFF_SUFFIXES):
        return "tiff"
    if name.endswith(".npy"):
        return "npy"
    if name.endswith(PICTURE_SUFFIXES):
        return "picture"
    raise OpenSegError(f"{path}: unsupported file type; use .nii/.nii.gz, .tif/.tiff, .npy or .png/.jpg")


def result_path(folder: str | Path, source: str | Path, tag: str) -> Path:
    """Where the result of ``source`` goes in ``folder``: ``<source name>_<tag><suffix>``, the suffix
    by the source's format (:data:`OUTPUT_SUFFIX`)."""
    return Path(folder) / f"{strip_suffix(source)}_{tag}{OUTPUT_SUFFIX[image_format(source)]}"


def read_image(path: str | Path) -> ImageData:
    """Read an image or label file into an :class:`ImageData`.

    The size a file declares is checked against what it can hold and the memory budget before it is
    read (:mod:`.file_limits`); a ``.nii.gz`` is read to the end of its gzip stream, so that a damaged
    file is refused rather than read with wrong values. Files with no voxels, or with values that are
    not numbers, are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise OpenSegError(f"{path}: no such file")
    kind = image_format(path)
    try:
        if kind == "nifti":
            image = _read_nifti(path)
        elif kind == "tiff":
            image = _read_tiff(path)
        elif kind == "npy":
            image = ImageData(read_npy(path), path=path)
        else:
            image = _read_picture(path)
    except OpenSegError:
        raise
    except MemoryError as err:
        raise OpenSegError(f"{path}: there is not enough memory to read it") from err
    except Exception as err:  # nibabel/tifffile/imageio raise many types for a damaged file
        raise OpenSegError(f"{path}: could not be read as {kind} ({err or type(err).__name__})") from err
    if image.data.dtype.kind not in "biufc":
        raise OpenSegError(f"{path} holds {image.data.dtype} values, not numbers")
    if image.data.size == 0:
        raise OpenSegError(f"{path} holds no voxels (its shape is {image.data.shape})")
    return image


def _read_nifti(path: Path) -> ImageData:
    import nibabel as nib

    img = nib.load(str(path))  # the header only
    compressed = path.name.lower().endswith(".gz")
    _check_nifti_size(img, path, compressed)
    if compressed:
        data = _read_verified_gzip(path, type(img))
    else:
        data = _scaled_nifti_data(img)
    # a 3D scan saved as "X Y Z 1" (one time point) is a volume: singleton axes past the third go
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    # some converters store 0 for a 4th axis (no repetition time): a scale must be positive
    zooms = tuple(float(z) if z > 0 else 1.0 for z in img.header.get_zooms()[: data.ndim])
    return ImageData(
        data=np.ascontiguousarray(data.transpose(tuple(range(data.ndim))[::-1])),
        spacing=zooms[::-1],
        affine=np.asarray(img.affine, dtype=np.float64),
        header=img.header,
        path=path,
        extra={"rgb": False},
    )


def _check_nifti_size(img, path: Path, compressed: bool) -> None:
    """Refuse a header that declares more voxels than the file can hold or the memory budget allows."""
    header = img.header
    shape, dtype = tuple(int(s) for s in header.get_data_shape()), header.get_data_dtype()
    nbytes, end = array_bytes(shape, dtype), int(header.get_data_offset()) + array_bytes(shape, dtype)
    what = f"its header declares {describe_array(shape, dtype)}"
    if not math.prod(shape):
        raise OpenSegError(f"{path} holds no voxels (its header's shape is {'x'.join(map(str, shape))})")
    size = path.stat().st_size
    if compressed:
        check_stored_size(end, size, path, what, MAX_DEFLATE_EXPANSION)
    else:
        check_stored_size(end, size, path, what)
    slope, inter = header.get_slope_inter()
    scaled = (slope not in (None, 1.0) or inter not in (None, 0.0)) and dtype.kind in "iu"
    check_budget(nbytes + (math.prod(shape) * (4 if dtype.itemsize <= 2 else 8) if scaled else 0), path, what)


class _GzipReader(gzip.GzipFile):
    """A gzip stream whose ``readinto`` fills the buffer a chunk at a time (the default reads a
    whole-size temporary first)."""

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            block = self.read(min(CHUNK, len(view) - done))
            if not block:
                break
            view[done : done + len(block)] = block
            done += len(block)
        return done


def _read_verified_gzip(path: Path, image_class) -> np.ndarray:
    """The voxels of a ``.nii.gz``, read in one pass that goes on to the end of the gzip stream, where
    its CRC-32 and length are checked (nibabel alone stops after the voxels and misses damage)."""
    import nibabel as nib

    try:
        with open(path, "rb") as raw, _GzipReader(fileobj=raw, mode="rb") as stream:
            holder = nib.FileHolder(filename=str(path), fileobj=stream)
            img = image_class.from_file_map({"header": holder, "image": holder})
            data = _scaled_nifti_data(img)
            end = int(img.header.get_data_offset()) + data.size * img.get_data_dtype().itemsize
            if drain(stream, limit=max(end, EXPANSION_FLOOR)) > max(end, EXPANSION_FLOOR):
                raise OpenSegError(
                    f"{path}: its compressed stream holds far more data than its header "
                    "declares; the file is damaged or not what it seems"
                )
    except (OSError, EOFError, zlib.error) as err:
        raise OpenSegError(
            f"{path} is damaged: its gzip stream does not check out ({err}); nothing was read"
        ) from err
    return data


def _scaled_nifti_data(img) -> np.ndarray:
    """The voxel values; stored 8- or 16-bit integers with a scale (``scl_slope``/``scl_inter``)
    come as float32, which holds them exactly enough, instead of nibabel's float64 (twice the memory)."""
    proxy = img.dataobj
    stored = img.get_data_dtype()
    slope, inter = float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))
    if (slope, inter) != (1.0, 0.0) and stored.kind in "iu" and stored.itemsize <= 2:
        return np.asarray(proxy, dtype=np.float32)
    return np.asanyarray(proxy)


def _read_tiff(path: Path) -> ImageData:
    import tifffile

    with tifffile.TiffFile(str(path)) as tif:
        _check_tiff_size(tif, path)
        data = tif.asarray()
        if len(tif.series) > 1:
            log.warning(
                "%s holds %d image series; reading the first, of shape %s", path, len(tif.series), data.shape
            )
        spacing = [1.0] * data.ndim
        # ImageJ files keep the Z spacing in their description, and so do this module's other TIFFs
        meta = tif.imagej_metadata or (tif.shaped_metadata or [{}])[0] or {}
        page = tif.pages[0]
        offset = int(getattr(page, "samplesperpixel", 1) > 1 and data.ndim >= 3)  # RGB(A): colour comes last
        res = page.tags.get("XResolution"), page.tags.get("YResolution")
        if all(r is not None for r in res) and data.ndim >= 2 + offset:
            for axis, tag in zip((-1 - offset, -2 - offset), res):
                num, den = tag.value
                if num:
                    spacing[axis] = den / num
        if "spacing" in meta and data.ndim >= 3 + offset:
            spacing[-3 - offset] = float(meta["spacing"])
        for axis, size in _ome_pixel_sizes(tif.ome_metadata if tif.is_ome else None).items():
            if data.ndim >= -axis + offset:
                spacing[axis - offset] = size
    extra: dict[str, Any] = {"rgb": bool(offset)}
    if isinstance(meta.get("unit"), str):
        extra["unit"] = meta["unit"]
    return ImageData(data=data, spacing=tuple(spacing), path=path, extra=extra)


def _check_tiff_size(tif, path: Path) -> None:
    """Refuse a first series that declares more than the file (uncompressed) or the budget holds."""
    series = tif.series[0]
    what = f"its first series declares {describe_array(series.shape, series.dtype)}"
    nbytes = array_bytes(series.shape, series.dtype)
    compression = int(getattr(series.keyframe, "compression", 1))
    if compression == 1:  # stored plainly
        check_stored_size(nbytes, path.stat().st_size, path, what)
    elif compression in (8, 32946):  # deflate
        check_stored_size(nbytes, path.stat().st_size, path, what, MAX_DEFLATE_EXPANSION)
    check_budget(nbytes, path, what)


def _ome_pixel_sizes(ome_xml: str | None) -> dict[int, float]:
    """OME-TIFF physical pixel sizes of the first image, by axis from the end (-1 X, -2 Y, -3 Z)."""
    if not ome_xml:
        return {}
    import xml.etree.ElementTree as ElementTree

    try:
        root = ElementTree.fromstring(ome_xml)
    except ElementTree.ParseError:
        log.warning("the OME-XML of this TIFF could not be parsed; pixel sizes default to 1")
        return {}
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    sizes = {}
    for axis, name in ((-1, "PhysicalSizeX"), (-2, "PhysicalSizeY"), (-3, "PhysicalSizeZ")):
        raw = pixels.get(name) if pixels is not None else None
        try:
            value = float(raw) if raw else 0.0
        except ValueError:
            value = 0.0
        if value > 0:
            sizes[axis] = value
    return sizes


def _read_picture(path: Path) -> ImageData:
    import imageio.v3 as iio

    properties = iio.improps(path)  # the header: shape and type, no pixels
    check_budget(
        array_bytes(properties.shape, properties.dtype),
        path,
        f"its header declares {describe_array(properties.shape, properties.dtype)}",
    )
    data = np.asarray(iio.imread(path))
    return ImageData(data=data, path=path, extra={"rgb": data.ndim == 3 and data.shape[-1] in (3, 4)})


def check_writable(
    path: str | Path, overwrite: bool = False, image: bool = False, inputs: Iterable[str | Path] = ()
) -> Path:
    """Refuse, before any work is done, an output that cannot be written (see
    :func:`~napari_openseg.output_files.check_output`); with ``image``, also a file type
    :func:`write_image` cannot write."""
    path = Path(path)
    if image:
        _writable_format(path)
    return check_output(path, overwrite, inputs)


def write_image(
    path: str | Path,
    data: np.ndarray,
    reference: ImageData | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``data`` (in this module's array order) to NIfTI, TIFF or NPY, atomically.

    For NIfTI, the reference's affine and header are kept (with the header's data type set to
    ``data``'s); without a reference the spacing is 1 and the affine the identity.
    """
    path = Path(path)
    kind = _writable_format(path)
    with atomic_path(path, overwrite) as tmp:
        if kind == "nifti":
            _write_nifti(tmp, data, reference)
        elif kind == "tiff":
            _write_tiff(tmp, data, reference)
        else:
            with open(tmp, "wb") as handle:
                np.save(handle, data, allow_pickle=False)
    log.info("wrote %s", path)
    return path


def _writable_format(path: Path) -> str:
    kind = image_format(path)
    if kind == "picture":
        raise OpenSegError(f"{path}: results are written as .nii.gz, .tif or .npy, not pictures")
    return kind


def _write_nifti(tmp: Path, data: np.ndarray, reference: ImageData | None) -> None:
    import nibabel as nib

    data = _nifti_array(np.asarray(data))
    native = data.transpose(tuple(range(data.ndim))[::-1])  # a view: NIfTI stores this (Fortran) order anyway
    if reference is not None and reference.affine is not None:
        header = reference.header.copy() if reference.header is not None else None
        img = nib.Nifti1Image(native, reference.affine, header=header, dtype=native.dtype)
        if header is None and data.ndim > 3:  # the affine holds 3 axes; the others' spacing goes in the zooms
            zooms = list(img.header.get_zooms())
            zooms[3:] = reference.spacing[::-1][3 : data.ndim]
            img.header.set_zooms(zooms)
    else:
        affine = np.eye(4)
        spacing = (reference.spacing if reference else (1.0,) * data.ndim)[::-1]
        for axis, step in enumerate(spacing[:3]):
            affine[axis, axis] = step
        img = nib.Nifti1Image(native, affine, dtype=native.dtype)
    img.set_data_dtype(native.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    nib.save(img, str(tmp))


def smallest_integer_array(data: np.ndarray) -> np.ndarray:
    """Integer (or bool) ``data`` in the smallest type that holds its values, unsigned when none is
    negative; values beyond 32 bits keep their type."""
    if data.dtype == bool:
        return data.astype(np.uint8)
    if data.size == 0:
        return data
    low, high = int(data.min()), int(data.max())
    for kind in (np.uint8, np.uint16, np.uint32) if low >= 0 else (np.int8, np.int16, np.int32):
        if np.iinfo(kind).min <= low and high <= np.iinfo(kind).max:
            return data.astype(kind, copy=False)
    return data


def _nifti_array(data: np.ndarray) -> np.ndarray:
    """``data`` in a type NIfTI tools read: float16 as float32, bool and 64-bit integers as the
    smallest integer type that holds them."""
    if data.dtype == np.float16:
        return data.astype(np.float32)
    if data.dtype in (bool, np.int64, np.uint64):
        return smallest_integer_array(data)
    return data


def _write_tiff(tmp: Path, data: np.ndarray, reference: ImageData | None) -> None:
    """The last axes are the reference's spatial ones; one leading axis more (per-task probabilities)
    is written as ImageJ's first hyperstack axis, T (ImageJ wants C after Z, which would reorder the
    array), so that the Z spacing survives."""
    import tifffile

    data = data.astype(np.uint8) if data.dtype == bool else data
    if reference is None:
        spatial = min(data.ndim, 3)
        spacing = (1.0,) * spatial
    else:
        axes = (
            reference.spacing[:-1] if reference.extra.get("rgb") else reference.spacing
        )  # colour is not space
        spatial = min(len(axes), data.ndim)
        spacing = axes[len(axes) - spatial :]
    channels = data.ndim - spatial
    kwargs: dict[str, Any] = {}
    if spatial >= 2 and all(s > 0 for s in spacing[-2:]):
        kwargs["resolution"] = (1.0 / spacing[-1], 1.0 / spacing[-2])
    if data.ndim >= 3 and spatial in (2, 3) and channels <= 1:
        # ImageJ reads only these types; the others keep the same description in tifffile's own form
        kwargs["imagej"] = data.dtype in (np.uint8, np.uint16, np.float32)
        kwargs["metadata"] = {"axes": "T" * channels + "ZYX"[3 - spatial :]}
        if spatial == 3:
            kwargs["metadata"]["spacing"] = float(spacing[0])
        if reference is not None and "unit" in reference.extra:
            kwargs["metadata"]["unit"] = reference.extra["unit"]
    tifffile.imwrite(str(tmp), data, **kwargs)

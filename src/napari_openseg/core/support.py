"""Support sets: labelled example slices, one binary task per label value, with provenance.

A support set is built from an image and a labels array of the same shape (2D, or 3D with a slice
axis): every slice that contains a label value becomes an (image, mask) entry for that value. Images
are stored normalised to ``[0, 1]`` with the statistics of their whole source array, so that entries
from a volume match the way its other slices are normalised at segmentation time.

Strokes: with a ``background_label`` B, the labels are sparse: B marks background, other values
mark structures, and 0 marks pixels nobody painted. Each entry then keeps ``known``, its painted
pixels, and nothing is assumed about the rest (:mod:`.stacking` fits and scores on painted pixels
only). Without a background label every pixel is known, as before; :func:`coverage_warning` says
when masks look like strokes all the same.

File format (``.npz``, read with ``allow_pickle=False`` so loading never runs code): arrays
``image_<i>`` (float32) and ``mask_<i>`` (bool), version 2 adds ``known_<i>`` (bool, for stroke
entries) and ``colour_<i>`` (float16 ``"H W 3"``, for colour images); plus ``openseg_support``
holding a JSON string with the format name, version and per-entry metadata. A set with neither is
written as version 1, so that older versions of napari-openseg still read it; version 1 files are
read as whole masks without colour. Files are written atomically.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from napari_openseg import __version__
from napari_openseg.core.axes import axis_text, shape_text
from napari_openseg.core.preprocess import colour_channels, normalize_intensity, to_single_channel
from napari_openseg.errors import OpenSegError
from napari_openseg.file_limits import MAX_SUPPORT_EXPANSION, read_npz
from napari_openseg.io import atomic_path

log = logging.getLogger(__name__)

FORMAT_NAME = "napari-openseg support set"
#: The newest format this version reads and writes (sets without strokes or colour are written as 1).
FORMAT_VERSION = 2
METADATA_KEY = "openseg_support"
SUPPORT_FILE = "napari-openseg support-set file"
#: Without a background label, a mask covering less than this share of its bounding box is
#: reported by :func:`coverage_warning` (it may be strokes, whose unpainted pixels count as background).
SPARSE_COVERAGE = 0.15


@dataclass
class SupportEntry:
    """One example: ``image "H W"`` float32 in [0, 1] and ``mask "H W"`` bool for ``label``.

    ``known "H W"`` (bool) marks the painted pixels of an entry painted with strokes: the mask is
    only true there, and pixels outside it are unknown, not background; ``None`` means every pixel
    is known (a whole mask). ``colour "H W 3"`` (float32 in [0, 1]) holds the colour channels of a
    colour image (``image`` is their luminance), for the pixel classifier."""

    image: np.ndarray
    mask: np.ndarray
    label: int
    source: str = "image"
    slice_index: int | None = None
    axis: int | None = None
    known: np.ndarray | None = None
    colour: np.ndarray | None = None

    def describe(self) -> dict:
        return {
            "label": int(self.label),
            "source": self.source,
            "slice_index": None if self.slice_index is None else int(self.slice_index),
            "axis": None if self.axis is None else int(self.axis),
            "shape": list(self.image.shape),
            "foreground": int(self.mask.sum()),
            "painted": None if self.known is None else int(self.known.sum()),
            "colour": self.colour is not None,
        }


@dataclass
class SupportSet:
    """An ordered collection of :class:`SupportEntry`; each label value is one task."""

    entries: list[SupportEntry] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def labels(self) -> list[int]:
        """Label values that have at least one entry, ascending."""
        return sorted({e.label for e in self.entries})

    def counts(self) -> dict[int, int]:
        """Number of entries per label value."""
        counts: dict[int, int] = {}
        for entry in self.entries:
            counts[entry.label] = counts.get(entry.label, 0) + 1
        return dict(sorted(counts.items()))

    def task(self, label: int) -> list[SupportEntry]:
        """Entries of one task (label value)."""
        return [e for e in self.entries if e.label == label]

    def extend(self, entries: Iterable[SupportEntry]) -> None:
        self.entries.extend(entries)

    def remove(self, index: int) -> SupportEntry:
        if not 0 <= index < len(self.entries):
            raise OpenSegError(f"no support entry {index}; the set has {len(self.entries)}")
        return self.entries.pop(index)

    def validate(self, labels: Sequence[int] | None = None) -> list[int]:
        """Check the set is usable for ``labels`` (default: all); return the task label values."""
        if not self.entries:
            raise OpenSegError("the support set is empty: add labelled slices (or load a support file) first")
        wanted = self.labels if labels is None else [int(v) for v in labels]
        for value in wanted:
            task = self.task(value)
            if not task:
                raise OpenSegError(
                    f"the support set has no entries for label {value}; it has labels {self.labels}"
                )
            if not any(e.mask.any() for e in task):
                raise OpenSegError(
                    f"task {value} has no foreground in any of its {len(task)} entries; "
                    "paint the structure on at least one slice"
                )
        _check_entries(self.entries, wanted)
        return wanted

    def sample(self, label: int, size: int, rng: np.random.Generator) -> list[SupportEntry]:
        """``size`` entries of task ``label`` drawn without replacement (all of them if fewer)."""
        task = self.task(label)
        if size >= len(task):
            return task
        return [task[i] for i in sorted(rng.choice(len(task), size=size, replace=False))]

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the set to one ``.npz`` file, atomically."""
        if not self.entries:
            raise OpenSegError("refusing to save an empty support set")
        path = Path(path)
        if path.suffix.lower() != ".npz":
            raise OpenSegError(f"{path}: a support set is saved as a .npz file")
        _check_entries(self.entries)  # a file that load() would refuse is never written
        extended = any(e.known is not None or e.colour is not None for e in self.entries)
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION if extended else 1,
            "written_by": f"napari-openseg {__version__}",
            "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "metadata": self.metadata,
            "entries": [e.describe() for e in self.entries],
        }
        arrays = {METADATA_KEY: np.array(json.dumps(meta))}
        for i, entry in enumerate(self.entries):
            arrays[f"image_{i}"] = entry.image.astype(np.float32, copy=False)
            arrays[f"mask_{i}"] = entry.mask.astype(bool, copy=False)
            if entry.known is not None:
                arrays[f"known_{i}"] = entry.known.astype(bool, copy=False)
            if entry.colour is not None:
                arrays[f"colour_{i}"] = entry.colour.astype(np.float16)
        with atomic_path(path, overwrite) as tmp, open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> SupportSet:
        """Read a file written by :meth:`save`; foreign or damaged files raise ``OpenSegError``.

        Sizes are checked before arrays are read (:func:`~napari_openseg.file_limits.read_npz`): a
        damaged or crafted file is refused without the memory it declares being allocated.
        """
        path = Path(path)
        if not path.is_file():
            raise OpenSegError(f"{path}: no such support-set file")
        _check_is_archive(path)
        try:
            found = read_npz(path, [METADATA_KEY], MAX_SUPPORT_EXPANSION, SUPPORT_FILE)
            if METADATA_KEY not in found or found[METADATA_KEY].dtype.kind != "U":
                raise OpenSegError(f"{path} is not a napari-openseg support-set file")
            meta = json.loads(str(found[METADATA_KEY]))
            _check_format(meta, path)
            infos = meta.get("entries")
            if not isinstance(infos, list) or not all(isinstance(info, dict) for info in infos):
                raise OpenSegError(f"{path}: its list of entries is damaged")
            names = [
                f"{kind}_{i}" for i in range(len(infos)) for kind in ("image", "mask", "known", "colour")
            ]
            arrays = read_npz(path, names, MAX_SUPPORT_EXPANSION, SUPPORT_FILE)
            entries = [_entry_from_file(arrays, i, info, path) for i, info in enumerate(infos)]
            metadata = meta.get("metadata", {})
            if not isinstance(metadata, dict):
                raise OpenSegError(f"{path}: its metadata is not a mapping; the file may be damaged")
        except OpenSegError:
            raise
        except (ValueError, KeyError, TypeError, OverflowError) as err:
            # json.JSONDecodeError is a ValueError
            raise OpenSegError(
                f"{path} is not a readable napari-openseg support-set file ({err}); "
                "it may be damaged or of another kind"
            ) from err
        return cls(entries=entries, metadata=dict(metadata))


#: First bytes of a zip archive (what an ``.npz`` is): a local file header, or an empty archive.
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def _check_is_archive(path: Path) -> None:
    """Refuse a file that is not a zip archive before numpy reads it (numpy would call an image file
    pickled data, and suggest loading it unsafely)."""
    with open(path, "rb") as handle:
        start = handle.read(4)
    if start in ZIP_MAGIC:
        return
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")) or start[:2] == b"\x1f\x8b":
        kind = "a NIfTI image" if name.endswith((".nii", ".nii.gz")) else "a gzip file"
    elif start == b"\x93NUM":
        kind = "a single numpy array (.npy)"
    else:
        kind = "another kind of file"
    raise OpenSegError(
        f"{path} is {kind}, not a support-set file: support sets are .npz files written by "
        "`openseg support build` (from an image and its labels) or by the Support set widget's Save"
    )


def _check_format(meta: dict, path: Path) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise OpenSegError(f"{path} is not a napari-openseg support-set file")
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise OpenSegError(f"{path} has no valid format version ({version!r}); the file may be damaged")
    if version > FORMAT_VERSION:
        raise OpenSegError(
            f"{path} is support-set format version {version}; this napari-openseg reads up to "
            f"{FORMAT_VERSION}: upgrade napari-openseg"
        )


def _entry_from_file(arrays: dict[str, np.ndarray], index: int, info: dict, path: Path) -> SupportEntry:
    image, mask = arrays.get(f"image_{index}"), arrays.get(f"mask_{index}")
    if image is None or mask is None:
        raise OpenSegError(f"{path}: entry {index} has no image or mask array; the file is damaged")
    known, colour = arrays.get(f"known_{index}"), arrays.get(f"colour_{index}")
    known = None if known is None else known.astype(bool)
    colour = None if colour is None else colour.astype(np.float32)
    problem = _entry_problem(image, mask, info.get("label"), known, colour)
    if problem is None and mask.dtype != bool and not np.isin(mask, (0, 1)).all():
        problem = f"has a mask of {mask.dtype} values other than 0 and 1"
    if problem:
        raise OpenSegError(f"{path}: entry {index} {problem}; the file may be damaged")
    return SupportEntry(
        image=image.astype(np.float32, copy=False),
        mask=mask.astype(bool, copy=False),
        label=int(info["label"]),
        source=str(info.get("source", "image")),
        slice_index=info.get("slice_index"),
        axis=info.get("axis"),
        known=known,
        colour=colour,
    )


def _entry_problem(
    image: np.ndarray,
    mask: np.ndarray,
    label: int,
    known: np.ndarray | None = None,
    colour: np.ndarray | None = None,
) -> str | None:
    """What makes an entry unusable (the same rules on saving, loading and segmenting), or None."""
    image, mask = np.asarray(image), np.asarray(mask)
    if image.ndim != 2 or image.shape != mask.shape:
        return f"has image {image.shape} and mask {mask.shape}"
    if image.size == 0:
        return f"is empty (shape {image.shape})"
    if image.dtype.kind not in "biuf":
        return f"has an image of {image.dtype} values; support images are real numbers in [0, 1]"
    if mask.dtype.kind not in "biuf":
        return f"has a mask of {mask.dtype} values"
    if not np.all(np.isfinite(image)):
        return "has an image that holds NaN or infinite values"
    low, high = float(image.min()), float(image.max())
    if low < 0.0 or high > 1.0:
        return (
            f"has image values from {low:g} to {high:g}; support images are normalised to [0, 1] "
            "(build entries with entries_from_arrays)"
        )
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 1 <= int(label) < 2**63:
        return f"has label value {label!r}; task labels are positive whole numbers below 2**63"
    if known is not None and (
        np.shape(known) != image.shape or np.any(np.asarray(mask) & ~np.asarray(known))
    ):
        return "has painted pixels that do not match its mask (shape, or mask pixels not painted)"
    if colour is not None and (np.shape(colour) != (*image.shape, 3) or not np.all(np.isfinite(colour))):
        return f"has colour channels of shape {np.shape(colour)} (or not finite) for an image {image.shape}"
    return None


def _check_entries(entries: Sequence[SupportEntry], labels: Iterable[int] | None = None) -> None:
    """Refuse the first unusable entry (of the tasks ``labels``, default all) by its position."""
    wanted = None if labels is None else set(labels)
    for index, entry in enumerate(entries):
        if wanted is not None and entry.label not in wanted:
            continue
        problem = _entry_problem(entry.image, entry.mask, entry.label, entry.known, entry.colour)
        if problem:
            raise OpenSegError(
                f"support entry {index} (label {entry.label}, from {entry.source}) {problem}; "
                "build it again from its image and labels"
            )


def check_labels(labels: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Return ``labels`` as a non-negative integer array, or explain what is wrong with it."""
    labels = np.asarray(labels)
    if shape is not None and labels.shape != tuple(shape):
        raise OpenSegError(
            f"labels of shape {shape_text(labels.shape)} do not match the image of shape {shape_text(shape)}; "
            "pick the labels layer painted on this image"
        )
    if labels.dtype == bool:
        return labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.issubdtype(labels.dtype, np.floating) or not np.all(np.isfinite(labels)):
            raise OpenSegError(f"labels must hold integer label values, got dtype {labels.dtype}")
        if not np.all(np.mod(labels, 1) == 0):
            raise OpenSegError(
                "labels must hold whole-number label values; this array has fractional values "
                "(is it a probability map or an image?)"
            )
        if labels.size and labels.max() >= 2.0**63:  # the cast below would wrap them to negatives
            raise OpenSegError(f"label value {labels.max():.0f} is beyond 64-bit labels; renumber the labels")
        labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise OpenSegError("label values must be 0 (background) or positive")
    return labels


def check_image(image: np.ndarray, rgb: bool | None = None) -> np.ndarray:
    """A single-channel 2D or 3D array, or an ``OpenSegError`` that says what was expected."""
    image = np.asarray(image)
    if image.dtype.kind not in "biuf":
        raise OpenSegError(f"images must hold real-valued numbers, got {image.dtype} values")
    image = to_single_channel(image, rgb)
    if image.ndim not in (2, 3):
        raise OpenSegError(
            f"expected a 2D image (H W) or a 3D volume (Z H W), got an array of shape {shape_text(image.shape)}; "
            "split channels or time points into separate images first"
        )
    if image.size == 0:
        raise OpenSegError(f"the image is empty (shape {image.shape}): it has no voxels to segment")
    if not has_finite_values(image):
        raise OpenSegError(
            "the image holds no finite values (all NaN or infinite): there is nothing to segment"
        )
    return image


def has_finite_values(image: np.ndarray) -> bool:
    """Whether any value is finite; read a slab at a time (a volume-sized mask is not needed)."""
    if image.dtype.kind != "f":
        return True
    slabs = image.reshape(image.shape[0], -1) if image.ndim else image.reshape(1, 1)
    step = max(1, (1 << 24) // max(1, slabs.shape[1]))
    return any(np.isfinite(slabs[i : i + step]).any() for i in range(0, slabs.shape[0], step))


def entries_from_arrays(
    image: np.ndarray,
    labels: np.ndarray,
    *,
    axis: int = 0,
    source: str = "image",
    label_values: Sequence[int] | None = None,
    slice_indices: Sequence[int] | None = None,
    rgb: bool | None = None,
    background_label: int | None = None,
) -> list[SupportEntry]:
    """Entries for every (slice, label value) pair where the value occurs.

    ``image`` and ``labels`` are ``"H W"`` or ``"Z H W"`` (any axis order, chosen by ``axis``).
    ``label_values`` restricts the tasks; ``slice_indices`` restricts the slices (e.g. the one on
    screen). With ``background_label`` B the labels are strokes: B is background, 0 is unpainted, and
    each entry keeps its painted pixels (``known``). Raises ``OpenSegError`` for shapes, dtypes or
    empty labels.
    """
    grey = check_image(image, rgb)  # first: it names what is wrong with the array
    colour = colour_channels(image, rgb)
    image = grey
    labels = check_labels(labels, image.shape)
    normalized = normalize_intensity(image)
    if image.ndim == 2:
        stack_img, stack_lab, indices, axis_used = normalized[None], labels[None], [None], None
        stack_colour = None if colour is None else colour[None]
    else:
        if not -3 <= axis < 3:
            raise OpenSegError(f"slice axis must be 0, 1 or 2 for a 3D volume, got {axis}")
        axis_used = axis % 3
        stack_img = np.moveaxis(normalized, axis_used, 0)
        stack_lab = np.moveaxis(labels, axis_used, 0)
        stack_colour = None if colour is None else np.moveaxis(colour, axis_used, 0)
        indices = list(range(stack_img.shape[0]))
    if slice_indices is not None:
        if image.ndim == 2:
            raise OpenSegError("slice indices only apply to 3D volumes")
        bad = [i for i in slice_indices if not 0 <= int(i) < stack_img.shape[0]]
        if bad:
            raise OpenSegError(
                f"slice index {bad[0]} is outside 0..{stack_img.shape[0] - 1} along {axis_text(axis_used)}"
            )
        indices = sorted({int(i) for i in slice_indices})
    present = set(np.unique(labels).tolist()) - {0}
    wanted = _wanted_values(present, label_values, background_label)
    entries = []
    for index in indices:
        plane_index = 0 if index is None else index
        plane_labels = stack_lab[plane_index]
        known = None if background_label is None else plane_labels != 0
        for value in wanted:
            mask = plane_labels == value
            if mask.any():
                entries.append(
                    SupportEntry(
                        image=np.ascontiguousarray(stack_img[plane_index]),
                        mask=mask,
                        label=value,
                        source=source,
                        slice_index=index,
                        axis=axis_used,
                        known=known,
                        colour=None
                        if stack_colour is None
                        else np.ascontiguousarray(stack_colour[plane_index]),
                    )
                )
    if not entries:
        raise OpenSegError("the chosen slices contain none of the chosen label values")
    if background_label is not None and not any(np.any(e.known & ~e.mask) for e in entries):
        raise OpenSegError(
            f"no background is painted with the background label {background_label} on the chosen "
            "slices: paint some background with it (strokes are enough)"
        )
    log.info("built %d support entries from %s", len(entries), source)
    return entries


def painted_across(
    labels: np.ndarray, axis: int, index: int, values: Iterable[int]
) -> tuple[int, int, list[int]] | None:
    """Whether slice ``index`` along ``axis`` of a ``"Z H W"`` labels volume only cuts across slices
    painted along another axis (a transposed view): ``(value, other_axis, painted_slices)`` for the
    first such label value, else ``None``.

    A value is painted across when, in this slice, its voxels lie on lines one voxel wide, none next
    to another, along one of the two other axes, while the slices of that axis through those lines
    hold more of the value than the lines do (the painted planes). Such a "mask" is a cut through
    the user's painting, not an example of the structure.
    """
    labels = np.asarray(labels)
    axis = axis % labels.ndim
    plane = np.take(labels, index, axis=axis)
    others = [a for a in range(labels.ndim) if a != axis]
    for value in values:
        here = plane == value
        count = int(here.sum())
        if count == 0:
            continue
        for plane_axis, other in enumerate(others):
            lines = np.flatnonzero(here.any(axis=1 - plane_axis))
            if np.any(np.diff(lines) == 1):
                continue  # neighbouring lines: an area painted in this plane, not a cut
            across = int((np.take(labels, lines, axis=other) == value).sum())
            if across > 2 * count:
                return int(value), other, [int(i) for i in lines]
    return None


def _wanted_values(
    present: set[int], label_values: Sequence[int] | None, background: int | None
) -> list[int]:
    """The task values: ``label_values`` (or every painted value) without the background label."""
    if background is not None:
        if int(background) < 1:
            raise OpenSegError(
                f"the background label must be a painted value (1 or more), got {background}; "
                "0 marks unpainted pixels"
            )
        if int(background) not in present:
            raise OpenSegError(
                f"the background label {background} is not painted; painted labels: {sorted(present)}"
            )
        if label_values is not None and int(background) in {int(v) for v in label_values}:
            raise OpenSegError(f"label {background} is the background label, not a task")
        present = present - {int(background)}
    if not present:
        raise OpenSegError(
            "the labels contain no foreground (all zero): paint at least one slice"
            if background is None
            else "only the background is painted: paint a structure too"
        )
    wanted = sorted(present) if label_values is None else [int(v) for v in label_values]
    missing = [v for v in wanted if v not in present]
    if missing:
        raise OpenSegError(
            f"label value {missing[0]} does not occur in the labels; present: {sorted(present)}"
        )
    return wanted


def coverage_warning(entries: Sequence[SupportEntry], share: float = SPARSE_COVERAGE) -> str | None:
    """A warning when whole-mask entries (no background label) look like strokes: a mask covering
    under ``share`` of its bounding box. Thin structures (vessels, membranes) may do so legitimately."""
    sparse: dict[int, int] = {}
    for entry in entries:
        if entry.known is not None or not entry.mask.any():
            continue
        rows, cols = np.flatnonzero(entry.mask.any(axis=1)), np.flatnonzero(entry.mask.any(axis=0))
        box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        if entry.mask.sum() < share * box:
            sparse[entry.label] = sparse.get(entry.label, 0) + 1
    if not sparse:
        return None
    which = ", ".join(f"label {v} on {n} slice{'s' if n != 1 else ''}" for v, n in sorted(sparse.items()))
    return (
        f"{which}: the mask covers under {share:.0%} of its bounding box. If these are strokes, every "
        "unpainted pixel counts as background: paint some background with a label of its own and choose "
        "it as the background label (unpainted pixels then count as unknown), or fill the structures. "
        "Thin structures such as vessels can look like this and need nothing."
    )


def build_support_set(image: np.ndarray, labels: np.ndarray, **kwargs) -> SupportSet:
    """A new :class:`SupportSet` from one image and its labels; see :func:`entries_from_arrays`."""
    return SupportSet(entries=entries_from_arrays(image, labels, **kwargs))


def label_dtype(max_label: int) -> np.dtype:
    """Smallest unsigned type that holds every label value."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_label <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    if max_label > np.iinfo(np.int64).max:
        raise OpenSegError(f"label value {max_label} is beyond 64-bit labels; renumber the labels")
    return np.dtype(np.int64)


def load_support(support: SupportSet | str | Path) -> SupportSet:
    """A support set, or the one stored in a file."""
    if isinstance(support, SupportSet):
        return support
    if isinstance(support, (str, Path)):
        return SupportSet.load(support)
    raise OpenSegError(
        f"support must be a SupportSet or the path of a support-set file, got {type(support).__name__}"
    )

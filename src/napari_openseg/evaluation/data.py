"""Labelled folders for evaluation, their support/query split, and the tasks they hold.

Two layouts are recognised:

* ``images/`` + ``masks/``: 2D pictures (PNG, JPEG, TIFF; RGB or grey) paired by file stem, masks
  holding integer label values;
* ``imagesTr/`` + ``labelsTr/``: NIfTI volumes in the Medical Segmentation Decathlon layout,
  evaluated on 2D slices along each of the three axes.

Every label value (and, for volumes, every axis) is one task. Cases (images or subjects) are split
with :func:`~napari_openseg.training.splits.split_subjects` (sorted, shuffled with a fixed seed,
70 / 15 / 15 %). Queries come from the test cases; support entries from the validation cases (or
from train + validation with ``support_split="train+val"``). Small folders: when no case lands in
test, one train case moves there; when validation is empty, support comes from train. A folder with
one volume is split by slices instead (:func:`single_volume_split`). Queries are the slices or
images in which the task's label occurs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_openseg.core.axes import shape_text
from napari_openseg.core.preprocess import colour_channels, normalize_intensity, to_single_channel
from napari_openseg.core.support import SupportEntry, check_labels, entries_from_arrays
from napari_openseg.errors import OpenSegError
from napari_openseg.io import PICTURE_SUFFIXES, TIFF_SUFFIXES, read_image, strip_suffix
from napari_openseg.training.splits import split_subjects

log = logging.getLogger(__name__)

#: A single volume is split by slices: queries from the central share of the slices holding the
#: label, support from the rest, at least this many slices away from any query slice.
SINGLE_VOLUME_QUERY_SHARE = 0.3
SINGLE_VOLUME_GAP = 5


@dataclass
class Case:
    """One labelled image or volume: ``image`` as read (single channel), ``labels`` integer, same
    shape; ``colour "H W 3"`` (normalised) for a colour picture."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    colour: np.ndarray | None = None


@dataclass
class Query:
    """One query slice: ``image "H W"`` normalised like at inference, ``mask "H W"`` bool, and
    ``colour "H W 3"`` for a colour picture."""

    case: str
    index: int | None
    image: np.ndarray
    mask: np.ndarray
    colour: np.ndarray | None = None


@dataclass
class EvalTask:
    """A task: a label value (and axis for volumes), its support pool and its queries."""

    label: int
    axis: int | None
    support: list[SupportEntry] = field(default_factory=list)
    queries: list[Query] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"label {self.label}" if self.axis is None else f"label {self.label}, axis {self.axis}"

    @property
    def key(self) -> str:
        return f"label_{self.label}" if self.axis is None else f"label_{self.label}/axis_{self.axis}"


@dataclass
class EvalFolder:
    """A recognised folder: its layout and the paired files by case name."""

    root: Path
    layout: str
    pairs: dict[str, tuple[Path, Path]]


def _files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    found = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.name.lower().endswith(suffixes):
            continue
        found[strip_suffix(path)] = path
    return found


def find_folder(root: str | Path) -> EvalFolder:
    """Recognise the layout of ``root`` and pair its images with their masks by file stem."""
    root = Path(root)
    if not root.is_dir():
        raise OpenSegError(f"{root} is not a folder")
    if (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir():
        layout, images, masks, suffixes = "msd", root / "imagesTr", root / "labelsTr", (".nii", ".nii.gz")
    elif (root / "images").is_dir() and (root / "masks").is_dir():
        layout, images, masks = "2d", root / "images", root / "masks"
        suffixes = PICTURE_SUFFIXES + TIFF_SUFFIXES
    else:
        raise OpenSegError(
            f"{root} holds neither images/ + masks/ (2D pictures paired by file stem) nor "
            "imagesTr/ + labelsTr/ (NIfTI volumes, Medical Segmentation Decathlon layout)"
        )
    image_files, mask_files = _files(images, suffixes), _files(masks, suffixes)
    paired = sorted(set(image_files) & set(mask_files))
    unpaired = sorted(set(image_files) ^ set(mask_files))
    if unpaired:
        log.warning("%s: %d file(s) without a partner are ignored, e.g. %s", root, len(unpaired), unpaired[0])
    if not paired:
        raise OpenSegError(f"{root}: no image has a mask with the same file stem in {masks.name}/")
    if layout == "2d" and len(paired) < 2:
        raise OpenSegError(f"{root}: evaluation needs at least 2 labelled images (support and query)")
    return EvalFolder(root, layout, {name: (image_files[name], mask_files[name]) for name in paired})


def read_case(folder: EvalFolder, name: str) -> Case:
    """Read one pair; RGB pictures become grey, RGB masks must have equal channels."""
    image_path, mask_path = folder.pairs[name]
    image = read_image(image_path).data
    labels = read_image(mask_path).data
    colour = None
    if folder.layout == "2d":
        colour = colour_channels(image)
        image = to_single_channel(image)
        if labels.ndim == 3 and labels.shape[-1] in (3, 4):
            if not all(np.array_equal(labels[..., 0], labels[..., c]) for c in range(1, 3)):
                raise OpenSegError(f"{mask_path}: a colour mask; masks must hold integer label values")
            labels = labels[..., 0]
        if image.ndim != 2:
            raise OpenSegError(f"{image_path}: expected a 2D picture, got shape {shape_text(image.shape)}")
    elif image.ndim != 3:
        raise OpenSegError(f"{image_path}: expected a 3D volume, got shape {shape_text(image.shape)}")
    labels = check_labels(labels, image.shape)
    return Case(name, image, labels, colour)


#: MSD Task04 subjects the bundled weights were trained on (train split) or chosen on (val split):
#: the split of the full 130-subject folder (``training.splits.hippocampus_splits``), kept here because
#: a folder with other subjects splits differently (tests check it against that folder).
BUNDLED_WEIGHTS_CASES = frozenset(
    f"hippocampus_{i:03d}"
    for i in (
        1,
        3,
        4,
        7,
        8,
        11,
        14,
        15,
        17,
        19,
        20,
        23,
        24,
        25,
        26,
        33,
        34,
        36,
        37,
        39,
        42,
        44,
        45,
        46,
        48,
        50,
        51,
        52,
        53,
        57,
        58,
        60,
        64,
        65,
        67,
        68,
        70,
        74,
        75,
        77,
        83,
        84,
        87,
        89,
        90,
        91,
        92,
        93,
        94,
        95,
        96,
        97,
        98,
        99,
        101,
        102,
        104,
        107,
        108,
        109,
        114,
        123,
        124,
        125,
        126,
        127,
        130,
        132,
        133,
        135,
        136,
        138,
        141,
        142,
        143,
        144,
        145,
        146,
        148,
        149,
        150,
        152,
        154,
        158,
        160,
        161,
        162,
        164,
        165,
        166,
        169,
        170,
        171,
        172,
        173,
        175,
        177,
        178,
        180,
        181,
        184,
        185,
        189,
        190,
        193,
        194,
        195,
        197,
        199,
        204,
        207,
    )
)


def split_cases(names: list[str], support_split: str = "val") -> tuple[list[str], list[str]]:
    """(support cases, query cases) of a folder with at least two cases; see the module docstring."""
    support, queries, _ = split_roles(names, support_split)
    return support, queries


def split_roles(names: list[str], support_split: str = "val") -> tuple[list[str], list[str], str]:
    """:func:`split_cases` and where the support really came from (``"train"`` when validation is empty)."""
    if support_split not in ("val", "train+val"):
        raise OpenSegError(f"support split must be 'val' or 'train+val', got {support_split!r}")
    parts = split_subjects(names)
    if not parts["test"]:
        parts["test"] = [parts["train"].pop()]
    support = parts["val"] if support_split == "val" else parts["train"] + parts["val"]
    if not support:
        return sorted(parts["train"]), sorted(parts["test"]), "train"
    return sorted(support), sorted(parts["test"]), support_split


def single_volume_split(slices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(support slices, query slices) among the sorted indices of slices that hold one label."""
    slices = np.sort(slices)
    n = len(slices)
    lo = int(np.floor(n * (1 - SINGLE_VOLUME_QUERY_SHARE) / 2))
    hi = max(lo + 1, int(np.ceil(n * (1 + SINGLE_VOLUME_QUERY_SHARE) / 2)))
    queries = slices[lo:hi]
    far = (slices < queries.min() - SINGLE_VOLUME_GAP) | (slices > queries.max() + SINGLE_VOLUME_GAP)
    return slices[far], queries


def _queries(case: Case, normalized: np.ndarray, value: int, axis: int | None, keep=None) -> list[Query]:
    if axis is None:
        mask = case.labels == value
        return [Query(case.name, None, normalized, mask, case.colour)] if mask.any() else []
    stack, labels = np.moveaxis(normalized, axis, 0), np.moveaxis(case.labels, axis, 0)
    present = np.flatnonzero((labels == value).reshape(len(labels), -1).any(axis=1))
    if keep is not None:
        present = np.intersect1d(present, keep)
    return [Query(case.name, int(i), stack[i], labels[i] == value) for i in present]


def _values(labels: np.ndarray, wanted: set[int] | None) -> list[int]:
    return [int(v) for v in np.unique(labels) if v != 0 and (wanted is None or int(v) in wanted)]


def build_tasks(
    folder: EvalFolder,
    support_split: str = "val",
    label_values: Iterable[int] | None = None,
    roles: tuple[list[str], list[str]] | None = None,
) -> Iterator[tuple[str, list[EvalTask]]]:
    """Tasks of the folder, for volumes one per (label, axis), optionally only for ``label_values``.

    ``roles`` gives the (support cases, query cases) explicitly, e.g. from the task bank's splits;
    by default they come from :func:`split_cases`. Yields ``(stage, [])`` after each case read and
    finally ``("tasks", tasks)``.
    """
    wanted = None if label_values is None else {int(v) for v in label_values}
    names = sorted(folder.pairs)
    axes: list[int | None] = [None] if folder.layout == "2d" else [0, 1, 2]
    tasks: dict[tuple[int, int | None], EvalTask] = {}

    def task(value: int, axis: int | None) -> EvalTask:
        return tasks.setdefault((value, axis), EvalTask(value, axis))

    if len(names) == 1 and roles is None:  # one volume: split by slices
        case = read_case(folder, names[0])
        normalized = normalize_intensity(case.image)
        values = _values(case.labels, wanted)
        for axis in axes if values else []:
            entries = entries_from_arrays(
                case.image, case.labels, axis=axis, source=case.name, label_values=values
            )
            for value in sorted({e.label for e in entries}):
                own = [e for e in entries if e.label == value]
                support_idx, query_idx = single_volume_split(np.array([e.slice_index for e in own]))
                t = task(value, axis)
                t.support = [e for e in own if e.slice_index in set(support_idx.tolist())]
                t.queries = _queries(case, normalized, value, axis, keep=query_idx)
        yield f"read {case.name}", []
    else:
        support_cases, query_cases = roles if roles is not None else split_cases(names, support_split)
        for name in support_cases:
            case = read_case(folder, name)
            values = _values(case.labels, wanted)
            for axis in axes if values else []:
                for entry in entries_from_arrays(
                    case.image, case.labels, axis=axis or 0, source=name, label_values=values
                ):
                    entry.colour = case.colour  # a 2D picture's colour (None for volumes)
                    task(entry.label, axis).support.append(entry)
            yield f"read {name}", []
        for name in query_cases:
            case = read_case(folder, name)
            normalized = normalize_intensity(case.image)
            for value in _values(case.labels, wanted):
                for axis in axes:
                    task(value, axis).queries.extend(_queries(case, normalized, value, axis))
            yield f"read {name}", []
    usable = [
        t
        for _, t in sorted(tasks.items(), key=lambda kv: (kv[0][0], -1 if kv[0][1] is None else kv[0][1]))
        if t.support and t.queries
    ]
    if not usable:
        if len(names) == 1:
            raise OpenSegError(
                f"{folder.root}: one case, split by slices, and no label spans enough slices to keep "
                f"support slices more than {SINGLE_VOLUME_GAP} slices away from the central queries"
            )
        asked = f" (asked for {sorted(wanted)})" if wanted else ""
        raise OpenSegError(
            f"{folder.root}: no label value{asked} occurs in both the support and the query cases"
        )
    yield "tasks", usable

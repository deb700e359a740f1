"""The task bank: every labelled data set in ``../shared/data``, its licence class and its splits.

The manifest (``task_bank.json`` beside this module) lists each set: layout (``"2d"``: ``images/`` +
``masks/`` paired by file stem; ``"3d"``: ``imagesTr/`` + ``labelsTr/`` NIfTI volumes), licence,
modality and a regular expression whose first group turns a file stem into a *case* (a subject, a
patient, a field of view: what must not straddle splits). Every label value of a set is a task; 3D
sets are sliced along all three axes.

Licence class: **permissive** (CC0, CC BY, CC BY-SA, Apache, BSD, MIT) may train weights that the
package bundles; anything else is **research** (validation and evaluation, or weights that are not
bundled). The class is derived from the licence text, never set by hand.

Splits are a pure function of (set, case): ``sha256("<set>:<case>")`` mapped to [0, 1) and cut at
the manifest's fractions (70 / 15 / 15), so adding or removing files never moves another case. A set
may pin cases (``assigned``: the hippocampus cases keep the split the earlier weights were trained
with) or put every case in one split (``fixed_split``: a single-subject set used for training only).
Folders with a known layout that the manifest does not list are found too (:func:`discover`) and
count as research until someone adds them: new sets need no code change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from napari_openseg.errors import OpenSegError

log = logging.getLogger(__name__)

MANIFEST = Path(__file__).with_name("task_bank.json")
SPLITS = ("train", "val", "test")
#: Licences whose terms allow training weights that are redistributed under BSD-3.
_PERMISSIVE = re.compile(r"^(CC0|CC-BY(-SA)?|Apache|BSD|MIT)\b", re.IGNORECASE)
_RESTRICTIVE = re.compile(r"-NC|-ND|research|not stated|registration", re.IGNORECASE)


def licence_class(licence: str) -> str:
    """``"permissive"`` or ``"research"`` for a licence name such as ``"CC-BY-4.0"``."""
    text = licence.strip()
    if _PERMISSIVE.match(text) and not _RESTRICTIVE.search(text):
        return "permissive"
    return "research"


def hashed_split(set_name: str, case: str, fractions: dict[str, float]) -> str:
    """The split of ``case``: a stable hash of ``"<set>:<case>"`` cut at the cumulative fractions."""
    digest = hashlib.sha256(f"{set_name}:{case}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for split in SPLITS[:-1]:
        edge += fractions[split]
        if position < edge:
            return split
    return SPLITS[-1]


@dataclass(frozen=True)
class DataSet:
    """One set of the manifest (or a discovered folder)."""

    name: str
    layout: str
    licence: str
    modality: str = "unknown"
    case_pattern: str = r"^(.+)$"
    family: str | None = None
    fixed_split: str | None = None
    assigned: dict[str, str] = field(default_factory=dict)  # case -> split
    attribution: str = ""
    note: str = ""
    fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15})
    listed: bool = True

    @property
    def licence_class(self) -> str:
        return licence_class(self.licence) if self.listed else "research"

    @property
    def task_family(self) -> str:
        """The family name tasks of this set carry (``hippocampus`` for MSD Task04, as before)."""
        return self.family or self.name

    def case_of(self, stem: str) -> str:
        match = re.search(self.case_pattern, stem)
        return match.group(1) if match and match.groups() else stem

    def split_of(self, stem: str) -> str:
        case = self.case_of(stem)
        if self.fixed_split:
            return self.fixed_split
        if case in self.assigned:
            return self.assigned[case]
        return hashed_split(self.name, case, self.fractions)


def load_manifest(path: str | Path = MANIFEST) -> dict[str, DataSet]:
    """The sets the manifest lists, by name."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise OpenSegError(f"{path}: not a readable task-bank manifest ({err})") from err
    fractions = data.get("fractions", {"train": 0.7, "val": 0.15, "test": 0.15})
    if set(fractions) != set(SPLITS) or abs(sum(fractions.values()) - 1) > 1e-6:
        raise OpenSegError(f"{path}: fractions must give train, val and test summing to 1, got {fractions}")
    sets = {}
    for name, entry in data["sets"].items():
        if entry.get("layout") not in ("2d", "3d"):
            raise OpenSegError(
                f"{path}: set {name} has layout {entry.get('layout')!r}; expected '2d' or '3d'"
            )
        if entry.get("fixed_split") not in (None, *SPLITS):
            raise OpenSegError(f"{path}: set {name} has fixed_split {entry['fixed_split']!r}")
        assigned = {case: split for split, cases in entry.get("assigned", {}).items() for case in cases}
        sets[name] = DataSet(
            name,
            entry["layout"],
            entry["licence"],
            entry.get("modality", "unknown"),
            entry.get("case", r"^(.+)$"),
            entry.get("family"),
            entry.get("fixed_split"),
            assigned,
            entry.get("attribution", ""),
            entry.get("note", ""),
            dict(fractions),
        )
    return sets


def _layout(folder: Path) -> str | None:
    if (folder / "images").is_dir() and (folder / "masks").is_dir():
        return "2d"
    if (folder / "imagesTr").is_dir() and (folder / "labelsTr").is_dir():
        return "3d"
    return None


def discover(data_dir: str | Path, manifest: dict[str, DataSet] | None = None) -> list[DataSet]:
    """Every set folder under ``data_dir``: the manifest's entry where it has one; an unlisted folder
    with a known layout as a research set (with a warning), so it is evaluated but never trained on."""
    manifest = load_manifest() if manifest is None else manifest
    found = []
    for folder in sorted(Path(data_dir).iterdir()):
        layout = _layout(folder) if folder.is_dir() else None
        if layout is None:
            continue
        if folder.name in manifest:
            found.append(manifest[folder.name])
        else:
            log.warning("%s is not in the task-bank manifest: treated as research-only", folder.name)
            found.append(DataSet(folder.name, layout, "unlisted", listed=False))
    return found


def set_cases(dataset: DataSet, data_dir: str | Path) -> dict[str, list[str]]:
    """File stems of the set's labelled pairs by split (sorted)."""
    from napari_openseg.evaluation.data import find_folder

    folder = find_folder(Path(data_dir) / dataset.name)
    out: dict[str, list[str]] = {split: [] for split in SPLITS}
    for stem in sorted(folder.pairs):
        out[dataset.split_of(stem)].append(stem)
    return out


def trainable_sets(sets: Iterable[DataSet], licence: str = "permissive") -> list[DataSet]:
    """Sets whose train split may be trained on: ``licence="permissive"`` (bundled weights) or
    ``"all"`` (a research file that is never bundled)."""
    if licence not in ("permissive", "all"):
        raise OpenSegError(f"licence must be 'permissive' or 'all', got {licence!r}")
    return [s for s in sets if licence == "all" or s.licence_class == "permissive"]


def build_task_bank(
    sets: Sequence[DataSet],
    split: str,
    grid: int,
    data_dir: str | Path,
    all_slices: bool = False,
):
    """One :class:`~napari_openseg.training.incontext.tasks.TaskBank` of the ``split`` cases of ``sets``.

    2D sets give one task per label value (axis 0; each image is its own subject's slice, so
    episodes draw support from other cases); 3D sets one per (label, axis), as
    :func:`~napari_openseg.training.incontext.tasks.build_bank`. ``all_slices`` keeps images and slices without
    a label, as the empty queries of that label's task."""
    from napari_openseg.training.incontext.tasks import VolumeSpec, build_bank

    if split not in SPLITS:
        raise OpenSegError(f"split must be one of {SPLITS}, got {split!r}")
    banks = []
    for dataset in sets:
        stems = set_cases(dataset, data_dir)[split]
        if not stems:
            log.info("%s: no %s cases", dataset.name, split)
            continue
        root = Path(data_dir) / dataset.name
        if dataset.layout == "3d":
            specs = [
                VolumeSpec(
                    dataset.task_family,
                    stem,
                    root / "imagesTr" / f"{stem}.nii.gz",
                    root / "labelsTr" / f"{stem}.nii.gz",
                )
                for stem in stems
            ]
            banks.append(build_bank(specs, grid, all_slices=all_slices))
        else:
            banks.append(_picture_bank(dataset, stems, grid, data_dir, all_slices))
    if not banks:
        raise OpenSegError(f"no {split} cases in {[s.name for s in sets]}")
    return merge_banks(banks)


def _picture_bank(dataset: DataSet, stems: Sequence[str], grid: int, data_dir, all_slices: bool):
    """The task bank of a 2D set's images (each image one subject, grouped by case)."""
    from napari_openseg.core.preprocess import masks_to_grid, normalize_intensity, to_grid
    from napari_openseg.evaluation.data import find_folder, read_case
    from napari_openseg.training.incontext.tasks import SliceTask, TaskBank

    folder = find_folder(Path(data_dir) / dataset.name)
    images, labels, cases = [], [], []
    for stem in stems:
        case = read_case(folder, stem)
        grid_image, _ = to_grid(torch.from_numpy(normalize_intensity(case.image))[None], grid)
        images.append(grid_image.half())
        labels.append(case.labels)
        cases.append(dataset.case_of(stem))
    case_ids = {c: i for i, c in enumerate(sorted(set(cases)))}
    subjects = np.array([case_ids[c] for c in cases])
    values = sorted({int(v) for lab in labels for v in np.unique(lab) if v != 0})
    tasks = []
    for value in values:
        ids, masks, absent = [], [], []
        for i, lab in enumerate(labels):
            present = lab == value
            mask = masks_to_grid(torch.from_numpy(present)[None], grid).bool() if present.any() else None
            if mask is not None and mask.any():
                ids.append(i)
                masks.append(mask)
            elif not present.any():
                absent.append(i)
        if ids:
            tasks.append(
                SliceTask(
                    dataset.task_family,
                    value,
                    0,
                    np.array(ids),
                    torch.cat(masks),
                    subjects[ids],
                    np.zeros(len(ids), np.int64),
                    np.array(absent if all_slices else [], np.int64),
                )
            )
    names = [f"{dataset.task_family}/{c}" for c in sorted(case_ids)]
    return TaskBank(grid=grid, images=torch.cat(images), tasks=tasks, subjects=names)


def merge_banks(banks: Sequence):
    """One bank of several (image ids and subject ids renumbered)."""
    from dataclasses import replace

    from napari_openseg.training.incontext.tasks import TaskBank

    if len(banks) == 1:
        return banks[0]
    grids = {b.grid for b in banks}
    if len(grids) != 1:
        raise OpenSegError(f"task banks on different grids cannot be merged: {sorted(grids)}")
    tasks, subjects, image_offset = [], [], 0
    for bank in banks:
        subject_offset = len(subjects)
        for task in bank.tasks:
            tasks.append(
                replace(
                    task,
                    image_ids=task.image_ids + image_offset,
                    subjects=task.subjects + subject_offset,
                    absent_ids=task.absent_ids + image_offset,
                )
            )
        subjects.extend(bank.subjects)
        image_offset += len(bank.images)
    return TaskBank(
        grid=banks[0].grid, images=torch.cat([b.images for b in banks]), tasks=tasks, subjects=subjects
    )

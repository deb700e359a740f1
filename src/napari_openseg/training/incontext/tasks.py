"""Real segmentation tasks from labelled 3D volumes: every label value, sliced along all three axes.

A task is ``(family, label value, axis)``: its entries are the 2D slices of that family's volumes,
along that axis, in which the label occurs. Slices are prepared exactly as at inference: the volume
is normalised once with :func:`~napari_openseg.core.preprocess.normalize_intensity`, each slice is
placed on the model grid with :func:`~napari_openseg.core.preprocess.to_grid` and each binary mask
with :func:`~napari_openseg.core.preprocess.masks_to_grid` (aspect ``"pad"``). Slices whose mask
vanishes on the grid are dropped.

Families in ``../shared/data`` (:func:`shared_volumes`): ``hippocampus`` (MSD Task04, 130 subjects,
split by subject with :func:`~napari_openseg.training.splits.hippocampus_splits`),
``brain_structures`` (the VoxelMorph scan, 45 FreeSurfer labels), ``mni152_gm_wm`` (MNI152 2009a, GM
and WM), ``colin27_aal`` (116 AAL regions) and ``colin27_brodmann`` (41 areas).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from napari_openseg.core.axes import shape_text
from napari_openseg.core.preprocess import masks_to_grid, normalize_intensity, to_grid
from napari_openseg.errors import OpenSegError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VolumeSpec:
    """One labelled volume: ``family`` and ``subject`` name it, the paths point at image and labels."""

    family: str
    subject: str
    image: Path
    labels: Path


@dataclass
class SliceTask:
    """Entries of one task: indices into the bank's images, their masks ``"N 1 g g"`` and origin."""

    family: str
    label: int
    axis: int
    image_ids: np.ndarray
    masks: torch.Tensor
    subjects: np.ndarray
    slices: np.ndarray
    #: Images of the same volumes and axis in which the label is absent (empty-target queries).
    absent_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def name(self) -> str:
        return f"{self.family}/label{self.label}/axis{self.axis}"

    def __len__(self) -> int:
        return len(self.image_ids)


@dataclass
class TaskBank:
    """All slices of some volumes on one grid (images stored once, ``"M 1 g g"`` float16) and their tasks."""

    grid: int
    images: torch.Tensor
    tasks: list[SliceTask] = field(default_factory=list)
    subjects: list[str] = field(default_factory=list)

    def families(self) -> list[str]:
        return sorted({t.family for t in self.tasks})

    def tasks_by_family(self) -> dict[str, list[SliceTask]]:
        """The tasks of each family, in bank order (computed once: the bank's tasks do not change)."""
        if getattr(self, "_by_family", None) is None:
            by_family: dict[str, list[SliceTask]] = {}
            for task in self.tasks:
                by_family.setdefault(task.family, []).append(task)
            self._by_family = by_family
        return self._by_family

    def select(
        self, families: Iterable[str] | None = None, labels: Iterable[int] | None = None
    ) -> list[SliceTask]:
        fams = None if families is None else set(families)
        labs = None if labels is None else {int(v) for v in labels}
        return [
            t for t in self.tasks if (fams is None or t.family in fams) and (labs is None or t.label in labs)
        ]

    def entries(
        self, task: SliceTask, indices: Sequence[int] | np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and masks ``"n 1 g g"`` (float32) of the task entries at ``indices``."""
        indices = np.asarray(indices, dtype=np.int64)
        images = self.images[torch.from_numpy(task.image_ids[indices])].float()
        return images, task.masks[torch.from_numpy(indices)].float()


def load_volume(spec: VolumeSpec) -> tuple[np.ndarray, np.ndarray]:
    """Normalised image (float32 in [0, 1]) and integer labels of one volume, same shape."""
    from napari_openseg.core.support import check_labels
    from napari_openseg.io import read_image

    image = read_image(spec.image).data
    labels = read_image(spec.labels).data
    if image.ndim != 3:
        raise OpenSegError(f"{spec.image}: expected a 3D volume, got shape {shape_text(image.shape)}")
    labels = check_labels(np.asarray(labels), image.shape)
    return normalize_intensity(image), labels


def build_bank(
    volumes: Sequence[VolumeSpec],
    grid: int,
    axes: Sequence[int] = (0, 1, 2),
    label_values: Iterable[int] | None = None,
    all_slices: bool = False,
) -> TaskBank:
    """Slice every volume along ``axes`` and collect one task per (family, label value, axis).

    By default only slices holding some label are kept; ``all_slices`` keeps every slice, so that
    each task's ``absent_ids`` also covers the unlabelled ends of a volume (the slices where
    segmenting a whole volume must answer "nothing here")."""
    wanted = None if label_values is None else {int(v) for v in label_values}
    images: list[torch.Tensor] = []
    collected: dict[tuple[str, int, int], dict[str, list]] = {}
    subjects: list[str] = []
    count = 0
    for spec in volumes:
        volume, labels = load_volume(spec)
        subject_id = len(subjects)
        subjects.append(f"{spec.family}/{spec.subject}")
        values = [int(v) for v in np.unique(labels) if v != 0 and (wanted is None or v in wanted)]
        for axis in axes:
            stack = np.moveaxis(volume, axis, 0)
            stack_labels = np.moveaxis(labels, axis, 0)
            labelled = stack_labels.reshape(len(stack_labels), -1).any(axis=1)
            keep = np.arange(len(stack)) if all_slices else np.flatnonzero(labelled)
            if len(keep) == 0:
                continue
            grid_images, _ = to_grid(torch.from_numpy(np.ascontiguousarray(stack[keep])), grid)
            images.append(grid_images.half())
            for value in values:
                has_value = (stack_labels[keep] == value).reshape(len(keep), -1).any(axis=1)
                present = np.flatnonzero(has_value)
                if len(present) == 0:
                    continue
                masks = masks_to_grid(torch.from_numpy(stack_labels[keep[present]] == value), grid).bool()
                nonempty = masks.flatten(1).any(dim=1).numpy()
                if not nonempty.any():
                    continue
                entry = collected.setdefault(
                    (spec.family, value, axis), {k: [] for k in ("ids", "masks", "subj", "slices", "absent")}
                )
                entry["absent"].append(count + np.flatnonzero(~has_value))
                entry["ids"].append(count + present[nonempty])
                entry["masks"].append(masks[torch.from_numpy(nonempty)])
                entry["subj"].append(np.full(int(nonempty.sum()), subject_id))
                entry["slices"].append(keep[present[nonempty]])
            count += len(keep)
    if not images:
        raise OpenSegError("none of the volumes has any labelled voxel")
    tasks = [
        SliceTask(
            family,
            value,
            axis,
            np.concatenate(e["ids"]),
            torch.cat(e["masks"]),
            np.concatenate(e["subj"]),
            np.concatenate(e["slices"]),
            np.concatenate(e["absent"]),
        )
        for (family, value, axis), e in sorted(collected.items())
    ]
    log.info("task bank: %d volumes, %d slices, %d tasks on a %d grid", len(volumes), count, len(tasks), grid)
    return TaskBank(grid=grid, images=torch.cat(images), tasks=tasks, subjects=subjects)


def hippocampus_volumes(data_dir: Path, subjects: Iterable[str]) -> list[VolumeSpec]:
    root = data_dir / "msd_task04_hippocampus"
    return [
        VolumeSpec("hippocampus", s, root / "imagesTr" / f"{s}.nii.gz", root / "labelsTr" / f"{s}.nii.gz")
        for s in sorted(subjects)
    ]


def shared_volumes(data_dir: Path, split: str | None = None) -> dict[str, list[VolumeSpec]]:
    """Every labelled 3D volume in ``../shared/data`` by family.

    ``split`` (``"train"``, ``"val"`` or ``"test"``) restricts the hippocampus family to that subject
    split; the single-subject families are always listed whole (see ``docs/model-card.md``).
    """
    from napari_openseg.training.splits import hippocampus_splits

    splits = hippocampus_splits(data_dir)
    hippo = splits[split] if split else sorted(sum(splits.values(), []))
    vm = data_dir / "voxelmorph_test_scan"
    mni = data_dir / "mni152_nilearn"
    colin = data_dir / "colin27_aal_mricron"
    return {
        "hippocampus": hippocampus_volumes(data_dir, hippo),
        "brain_structures": [
            VolumeSpec(
                "brain_structures", "test_scan", vm / "vol_uint8.nii.gz", vm / "seg_freesurfer_labels.nii.gz"
            )
        ],
        "mni152_gm_wm": [
            VolumeSpec(
                "mni152_gm_wm",
                "mni152_2009a",
                mni / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                mni / "derived_labels_bg0_gm1_wm2.nii.gz",
            )
        ],
        "colin27_aal": [VolumeSpec("colin27_aal", "colin27", colin / "ch2.nii.gz", colin / "aal.nii.gz")],
        "colin27_brodmann": [
            VolumeSpec("colin27_brodmann", "colin27", colin / "ch2.nii.gz", colin / "brodmann.nii.gz")
        ],
    }


def episode_indices(
    task: SliceTask, support_size: int, rng: np.random.Generator, min_gap: int = 3
) -> np.ndarray:
    """Entry indices ``[query, support...]`` of one episode of ``task``.

    Support entries come from other subjects than the query's when the task has several subjects,
    else from slices at least ``min_gap`` away from the query's slice. Entries are drawn without
    replacement while there are enough candidates.
    """
    query = int(rng.integers(len(task)))
    if len(np.unique(task.subjects)) > 1:
        candidates = np.flatnonzero(task.subjects != task.subjects[query])
    else:
        candidates = np.flatnonzero(np.abs(task.slices - task.slices[query]) >= min_gap)
    if len(candidates) == 0:
        candidates = np.setdiff1d(np.arange(len(task)), [query])
    if len(candidates) == 0:
        candidates = np.array([query])
    support = rng.choice(candidates, size=support_size, replace=len(candidates) < support_size)
    return np.concatenate([[query], support])


def sample_episode(
    bank: TaskBank,
    task: SliceTask,
    support_size: int,
    rng: np.random.Generator,
    min_gap: int = 3,
    empty_query: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A query and ``support_size`` support entries of ``task`` (see :func:`episode_indices`):
    ``"(1+S) 1 g g"`` images and masks, the query first.

    ``empty_query`` replaces the query with a slice where the label is absent (target all zeros),
    when the task has one: segmenting a volume asks the network about such slices all the time."""
    images, masks = bank.entries(task, episode_indices(task, support_size, rng, min_gap))
    if empty_query and len(task.absent_ids):
        image_id = int(task.absent_ids[int(rng.integers(len(task.absent_ids)))])
        images[0] = bank.images[image_id].float()
        masks[0] = 0
    return images, masks

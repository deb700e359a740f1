"""A trained MedOpenSeg model with its prototype bank: the object that novelty maps are made from.

Model file (``.pt``, read with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists and
dicts only, so loading never runs code): ``{"format": "napari-openseg novelty model", "version": 1,
"config": {...}, "state_dict": {...}, "bank": {...}, "class_values": [...], "downsample": f,
"info": {...}}``. A training checkpoint is the same file with a ``"training"`` entry (optimizer state,
step, random states), so a checkpoint can also be used to map directly. Files are written atomically.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import OpenSegError
from .preprocess import normalize_intensity
from .prototypes import PrototypeBank
from .tensor_files import load_format_file

log = logging.getLogger(__name__)

MODEL_FORMAT = "napari-openseg novelty model"
MODEL_VERSION = 1


@dataclass
class NoveltyModel:
    """Network, prototype bank and how to read volumes for them.

    ``class_values[k]`` is the label value of class ``k`` (0 = background); ``downsample`` is the
    integer factor by which volumes are shrunk before the network sees them (1 = native resolution).
    """

    network: torch.nn.Module
    bank: PrototypeBank
    class_values: list[int]
    downsample: int = 1
    info: dict = field(default_factory=dict)

    @property
    def config(self):
        return self.network.config

    def payload(self) -> dict:
        """The file's content (without training state)."""
        return {
            "format": MODEL_FORMAT,
            "version": MODEL_VERSION,
            "config": self.network.config.to_dict(),
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()},
            "bank": self.bank.state_dict(),
            "class_values": [int(v) for v in self.class_values],
            "downsample": int(self.downsample),
            "info": _plain(self.info),
        }

    def save(self, path: str | Path, overwrite: bool = True, training: dict | None = None) -> Path:
        """Write the model (and, for a checkpoint, ``training`` state) atomically."""
        from ..io import atomic_path

        payload = self.payload()
        if training is not None:
            payload["training"] = training
        with atomic_path(path, overwrite) as tmp:
            torch.save(payload, tmp)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> NoveltyModel:
        return model_from_payload(read_model_file(path), device)


def _plain(value):
    """Keep only what ``weights_only`` loading accepts: numbers, strings, lists, dicts, None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def read_model_file(path: str | Path) -> dict:
    """The raw content of a novelty model or checkpoint file, checked for its format."""
    content = load_format_file(
        path, MODEL_FORMAT,
        missing="novelty model {path} does not exist; train one with `openseg novelty train`",
        unreadable="{path} is not a loadable novelty model: only plain tensors are accepted ({detail})",
        foreign="{path} is not a napari-openseg novelty model (train one with `openseg novelty train`)",
    )
    if int(content.get("version", 0)) > MODEL_VERSION:
        raise OpenSegError(f"{path} is a newer novelty-model format; upgrade napari-openseg")
    return content


def model_from_payload(content: dict, device: str | torch.device = "cpu") -> NoveltyModel:
    from ..model.medopenseg import MedOpenSeg, MedOpenSegConfig

    missing = [key for key in ("config", "state_dict", "bank", "class_values") if key not in content]
    if missing:
        raise OpenSegError(f"the model file lacks {', '.join(missing)}; it is damaged or incomplete")
    try:
        config = MedOpenSegConfig(**content["config"])
    except (TypeError, ValueError) as err:
        raise OpenSegError(f"the model file's architecture is not understood ({err})") from err
    network = MedOpenSeg(config)
    try:
        network.load_state_dict(content["state_dict"], strict=True)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise OpenSegError(f"the model file's weights do not fit its architecture ({err})") from err
    bank = PrototypeBank.from_state_dict(content["bank"])
    try:
        values = [int(v) for v in content["class_values"]]
        downsample = int(content.get("downsample", 1))
    except (TypeError, ValueError) as err:
        raise OpenSegError(f"the model file's classes or shrink factor are not numbers ({err})") from err
    if len(values) != config.num_classes or bank.class_values != values:
        raise OpenSegError("the model file's classes, network and prototype bank disagree")
    if downsample < 1:
        raise OpenSegError(f"the model file's shrink factor is {downsample}; it must be 1 or more")
    return NoveltyModel(network.to(device).eval(), bank, values, downsample, dict(content.get("info", {})))


# ---------------------------------------------------------------------- volumes


def body_mask(image: np.ndarray, normalized: bool = False) -> np.ndarray:
    """Foreground ("inside the body") of a volume: above half its Otsu level, holes filled.

    Half the Otsu level keeps dark tissue (CSF) that Otsu alone would drop; filling holes keeps
    cavities (ventricles, lungs) surrounded by tissue, in 3D and then in every slice along each axis:
    a cavity that a volume cut open at its first or last slice is still inside the body in the slices
    that enclose it. ``normalized``: ``image`` is already :func:`normalize_intensity`'s output
    (callers that need it anyway save a second pass).
    """
    from scipy import ndimage

    from .novelty import otsu_threshold

    norm = image if normalized else normalize_intensity(image)
    mask = norm > 0.5 * otsu_threshold(norm)
    if not mask.any():
        return np.ones(norm.shape, bool)
    mask = ndimage.binary_fill_holes(mask)
    if mask.ndim == 3:
        for axis in range(3):
            plane = np.zeros((3, 3, 3), bool)
            plane[tuple(1 if a == axis else slice(None) for a in range(3))] = ndimage.generate_binary_structure(2, 1)
            mask = ndimage.binary_fill_holes(mask, structure=plane)
    return mask


def working_shape(shape: tuple[int, ...], factor: int) -> tuple[int, ...]:
    return tuple(max(1, -(-int(s) // factor)) for s in shape)


def to_working(volume: np.ndarray, factor: int) -> torch.Tensor:
    """A normalised ``"D H W"`` volume -> ``"1 1 d h w"`` float32, area-shrunk by ``factor``."""
    x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    if factor == 1:
        return x
    return F.interpolate(x, size=working_shape(volume.shape, factor), mode="area")


def labels_to_working(labels: np.ndarray, factor: int) -> np.ndarray:
    """Labels shrunk by ``factor`` (nearest voxel, as torch's ``"nearest"`` picks it), by indexing:
    values keep their type exactly (a float detour loses label values above 2**24)."""
    labels = np.asarray(labels)
    if factor == 1:
        return labels
    picks = [
        np.minimum((np.arange(out) * (size / out)).astype(np.int64), size - 1)
        for size, out in zip(labels.shape, working_shape(labels.shape, factor))
    ]
    return labels[np.ix_(*picks)]


def check_volume(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3:
        raise OpenSegError(
            f"novelty maps need a 3D volume (Z Y X), got an array of shape {image.shape}; "
            "stack 2D images into a volume first"
        )
    if not np.issubdtype(image.dtype, np.number) or np.issubdtype(image.dtype, np.complexfloating):
        raise OpenSegError(f"images must be real-valued, got dtype {image.dtype}")
    return image


def class_indices(labels: np.ndarray, class_values: list[int], ignore: int = -1) -> np.ndarray:
    """Label values -> class indices; values that are not classes become ``ignore``. By search in
    the sorted class values, not a lookup table, whose size would follow the largest label (2**40)."""
    labels = np.asarray(labels)
    order = np.argsort(class_values)
    known = np.asarray(class_values, np.int64)[order]
    position = np.clip(np.searchsorted(known, labels), 0, len(known) - 1)
    found = known[position] == labels
    return np.where(found, order[position], ignore).astype(np.int64)

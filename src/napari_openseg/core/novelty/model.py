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
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from napari_openseg.core.axes import shape_text
from napari_openseg.core.novelty.prototypes import PrototypeBank
from napari_openseg.core.preprocess import normalize_intensity
from napari_openseg.core.support import has_finite_values
from napari_openseg.core.tensor_files import layout_mismatch, load_format_file
from napari_openseg.errors import OpenSegError

if TYPE_CHECKING:
    from napari_openseg.model.medopenseg import MedOpenSegConfig

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
        from napari_openseg.io import atomic_path

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
        path,
        MODEL_FORMAT,
        missing="novelty model {path} does not exist; train one with `openseg novelty train`",
        unreadable="{path} is not a loadable novelty model: only plain tensors are accepted ({detail})",
        foreign="{path} is not a napari-openseg novelty model (train one with `openseg novelty train`)",
    )
    if int(content.get("version", 0)) > MODEL_VERSION:
        raise OpenSegError(f"{path} is a newer novelty-model format; upgrade napari-openseg")
    return content


#: Bounds on an architecture read from a file, checked before anything is built: far above what
#: ``openseg novelty train`` makes (width 12, embeddings 128, 64^3 patches), far below what exhausts
#: a machine's memory (a width of 4800 asked for 22 GB before the weights were looked at).
ARCHITECTURE_BOUNDS = {
    "num_classes": 1024,
    "feature_size": 96,
    "embedding_dim": 1024,
    "in_channels": 8,
    "depths": 8,
    "num_heads": 64,
    "roi_size": 256,
}


def _architecture(config) -> MedOpenSegConfig:
    """The file's architecture, its fields checked for type and bounds (nothing is built)."""
    from napari_openseg.model.medopenseg import DIVISORS, MedOpenSegConfig

    if not isinstance(config, dict):
        raise OpenSegError(
            f"the model file's architecture is a {type(config).__name__}, not a mapping; the file is damaged"
        )
    unknown = sorted(set(config) - set(ARCHITECTURE_BOUNDS) - {"backbone"})
    if unknown:
        raise OpenSegError(
            f"the model file's architecture has unknown fields {unknown}; upgrade napari-openseg"
        )
    backbone = config.get("backbone", "swinunetr")
    if backbone not in DIVISORS:
        raise OpenSegError(
            f"the model file's backbone is {backbone!r}, not one of {', '.join(DIVISORS)}; "
            "upgrade napari-openseg or retrain the model"
        )
    whole = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    for key, value in config.items():
        if key == "backbone":
            continue
        numbers = value if isinstance(value, (list, tuple)) else [value]
        if not numbers or not all(whole(v) for v in numbers):
            raise OpenSegError(f"the model file's {key} is {value!r}, not whole numbers; the file is damaged")
        if max(numbers) > ARCHITECTURE_BOUNDS[key]:
            raise OpenSegError(
                f"the model file's {key} is {value!r}; files hold at most "
                f"{ARCHITECTURE_BOUNDS[key]}: the file is damaged"
            )
    try:
        return MedOpenSegConfig(**config)
    except (TypeError, ValueError) as err:
        raise OpenSegError(f"the model file's architecture is not understood ({err})") from err


def model_from_payload(content: dict, device: str | torch.device = "cpu") -> NoveltyModel:
    """The model a file holds. Every check (architecture bounds, tensor shapes, classes, bank) comes
    before the network is built, so a damaged file allocates nothing beyond what it holds."""
    from napari_openseg.model.medopenseg import MedOpenSeg, state_dict_shapes

    missing = [key for key in ("config", "state_dict", "bank", "class_values") if key not in content]
    if missing:
        raise OpenSegError(f"the model file lacks {', '.join(missing)}; it is damaged or incomplete")
    config = _architecture(content["config"])
    state_dict = content["state_dict"]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise OpenSegError("the model file's weights hold entries that are not tensors; the file is damaged")
    problem = layout_mismatch(state_dict_shapes(config), state_dict)
    if problem:
        raise OpenSegError(f"the model file's weights do not fit its architecture ({problem})")
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
    info = content.get("info", {})
    if not isinstance(info, dict):
        raise OpenSegError(
            f"the model file's info is a {type(info).__name__}, not a mapping; the file is damaged"
        )
    network = MedOpenSeg(config)
    try:
        network.load_state_dict(state_dict, strict=True)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise OpenSegError(f"the model file's weights do not fit its architecture ({err})") from err
    return NoveltyModel(network.to(device).eval(), bank, values, downsample, dict(info))


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

    from napari_openseg.core.novelty.scores import otsu_threshold

    norm = image if normalized else normalize_intensity(image)
    mask = norm > 0.5 * otsu_threshold(norm)
    if not mask.any():
        return np.ones(norm.shape, bool)
    mask = ndimage.binary_fill_holes(mask)
    if mask.ndim == 3:
        for axis in range(3):
            plane = np.zeros((3, 3, 3), bool)
            plane[tuple(1 if a == axis else slice(None) for a in range(3))] = (
                ndimage.generate_binary_structure(2, 1)
            )
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
            f"novelty maps need a 3D volume (Z Y X), got an array of shape {shape_text(image.shape)}; "
            "stack 2D images into a volume first"
        )
    if not np.issubdtype(image.dtype, np.number) or np.issubdtype(image.dtype, np.complexfloating):
        raise OpenSegError(f"images must be real-valued, got dtype {image.dtype}")
    if image.size == 0:
        raise OpenSegError(f"the volume is empty (shape {image.shape})")
    if not has_finite_values(image):
        raise OpenSegError("the volume holds no finite values (all NaN or infinite): there is nothing to map")
    return image


def check_mask(mask: np.ndarray | None, shape: tuple[int, ...], what: str = "mask") -> np.ndarray | None:
    """``mask`` as booleans of the volume's ``shape`` (None stays None), checked before any work."""
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise OpenSegError(
            f"{what} of shape {shape_text(mask.shape)} does not match the volume of shape {shape_text(shape)}"
        )
    return mask.astype(bool, copy=False)


def check_seed(image: np.ndarray, seed_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A painted unknown seed: a volume and a non-empty mask of its shape."""
    image = check_volume(image)
    seed_mask = check_mask(seed_mask, image.shape, "the unknown seed mask")
    if not seed_mask.any():
        raise OpenSegError("the unknown seed mask is empty: paint one instance of the unseen structure")
    return image, seed_mask


def class_indices(labels: np.ndarray, class_values: list[int], ignore: int = -1) -> np.ndarray:
    """Label values -> class indices; values that are not classes become ``ignore``. By search in
    the sorted class values, not a lookup table, whose size would follow the largest label (2**40)."""
    labels = np.asarray(labels)
    order = np.argsort(class_values)
    known = np.asarray(class_values, np.int64)[order]
    position = np.clip(np.searchsorted(known, labels), 0, len(known) - 1)
    found = known[position] == labels
    return np.where(found, order[position], ignore).astype(np.int64)

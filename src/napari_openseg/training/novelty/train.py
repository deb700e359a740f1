"""Training a MedOpenSeg novelty model on the user's labelled volumes (known classes only).

Each step draws ``batch_size`` patches of ``roi_size`` with MONAI transforms (class-balanced crop
centres, intensity scale/shift, optional flips), runs the network, updates the prototype bank by its
moving average from the batch's (detached) embeddings, and minimises Dice-CE on the segmentation head
plus ``pgr_weight`` times the prototype-guided loss on the embedding head. Voxels whose label value is
in ``ignore_values`` (for example structures held out as unseen) take part in no loss and no prototype.

The random state of the transforms is reset from ``(seed, step)`` at every step, so a run resumed from
a checkpoint draws the same patches as an uninterrupted one. Checkpoints (a model file plus optimizer
state and step, :mod:`~napari_openseg.core.novelty.model`) are written atomically after every epoch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from napari_openseg.core.device import resolve_device
from napari_openseg.core.novelty.modality import intensity_signature, merge_signatures
from napari_openseg.core.novelty.model import (
    NoveltyModel,
    body_mask,
    check_volume,
    class_indices,
    labels_to_working,
    model_from_payload,
    read_model_file,
    to_working,
)
from napari_openseg.core.novelty.prototypes import DEFAULT_MOMENTUM, PrototypeBank
from napari_openseg.core.preprocess import normalize_intensity
from napari_openseg.core.progress import Progress, run_to_end
from napari_openseg.core.support import check_labels
from napari_openseg.errors import OpenSegError
from napari_openseg.training.novelty.losses import IGNORE, dice_ce_loss, prototype_guided_loss

log = logging.getLogger(__name__)


#: Steps of the default run: 300 steps of the default network (a residual U-Net of width 8, 2 patches
#: of 16 x 64 x 64 per step at half resolution) take about 10 minutes on a 2-core CPU.
DEFAULT_MAX_STEPS = 300


@dataclass
class NoveltyTrainSettings:
    """Everything that defines a training run (stored in the model file's ``info``).

    A run takes ``epochs`` passes of ``samples_per_volume`` patches per volume, ``batch_size`` per
    step, but stops after ``max_steps`` steps (None: no limit), so that the default run ends in
    minutes on a CPU however many volumes it is given. The defaults are sized for a CPU: the small
    ``"unet"`` backbone at half resolution; ``backbone="swinunetr"``, ``feature_size=12`` and
    ``roi_size=(64, 64, 64)`` give the paper's network (a GPU is then advisable).
    """

    epochs: int = 20
    samples_per_volume: int = 4
    batch_size: int = 2
    max_steps: int | None = DEFAULT_MAX_STEPS
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    momentum: float = DEFAULT_MOMENTUM
    pgr_weight: float = 1.0
    lambda_pc: float = 0.01
    feature_size: int = 8
    embedding_dim: int = 32
    roi_size: tuple[int, int, int] = (16, 64, 64)
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    backbone: str = "unet"
    downsample: int = 2
    flips: bool = False
    ignore_values: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        self.roi_size = tuple(int(r) for r in self.roi_size)
        self.depths = tuple(int(d) for d in self.depths)
        self.num_heads = tuple(int(h) for h in self.num_heads)
        self.ignore_values = tuple(int(v) for v in self.ignore_values)
        if self.max_steps is not None and self.max_steps < 1:
            raise OpenSegError(f"max steps must be >= 1 (or None for no limit), got {self.max_steps}")
        for name in ("epochs", "samples_per_volume", "batch_size", "downsample"):
            if getattr(self, name) < 1:
                raise OpenSegError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise OpenSegError(f"the learning rate must be > 0, got {self.learning_rate}")
        from napari_openseg.model.medopenseg import MedOpenSegConfig

        try:  # refuse a bad architecture before any data is read
            MedOpenSegConfig(
                feature_size=self.feature_size,
                embedding_dim=self.embedding_dim,
                roi_size=self.roi_size,
                depths=self.depths,
                num_heads=self.num_heads,
                backbone=self.backbone,
            )
        except ValueError as err:
            raise OpenSegError(str(err)) from err


@dataclass
class TrainingResult:
    """The trained model and the loss after every step."""

    model: NoveltyModel
    losses: list[float] = field(default_factory=list)
    steps: int = 0


def _prepare(images, labels, settings: NoveltyTrainSettings) -> tuple[list[dict], list[int], list[float]]:
    """Working-resolution volumes and class maps, the class values, and the volumes' intensity signature."""
    if len(images) != len(labels) or not images:
        raise OpenSegError(
            f"give one labels volume per image: got {len(images)} image(s) and {len(labels)} labels"
        )
    if 0 in settings.ignore_values:
        raise OpenSegError(
            "0 is the background class and cannot be ignored: the novelty scores compare every "
            "voxel with a background prototype"
        )
    pairs = []
    for image, label in zip(images, labels):
        image = check_volume(image)
        label = check_labels(label, image.shape)
        pairs.append((image, label))
    present = sorted(
        set().union(*(np.unique(lab).tolist() for _, lab in pairs)) - set(settings.ignore_values)
    )
    values = sorted(set(present) | {0})
    if len(values) < 2:
        raise OpenSegError("the labels hold no known class besides background: paint at least one structure")
    data, signatures = [], []
    for image, label in pairs:
        normalized = normalize_intensity(image)
        signatures.append(intensity_signature(normalized, body_mask(normalized, normalized=True)))
        vol = to_working(normalized, settings.downsample)[0, 0].numpy()
        small = labels_to_working(label, settings.downsample)
        classes = class_indices(small, values, IGNORE)
        for ignored in settings.ignore_values:
            classes[small == ignored] = IGNORE
        data.append({"image": vol, "classes": classes[None].astype(np.int64)})
    return data, values, merge_signatures(signatures)


def _transforms(settings: NoveltyTrainSettings, num_classes: int):
    from monai import transforms as T

    # Class index K stands for ignored voxels during cropping: never chosen as a patch centre. Padding
    # (a volume smaller than the patch) is no tissue: ignored by the loss, never a patch centre.
    steps = [
        T.SpatialPadd(keys="image", spatial_size=settings.roi_size, mode="constant"),
        T.SpatialPadd(keys="classes", spatial_size=settings.roi_size, mode="constant", value=IGNORE),
        T.SpatialPadd(
            keys="crop_classes", spatial_size=settings.roi_size, mode="constant", value=num_classes
        ),
        T.ClassesToIndicesd(keys="crop_classes", num_classes=num_classes + 1),
        T.RandCropByLabelClassesd(
            keys=["image", "classes"],
            label_key="crop_classes",
            spatial_size=settings.roi_size,
            num_classes=num_classes + 1,
            ratios=[1.0] * num_classes + [0.0],
            num_samples=settings.batch_size,
            indices_key="crop_classes_cls_indices",
            allow_smaller=False,
        ),
        T.RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        T.RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
    ]
    if settings.flips:
        steps += [T.RandFlipd(keys=["image", "classes"], prob=0.5, spatial_axis=axis) for axis in range(3)]
    return T.Compose(steps)


def _batch(data: list[dict], step: int, transform, settings: NoveltyTrainSettings, k: int, device):
    item = data[step % len(data)]
    crop = np.where(item["classes"] == IGNORE, k, item["classes"])
    transform.set_random_state(seed=(settings.seed * 1_000_003 + step) % (2**32))
    samples = transform({"image": item["image"][None], "classes": item["classes"], "crop_classes": crop})
    images = torch.stack([torch.as_tensor(np.asarray(s["image"]), dtype=torch.float32) for s in samples])
    targets = torch.stack([torch.as_tensor(np.asarray(s["classes"]))[0].long() for s in samples])
    return images.to(device), targets.to(device)


def iter_train_novelty(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    settings: NoveltyTrainSettings | None = None,
    *,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    device: str | torch.device = "auto",
) -> Generator[Progress, None, TrainingResult]:
    """Train on ``images`` (``"D H W"`` volumes) with ``labels`` of the same shapes.

    Every label value present (except ``settings.ignore_values``) is a known class; 0 is background.
    ``checkpoint``: file written after each epoch; with ``resume`` an existing one is continued
    (its settings win, except ``epochs`` and ``max_steps``). Yields progress per step with the loss in ``payload``.
    """
    from napari_openseg.model.medopenseg import MedOpenSeg, MedOpenSegConfig

    settings = settings or NoveltyTrainSettings()
    torch_device = resolve_device(device)
    state = None
    if resume and checkpoint is not None and Path(checkpoint).is_file():
        state = read_model_file(checkpoint)
        if "training" not in state:
            raise OpenSegError(f"{checkpoint} holds a finished model, not a training checkpoint")
        saved = dict(state["training"]["settings"], epochs=settings.epochs, max_steps=settings.max_steps)
        saved.setdefault("backbone", "swinunetr")  # checkpoints from before the choice of backbone
        ignored = {k: v for k, v in _settings_dict(settings).items() if saved.get(k) != v}
        if ignored:
            log.warning("resuming %s with its stored settings; ignoring the new %s", checkpoint, ignored)
        settings = NoveltyTrainSettings(**saved)
    data, values, signature = _prepare(images, labels, settings)
    k = len(values)
    if state is not None:
        model = model_from_payload(state, torch_device)
        if model.class_values != values:
            raise OpenSegError(
                f"{checkpoint} was trained on classes {model.class_values}, these labels hold {values}"
            )
    else:
        torch.manual_seed(settings.seed)
        config = MedOpenSegConfig(
            num_classes=k,
            feature_size=settings.feature_size,
            embedding_dim=settings.embedding_dim,
            roi_size=settings.roi_size,
            depths=settings.depths,
            num_heads=settings.num_heads,
            backbone=settings.backbone,
        )
        bank = PrototypeBank(values, settings.embedding_dim, settings.momentum)
        model = NoveltyModel(MedOpenSeg(config).to(torch_device), bank, values, settings.downsample)
    net = model.network.train()
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    start, losses = 0, []
    if state is not None:
        optimizer.load_state_dict(state["training"]["optimizer"])
        start, losses = int(state["training"]["step"]), list(state["training"]["losses"])
    steps_per_epoch = math.ceil(len(data) * settings.samples_per_volume / settings.batch_size)
    total = settings.epochs * steps_per_epoch
    if settings.max_steps is not None:
        total = min(total, settings.max_steps)
    if total < start:  # the network has trained further than asked: it cannot be reported as shorter
        raise OpenSegError(
            f"{checkpoint} has trained {start} steps already, more than {settings.epochs} "
            f"epoch(s) of {steps_per_epoch} steps or --max-steps {settings.max_steps}; pass "
            f"at least --epochs {math.ceil(start / steps_per_epoch)} and --max-steps {start} "
            "to resume it"
        )
    transform = _transforms(settings, k)
    model.info = {
        "trained_steps": start,
        "settings": _settings_dict(settings),
        "class_values": values,
        "intensity_signature": signature,
    }
    log.info(
        "training %d classes %s on %d volume(s): %d steps on %s", k, values, len(data), total, torch_device
    )
    yield Progress(start, total, "training")
    began = time.perf_counter()
    for step in range(start, total):
        images_t, targets = _batch(data, step, transform, settings, k, torch_device)
        logits, embeddings = net(images_t)
        valid = targets != IGNORE
        model.bank.update(embeddings.detach().permute(0, 2, 3, 4, 1)[valid], targets[valid])
        seg = dice_ce_loss(logits, targets)
        pgr, _, _ = prototype_guided_loss(
            embeddings, targets, model.bank.prototypes.to(torch_device), settings.lambda_pc
        )
        loss = seg + settings.pgr_weight * pgr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        done = step + 1
        epoch = math.ceil(done / steps_per_epoch)
        if checkpoint is not None and (done % steps_per_epoch == 0 or done == total):
            model.info["trained_steps"] = done
            model.save(
                checkpoint,
                training={
                    "optimizer": optimizer.state_dict(),
                    "step": done,
                    "losses": losses,
                    "settings": _settings_dict(settings),
                },
            )
        yield Progress(
            done,
            total,
            f"epoch {epoch}/{settings.epochs} loss {losses[-1]:.3f}",
            {
                "loss": losses[-1],
                "segmentation_loss": float(seg.detach()),
                "prototype_loss": float(pgr.detach()),
                "epoch": epoch,
                "step": done,
            },
        )
    log.info("trained %d steps in %.0f s", total - start, time.perf_counter() - began)
    model.info["trained_steps"] = total
    model.network.eval()
    return TrainingResult(model=model, losses=losses, steps=total)


def _settings_dict(settings: NoveltyTrainSettings) -> dict:
    data = asdict(settings)
    data["roi_size"] = list(settings.roi_size)
    data["ignore_values"] = list(settings.ignore_values)
    data["depths"] = list(settings.depths)
    data["num_heads"] = list(settings.num_heads)
    return data


def train_novelty(images, labels, settings: NoveltyTrainSettings | None = None, **kwargs) -> TrainingResult:
    """Run :func:`iter_train_novelty` to the end."""
    return run_to_end(iter_train_novelty(images, labels, settings, **kwargs))

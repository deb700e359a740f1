"""Episodic training of a UniverSeg network, resumable and seeded.

Each step draws a batch of episodes (:func:`~napari_openseg.training.incontext.episodes.training_batch`, a pure
function of ``(seed, step)``), runs the fast formulation (:func:`~napari_openseg.model.fast.fast_forward`),
and takes an Adam step on the soft Dice loss. Mixed precision (bfloat16, or float16 with a gradient
scaler where bfloat16 is unsupported) is used on CUDA only.

Run folder (``out_dir``): ``checkpoint.pt`` (model, optimiser, step, RNG state, config, history; written
atomically), ``weights.pt`` (latest weights, napari-openseg weights format), ``best.pt`` (best mean
validation Dice) and ``log.jsonl`` (one JSON record per logged step and per validation).
Resuming loads ``checkpoint.pt`` and continues the same run: same batches, same optimiser state.
Batches can be built in worker processes (``workers``): on a GPU, building them on one core is the
bottleneck, and since a batch depends only on ``(seed, step)`` the run stays the same.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from napari_openseg.core.device import resolve_device
from napari_openseg.core.progress import Progress, run_to_end
from napari_openseg.core.tensor_files import load_format_file
from napari_openseg.errors import OpenSegError
from napari_openseg.io import atomic_path
from napari_openseg.model.fast import fast_forward
from napari_openseg.model.registry import network_from_file, save_weights
from napari_openseg.model.universeg import UniverSeg, UniverSegConfig, build_network, config_from_state_dict
from napari_openseg.training.incontext.episodes import (
    EpisodeConfig,
    Episodes,
    episode_loss,
    hard_dice,
    training_batch,
    validation_episodes,
)
from napari_openseg.training.incontext.synth import SynthConfig
from napari_openseg.training.incontext.tasks import TaskBank, build_bank, shared_volumes

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "napari-openseg training checkpoint"


@dataclass
class TrainConfig:
    """Everything that defines a run; stored in its checkpoint."""

    steps: int = 20000
    widths: tuple[int, ...] = (32, 32, 32, 32)
    grid: int = 64
    lr: float = 5e-4
    warmup: int = 200
    decay_start: int | None = None
    grad_clip: float = 1.0
    bce_weight: float = 0.0
    seed: int = 0
    episodes: EpisodeConfig = field(default_factory=EpisodeConfig)
    real_families: tuple[str, ...] = ("hippocampus",)
    #: Real tasks from the task bank's manifest instead of ``real_families``: ``"permissive"`` (the
    #: train split of every set bundled weights may learn from) or ``"all"`` (research sets too: such
    #: weights must not be bundled). Validation then covers the val split of every set.
    task_bank: str | None = None
    init_weights: str | None = None
    val_every: int = 500
    val_support: int = 8
    val_per_task: int = 8
    val_synthetic: int = 48
    #: With a task bank: validation episodes per family (tasks taken in turn), not per task.
    val_per_family: int = 16
    checkpoint_every: int = 100
    log_every: int = 10

    def to_dict(self) -> dict:
        data = asdict(self)
        data["widths"] = list(self.widths)
        data["real_families"] = list(self.real_families)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        data = dict(data)
        data["episodes"] = EpisodeConfig(**data.get("episodes", {}))
        data["widths"] = tuple(data.get("widths", cls.widths))
        data["real_families"] = tuple(data.get("real_families", ()))
        return cls(**data)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up, constant, then (from ``decay_start``) cosine decay to zero at ``steps``."""
    lr = config.lr * min(1.0, (step + 1) / max(1, config.warmup))
    if config.decay_start is not None and step >= config.decay_start:
        span = max(1, config.steps - config.decay_start)
        lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, (step - config.decay_start) / span)))
    return lr


def real_banks(config: TrainConfig, data_dir: Path | None) -> tuple[TaskBank | None, TaskBank | None]:
    """Training bank (train split of ``real_families``, or of the task bank's sets) and validation
    bank (hippocampus val split, or the val split of every task-bank set)."""
    if config.episodes.real_fraction <= 0 or not (config.real_families or config.task_bank):
        return None, None
    if data_dir is None:
        raise OpenSegError(
            "real training tasks need ../shared/data (or $OPENSEG_SHARED_DATA); "
            "pass --real-fraction 0 to train on synthetic tasks only"
        )
    every = config.episodes.empty_fraction > 0  # empty queries also come from a volume's unlabelled ends
    if config.task_bank:
        from napari_openseg.training.taskbank import build_task_bank, discover, trainable_sets

        sets = discover(data_dir)
        train = build_task_bank(trainable_sets(sets, config.task_bank), "train", config.grid, data_dir, every)
        val = build_task_bank(sets, "val", config.grid, data_dir, every)
        return train, val
    train_volumes, val_volumes = shared_volumes(data_dir, "train"), shared_volumes(data_dir, "val")
    unknown = set(config.real_families) - set(train_volumes)
    if unknown:
        raise OpenSegError(f"unknown real families {sorted(unknown)}; known: {sorted(train_volumes)}")
    train = build_bank(
        [v for f in config.real_families for v in train_volumes[f]], config.grid, all_slices=every
    )
    val = (
        build_bank(val_volumes["hippocampus"], config.grid, all_slices=every)
        if "hippocampus" in config.real_families
        else None
    )
    return train, val


def _validation_sets(config: TrainConfig, val_bank: TaskBank | None) -> dict[str, Episodes]:
    empty = config.val_per_task // 2 if config.episodes.empty_fraction > 0 else 0
    per_family = config.val_per_family if config.task_bank else None
    return validation_episodes(
        val_bank,
        config.val_support,
        config.val_per_task,
        config.val_synthetic,
        synth=SynthConfig(size=config.grid),
        empty_per_task=empty,
        per_family=per_family,
    )


def _new_network(config: TrainConfig, checkpoint: dict | None = None) -> UniverSeg:
    """The run's network: for a resumed run, of the checkpoint's architecture (its weights are loaded
    afterwards, so the ``init_weights`` file is not needed again); else fresh, or the source weights'
    network, decoder included, at the run's grid."""
    torch.manual_seed(config.seed)
    if checkpoint is not None:
        return UniverSeg(config_from_state_dict(checkpoint["model"], grid_size=config.grid))
    if config.init_weights:
        source = network_from_file(config.init_weights)
        net = UniverSeg(replace(source.config, grid_size=config.grid))
        net.load_state_dict(source.state_dict())
        return net
    return build_network(config.widths, grid_size=config.grid)


def check_architecture(config: TrainConfig) -> None:
    """Refuse widths and a grid the network cannot be built or run with, before anything is written."""
    levels = len(config.widths)
    if levels < 2:
        raise OpenSegError(f"a network needs at least 2 encoder widths, got {list(config.widths)}")
    divisor = UniverSegConfig(encoder_channels=config.widths).downsampling
    if config.grid < divisor or config.grid % divisor:
        source = f" (those of {config.init_weights})" if config.init_weights else ""
        raise OpenSegError(
            f"the grid must be a multiple of {divisor} with {levels} encoder widths{source}, "
            f"got {config.grid}"
        )


class _StepBatches(torch.utils.data.Dataset):
    """The training batches of steps ``first .. end - 1``, in order; item ``i`` is step ``first + i``."""

    def __init__(self, first: int, end: int, config: TrainConfig, bank: TaskBank | None, synth: SynthConfig):
        self.first, self.end, self.config, self.bank, self.synth = first, end, config, bank, synth

    def __len__(self) -> int:
        return max(0, self.end - self.first)

    def __getitem__(self, index: int) -> Episodes:
        return training_batch(
            self.first + index, self.config.seed, self.config.episodes, self.bank, self.synth
        )


def _step_batches(batches: _StepBatches, workers: int):
    """Iterate over ``batches`` in step order, built here (``workers == 0``) or in worker processes."""
    if workers <= 0:
        return (batches[i] for i in range(len(batches)))
    # batch_size=None: each item already is a whole batch; workers build the next steps ahead.
    loader = torch.utils.data.DataLoader(
        batches,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        prefetch_factor=4,
        persistent_workers=False,
    )
    return iter(loader)


def _to_device(episodes: Episodes, device: torch.device) -> tuple[torch.Tensor, ...]:
    cl = torch.channels_last
    return (
        episodes.query.to(device).contiguous(memory_format=cl),
        episodes.query_masks.to(device),
        episodes.support_images.to(device),
        episodes.support_masks.to(device),
    )


@torch.no_grad()
def validate(
    net: UniverSeg, sets: dict[str, Episodes], device: torch.device, batch: int = 16
) -> dict[str, float]:
    """Mean hard Dice (threshold 0.5) per family of fixed validation episodes."""
    net.eval()
    scores = {}
    for family, episodes in sets.items():
        query, masks, images, labels = _to_device(episodes, device)
        dice = []
        for start in range(0, len(query), batch):
            sl = slice(start, start + batch)
            logits = fast_forward(net, query[sl], images[sl], labels[sl])
            dice.append(hard_dice(logits > 0, masks[sl]))
        scores[family] = float(torch.cat(dice).mean())
    net.train()
    return scores


class _Run:
    """Mutable state of a run and how it is saved."""

    def __init__(
        self, config: TrainConfig, out_dir: Path, device: torch.device, checkpoint: dict | None = None
    ):
        self.config, self.out_dir, self.device = config, out_dir, device
        self.net = _new_network(config, checkpoint).to(device).to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=config.lr)
        self.step = 0
        self.history: list[dict] = []
        self.best = -1.0
        #: Losses of the steps since the last logged record (checkpointed: a run interrupted between
        #: records logs, once resumed, the same averages as an uninterrupted one).
        self.unlogged_losses: list[float] = []

    def save(self) -> None:
        payload = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "step": self.step,
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "best": self.best,
            "unlogged_losses": self.unlogged_losses,
        }
        with atomic_path(self.out_dir / CHECKPOINT, overwrite=True) as tmp:
            torch.save(payload, tmp)
        save_weights(self.net, self.out_dir / "weights.pt", self.info())

    def load(self, state: dict) -> None:
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.history, self.best = int(state["step"]), list(state["history"]), float(state["best"])
        self.unlogged_losses = [float(x) for x in state.get("unlogged_losses", [])]
        torch.set_rng_state(state["torch_rng"].cpu())
        # The log may hold records past the checkpoint (a killed run); the checkpoint's history wins.
        with atomic_path(self.out_dir / "log.jsonl", overwrite=True) as tmp:
            tmp.write_text("".join(json.dumps(entry) + "\n" for entry in self.history))

    def info(self, **extra) -> dict:
        return {
            "trained_by": "napari-openseg training.trainer",
            "step": self.step,
            "seed": self.config.seed,
            "train_config": json.dumps(self.config.to_dict()),
            **extra,
        }

    def record(self, entry: dict) -> None:
        self.history.append(entry)
        with open(self.out_dir / "log.jsonl", "a") as handle:
            handle.write(json.dumps(entry) + "\n")


def read_checkpoint(out_dir: Path) -> dict:
    """The checkpoint stored in a run folder, or a message that says what to do."""
    return load_format_file(
        Path(out_dir) / CHECKPOINT,
        CHECKPOINT_FORMAT,
        missing="{path} does not exist: nothing to resume; start a run without --resume",
        unreadable="{path} is not a loadable training checkpoint ({detail})",
        foreign="{path} is not a napari-openseg training checkpoint",
    )


def read_checkpoint_config(out_dir: Path) -> TrainConfig:
    """The config stored in a run folder's checkpoint."""
    return TrainConfig.from_dict(read_checkpoint(out_dir)["config"])


def iter_train(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    device: str = "auto",
    data_dir: Path | None = None,
    stop_after: int | None = None,
    workers: int = 0,
) -> Generator[Progress, None, dict]:
    """Train (or resume) the run in ``out_dir``; yields :class:`Progress` per step.

    ``workers`` processes build the batches ahead of the step that needs them (0: built in this
    process); the batches, and so the run, are the same either way.

    ``payload`` holds ``step``, ``loss``, ``lr``, ``images_per_s`` and, after a validation, ``val``
    (Dice per family). ``stop_after`` ends this call after that many steps (checkpointed), as an
    interruption would. Returns the last record.
    """
    out_dir = Path(out_dir)
    torch_device = resolve_device(device)
    # Subnormal floats (tiny gradients, Adam moments) make CPU convolutions many times slower.
    torch.set_flush_denormal(True)
    checkpoint = None
    if resume:
        # A resumed run keeps its stored settings; only its length and decay may change.
        checkpoint = read_checkpoint(out_dir)
        stored = TrainConfig.from_dict(checkpoint["config"])
        config = replace(
            stored,
            steps=config.steps or stored.steps,
            decay_start=stored.decay_start if config.decay_start is None else config.decay_start,
        )
        if config.steps <= int(checkpoint["step"]):
            raise OpenSegError(
                f"the run in {out_dir} is at step {int(checkpoint['step'])} of {config.steps} "
                "already; pass a larger --steps to train it on"
            )
    elif (out_dir / CHECKPOINT).exists():
        raise OpenSegError(
            f"{out_dir} already holds a run; pass --resume to continue it or pick another folder"
        )
    elif config.init_weights:  # fine-tuning keeps the source's architecture
        config = replace(config, widths=network_from_file(config.init_weights).config.encoder_channels)
    check_architecture(config)
    run = _Run(config, out_dir, torch_device, checkpoint)
    if checkpoint is not None:
        run.load(checkpoint)
    bank, val_bank = real_banks(config, data_dir)
    synth = SynthConfig(size=config.grid)
    val_sets = _validation_sets(config, val_bank)
    out_dir.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves no empty folder behind
    amp_dtype, scaler = _amp(torch_device)
    last: dict = {}
    end = config.steps if stop_after is None else min(config.steps, run.step + stop_after)
    yield Progress(run.step, config.steps, "training")
    tick, images_seen, timed_steps = time.perf_counter(), 0, 0
    losses = run.unlogged_losses
    batches = _step_batches(_StepBatches(run.step, end, config, bank, synth), workers)
    first_step = run.step
    try:
        for batch in batches:
            query, masks, images, labels = _to_device(batch, torch_device)
            for group in run.optimizer.param_groups:
                group["lr"] = learning_rate(config, run.step)
            with torch.autocast(torch_device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = fast_forward(run.net, query, images, labels)
            loss = episode_loss(logits, masks, config.bce_weight)
            run.optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(run.optimizer)
            torch.nn.utils.clip_grad_norm_(run.net.parameters(), config.grad_clip)
            scaler.step(run.optimizer)
            scaler.update()
            run.step += 1
            losses.append(loss.item())
            timed_steps += 1
            images_seen += query.shape[0] * (1 + images.shape[1])
            payload = {"step": run.step, "loss": losses[-1], "lr": learning_rate(config, run.step - 1)}
            if run.step % config.log_every == 0 or run.step == end:
                elapsed = time.perf_counter() - tick
                payload.update(
                    loss=sum(losses) / len(losses),
                    images_per_s=images_seen / max(elapsed, 1e-9),
                    seconds_per_step=elapsed / timed_steps,
                    support_size=int(images.shape[1]),
                )
                run.record(dict(payload, time=time.time()))
                tick, images_seen, timed_steps = time.perf_counter(), 0, 0
                losses.clear()
            if run.step % config.val_every == 0 or run.step == config.steps:
                scores = validate(run.net, val_sets, torch_device)
                mean = sum(scores.values()) / len(scores)
                payload["val"] = dict(scores, mean=mean)
                run.record({"step": run.step, "val": payload["val"], "time": time.time()})
                if mean > run.best:  # the score is recorded once best.pt is written, so they never disagree
                    save_weights(run.net, out_dir / "best.pt", run.info(val_dice=payload["val"]))
                    run.best = mean
            if run.step % config.checkpoint_every == 0 or run.step == end or "val" in payload:
                run.save()
            last = payload
            yield Progress(run.step, config.steps, "training", payload)
    except BaseException:
        # Keep what was learnt since the last checkpoint (also on Ctrl-C), then let the error through;
        # a run that failed before its first step has nothing to keep (and may be started again).
        if run.step > first_step:
            run.save()
        raise
    return last


def _amp(device: torch.device):
    """Autocast dtype (None on CPU) and a gradient scaler (a no-op unless float16)."""
    if device.type != "cuda":
        return None, torch.amp.GradScaler("cpu", enabled=False)
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, torch.amp.GradScaler("cuda", enabled=False)
    return torch.float16, torch.amp.GradScaler("cuda")


def train(config: TrainConfig, out_dir: str | Path, **kwargs) -> dict:
    """Run :func:`iter_train` to the end; returns the last record."""
    return run_to_end(iter_train(config, out_dir, **kwargs))


def validation_dice(
    weights: str | Path, data_dir: Path | None, config: TrainConfig | None = None
) -> dict[str, float]:
    """The run's validation Dice (hippocampus val split, held-out synthetic families) of a weights file."""
    config = config or TrainConfig()
    net = network_from_file(weights)
    config = replace(config, grid=net.config.grid_size)
    _, val_bank = real_banks(config, data_dir)
    sets = _validation_sets(config, val_bank)
    scores = validate(net, sets, torch.device("cpu"))
    return dict(scores, mean=sum(scores.values()) / len(scores))

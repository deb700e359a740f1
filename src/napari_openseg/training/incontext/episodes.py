"""Episodes: batches of (query, support set) drawn from synthetic and real tasks, and their loss.

Every batch is a pure function of ``(seed, step)``: its random numbers come from generators seeded
with both, never from global state, so a resumed run sees exactly the batches an uninterrupted run
would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from napari_openseg.training.incontext.augment import (
    InTaskAugment,
    TaskAugment,
    augment_entries,
    augment_task,
)
from napari_openseg.training.incontext.synth import SynthConfig, _seed_int, synthetic_task
from napari_openseg.training.incontext.tasks import SliceTask, TaskBank, sample_episode

#: Synthetic validation families use this "step", which training never reaches: they are held out.
VALIDATION_STEP = 1 << 40
DEFAULT_SYNTH, DEFAULT_IN_TASK, DEFAULT_TASK_LEVEL = SynthConfig(), InTaskAugment(), TaskAugment()


@dataclass(frozen=True)
class EpisodeConfig:
    """What a training batch is made of."""

    batch_size: int = 8
    support_min: int = 1
    support_max: int = 16
    #: How S is drawn per step: ``"uniform"`` over [min, max], or ``"log-uniform"``, which gives small
    #: support sets as many steps as large ones (each doubling of S is equally likely).
    support_sampling: str = "uniform"
    real_fraction: float = 0.3
    #: Share of the real-task episodes whose query is a slice without the label (empty target).
    empty_fraction: float = 0.0
    in_task_augment: bool = True
    task_augment: bool = True
    #: How a real episode's task is drawn: ``"task"`` (every task equally likely, as phases 1-6) or
    #: ``"family"`` (every family equally likely, then a task of it: no set with many labels dominates).
    task_sampling: str = "task"


@dataclass
class Episodes:
    """``query "B 1 g g"``, ``query_masks "B 1 g g"``, ``support_images``/``support_masks "B S 1 g g"``,
    and the source of each row (``"synthetic"`` or a real task's name)."""

    query: torch.Tensor
    query_masks: torch.Tensor
    support_images: torch.Tensor
    support_masks: torch.Tensor
    sources: list[str]


def stack_episodes(items: list[tuple[torch.Tensor, torch.Tensor]], sources: list[str]) -> Episodes:
    """Stack ``(images, masks)`` pairs of ``"(1+S) 1 g g"`` (entry 0 is the query) into a batch."""
    images = torch.stack([im for im, _ in items])
    masks = torch.stack([m for _, m in items])
    return Episodes(images[:, 0], masks[:, 0], images[:, 1:], masks[:, 1:], sources)


def draw_support_size(rng: np.random.Generator, config: EpisodeConfig) -> int:
    """The support size S of one step, drawn as ``config.support_sampling`` says."""
    low, high = config.support_min, config.support_max
    if config.support_sampling == "uniform":
        return int(rng.integers(low, high + 1))
    if config.support_sampling == "log-uniform":
        return min(high, int(np.exp(rng.uniform(np.log(low), np.log(high + 1)))))
    raise ValueError(f"support_sampling must be 'uniform' or 'log-uniform', got {config.support_sampling!r}")


def draw_task(bank: TaskBank, rng: np.random.Generator, sampling: str = "task") -> SliceTask:
    """A real task of ``bank``: uniformly over tasks, or over families and then their tasks."""
    if sampling == "task":
        return bank.tasks[int(rng.integers(len(bank.tasks)))]
    if sampling == "family":
        by_family = bank.tasks_by_family()
        family = sorted(by_family)[int(rng.integers(len(by_family)))]
        return by_family[family][int(rng.integers(len(by_family[family])))]
    raise ValueError(f"task_sampling must be 'task' or 'family', got {sampling!r}")


def training_batch(
    step: int,
    seed: int,
    config: EpisodeConfig,
    bank: TaskBank | None,
    synth: SynthConfig = DEFAULT_SYNTH,
    in_task: InTaskAugment = DEFAULT_IN_TASK,
    task_level: TaskAugment = DEFAULT_TASK_LEVEL,
) -> Episodes:
    """The batch of training step ``step``; one support size S for the whole batch."""
    rng = np.random.default_rng([seed, step, 1])
    gen = torch.Generator().manual_seed(_seed_int((seed, step, 2)))
    size = draw_support_size(rng, config)
    items, sources = [], []
    for row in range(config.batch_size):
        if bank is not None and bank.tasks and rng.random() < config.real_fraction:
            task = draw_task(bank, rng, config.task_sampling)
            # Drawn only when used, so runs without empty queries keep their random stream.
            empty = config.empty_fraction > 0 and rng.random() < config.empty_fraction
            images, masks = sample_episode(bank, task, size, rng, empty_query=empty)
            sources.append(task.name + (":empty" if empty else ""))
        else:
            images, masks = synthetic_task((seed, step, row), size + 1, synth)
            sources.append("synthetic")
        if config.in_task_augment:
            images, masks = augment_entries(images, masks, gen, in_task)
        if config.task_augment:
            images, masks = augment_task(images, masks, gen, task_level)
        items.append((images, masks))
    return stack_episodes(items, sources)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Mean over the batch of ``1 - soft Dice`` between ``sigmoid(logits)`` and ``target`` (``"B 1 H W"``)."""
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
    prob = torch.sigmoid(logits.float()).flatten(1)
    target = target.float().flatten(1)
    overlap = (prob * target).sum(dim=1)
    dice = (2 * overlap + eps) / (prob.sum(dim=1) + target.sum(dim=1) + eps)
    return 1.0 - dice.mean()


def episode_loss(logits: torch.Tensor, target: torch.Tensor, bce_weight: float = 0.0) -> torch.Tensor:
    """Soft Dice loss plus ``bce_weight`` x binary cross-entropy.

    Soft Dice alone barely pushes a blob away on an empty target (its gradient there shrinks with the
    blob's area squared); cross-entropy gives every wrong pixel the same push."""
    loss = soft_dice_loss(logits, target)
    if bce_weight > 0:
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target.float())
        loss = loss + bce_weight * bce
    return loss


def hard_dice(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row Dice of binary ``"B ..."`` arrays; 1 where both are empty."""
    prediction = prediction.bool().flatten(1)
    target = target.bool().flatten(1)
    overlap = (prediction & target).sum(dim=1).float()
    total = prediction.sum(dim=1).float() + target.sum(dim=1).float()
    return torch.where(total > 0, 2 * overlap / total.clamp_min(1), torch.ones_like(total))


def validation_episodes(
    bank: TaskBank | None,
    support_size: int,
    per_task: int,
    synthetic: int,
    seed: int = 777,
    synth: SynthConfig = DEFAULT_SYNTH,
    empty_per_task: int = 0,
    per_family: int | None = None,
) -> dict[str, Episodes]:
    """Fixed, unaugmented validation episodes by family: ``per_task`` per real task and ``synthetic``
    episodes of held-out synthetic families (a seed namespace training never uses).

    ``empty_per_task`` adds a family ``"<family>:empty"`` of queries without the label; their Dice
    (1 for an empty prediction, else 0) is the share of empty slices left empty. ``per_family`` caps
    each family at that many episodes (and its empty family at half as many), drawn from its tasks
    in turn, so that a set with many labels costs no more than one with few."""
    rng = np.random.default_rng([seed, 0])
    out: dict[str, list] = {}
    names: dict[str, list[str]] = {}
    if bank is not None and per_family is not None:
        for family, tasks in sorted(bank.tasks_by_family().items()):
            order = rng.permutation(len(tasks))
            for i in range(per_family):
                task = tasks[int(order[i % len(tasks)])]
                out.setdefault(family, []).append(sample_episode(bank, task, support_size, rng))
                names.setdefault(family, []).append(task.name)
            with_absent = [tasks[int(j)] for j in order if len(tasks[int(j)].absent_ids)]
            for i in range(per_family // 2 if empty_per_task and with_absent else 0):
                task = with_absent[i % len(with_absent)]
                out.setdefault(family + ":empty", []).append(
                    sample_episode(bank, task, support_size, rng, empty_query=True)
                )
                names.setdefault(family + ":empty", []).append(task.name)
    elif bank is not None:
        for task in bank.tasks:
            for _ in range(per_task):
                out.setdefault(task.family, []).append(sample_episode(bank, task, support_size, rng))
                names.setdefault(task.family, []).append(task.name)
            for _ in range(empty_per_task if len(task.absent_ids) else 0):
                family = task.family + ":empty"
                out.setdefault(family, []).append(
                    sample_episode(bank, task, support_size, rng, empty_query=True)
                )
                names.setdefault(family, []).append(task.name)
    for i in range(synthetic):
        out.setdefault("synthetic", []).append(
            synthetic_task((seed, VALIDATION_STEP, i), support_size + 1, synth)
        )
        names.setdefault("synthetic", []).append("synthetic")
    return {family: stack_episodes(items, names[family]) for family, items in out.items()}

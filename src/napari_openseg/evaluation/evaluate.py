"""Dice of in-context weights and of three baselines on a labelled folder, task by task.

For each task (label value, and axis for volumes; see :mod:`.data`) the queries are processed in
batches of up to ``batch_size`` slices of one case. Each batch gets K support subsets of S entries,
drawn (seeded) from the task's support pool; every method sees the same subsets:

* ``model``: the weights, exactly as at inference (grid placement, fast formulation, the K sigmoid
  outputs combined by the area-matched mean of :mod:`~napari_openseg.core.ensemble`, mapped back to
  the query's shape, foreground where >= 0.5);
* ``random_init``: a network of the same architecture with random weights (seeded);
* ``label_prior``: the mean of the support masks (of all K subsets), >= 0.5;
* ``pixel_classifier``: a random forest on multi-scale filter features fitted to the subset's pixels
  (mean of the K forests' probabilities), >= 0.5.

Dice is computed per query slice at its own resolution. A task's score is the mean (and standard
deviation) over its queries; the summary averages tasks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.ensemble import EnsembleMean
from ..core.inference import support_tensors
from ..core.metrics import dice_score
from ..core.preprocess import from_grid, to_grid
from ..core.progress import Progress, run_to_end
from ..errors import OpenSegError
from .baselines import PixelClassifier, label_prior
from .data import BUNDLED_WEIGHTS_CASES, EvalFolder, EvalTask, Query, build_tasks, find_folder, split_roles

log = logging.getLogger(__name__)

METHODS = ("model", "random_init", "label_prior", "pixel_classifier")


@dataclass
class EvaluationReport:
    """Per-task Dice lists by method, and the settings that produced them."""

    settings: dict
    tasks: dict[str, dict] = field(default_factory=dict)

    def task_scores(self, key: str) -> dict[str, dict]:
        task = self.tasks[key]
        return {m: _stats(task["dice"][m]) for m in task["dice"]}

    def summary(self) -> dict[str, dict]:
        """Per method: mean and std over tasks of the task means, and the number of tasks."""
        methods = {m for t in self.tasks.values() for m in t["dice"]}
        out = {}
        for method in [m for m in METHODS if m in methods]:
            means = [float(np.mean(t["dice"][method])) for t in self.tasks.values() if t["dice"].get(method)]
            out[method] = {"mean": float(np.mean(means)), "std": float(np.std(means)), "tasks": len(means)}
        return out

    def to_dict(self) -> dict:
        tasks = {}
        for key, task in self.tasks.items():
            tasks[key] = {k: v for k, v in task.items() if k != "dice"}
            tasks[key].update(self.task_scores(key))
        return {"settings": self.settings, "summary": self.summary(), "tasks": tasks}

    def write_json(self, path: str | Path, overwrite: bool = False) -> Path:
        from ..io import atomic_path

        with atomic_path(path, overwrite) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2))
        return Path(path)

    def split_note(self) -> str:
        """Where support and queries came from (the support split does not apply to one case), and
        what makes a number mean less than it seems: queries the bundled weights were trained on,
        tasks whose support pool was smaller than S."""
        s = self.settings
        if s.get("split") == "by slice":
            note = ("one case in the folder: support and queries are different slices of it "
                    "(the support split does not apply)")
        else:
            source = s.get("support_from", s.get("support_split", "val"))
            note = f"support from the {source} cases, queries from the test cases"
            if source != s.get("support_split", source):
                note += f" (no case fell in {s['support_split']}, so support came from {source})"
        seen = s.get("queries_in_bundled_training") or []
        if seen:
            note += (f"\nwarning: {len(seen)} query case(s) were training or selection cases of the bundled "
                     f"weights ({', '.join(seen[:4])}{', ...' if len(seen) > 4 else ''}): their Dice overstates")
        missing = s.get("labels_without_task") or []
        if missing:
            note += (f"\nlabel value(s) {', '.join(map(str, missing))}: no task (not in both the support "
                     "and the query cases)")
        small = [key for key, task in self.tasks.items() if task["support_pool"] <= s.get("support_size", 0)]
        if small:
            note += (f"\n{len(small)} task(s) had at most S support entries and used their whole pool once "
                     f"(smaller S, K = 1): {', '.join(small[:4])}{', ...' if len(small) > 4 else ''}")
        return note

    def table(self) -> str:
        """Plain-text table: one row per task, one column (mean ± std) per method."""
        methods = list(self.summary())
        lines = [f"{'task':<24}{'n':>5}  " + "".join(f"{m:>20}" for m in methods)]
        for key in self.tasks:
            scores = self.task_scores(key)
            cells = "".join(f"{scores[m]['mean']:>13.3f} ± {scores[m]['std']:.2f}" for m in methods)
            lines.append(f"{key:<24}{scores[methods[0]]['n']:>5}  {cells}")
        summary = self.summary()
        lines.append(f"{'mean over tasks':<29}  " + "".join(f"{summary[m]['mean']:>20.3f}" for m in methods))
        return "\n".join(lines)


def _stats(values: Sequence[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def query_batches(queries: list[Query], size: int) -> list[list[Query]]:
    """Consecutive queries of one case and one shape, at most ``size`` per batch."""
    batches: list[list[Query]] = []
    for query in queries:
        last = batches[-1] if batches else None
        if last and len(last) < size and last[0].case == query.case and last[0].image.shape == query.image.shape:
            last.append(query)
        else:
            batches.append([query])
    return batches


def support_subsets(task: EvalTask, size: int, ensemble: int, rng: np.random.Generator) -> list[list]:
    """K seeded subsets of S support entries (the whole pool once when it holds at most S)."""
    pool = task.support
    if len(pool) <= size:
        return [pool]
    return [[pool[i] for i in sorted(rng.choice(len(pool), size, replace=False))] for _ in range(ensemble)]


@torch.no_grad()
def network_probabilities(
    net, images: np.ndarray, subsets: list[list], device: torch.device, rule: str = "area-matched"
) -> np.ndarray:
    """Foreground probability ``"b H W"`` of the network, combined over the support subsets by ``rule``."""
    from ..model.fast import encode_support, fast_forward

    grid = net.config.grid_size
    query, mapping = to_grid(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(device), grid)
    query = query.contiguous(memory_format=torch.channels_last)
    members = EnsembleMean(0.5, rule)
    for subset in subsets:
        support_images, support_masks = support_tensors(subset, grid, "pad", device, torch.float32)
        members.add(torch.sigmoid(fast_forward(net, query, encoded=encode_support(net, support_images, support_masks))))
    return from_grid(members.result(), mapping)[:, 0].clamp(0, 1).cpu().numpy()


def networks(model, methods: Sequence[str], seed: int, device: torch.device) -> tuple[dict, int]:
    """Prepared networks by method name, and the grid of ``model`` (the label prior uses it too)."""
    from ..model.fast import prepare_for_inference
    from ..model.registry import load_model
    from ..model.universeg import UniverSeg

    net = model if isinstance(model, UniverSeg) else load_model(model, "cpu")
    nets = {}
    if "model" in methods:
        nets["model"] = prepare_for_inference(net, device, torch.float32)
    if "random_init" in methods:
        torch.manual_seed(seed)
        nets["random_init"] = prepare_for_inference(UniverSeg(net.config), device, torch.float32)
    return nets, net.config.grid_size


def task_episodes(
    task: EvalTask, support_size: int, ensemble: int, seed: int, max_queries: int | None = None, batch_size: int = 8
) -> Generator[tuple[list[Query], list[list]], None, None]:
    """``(query batch, K support subsets)`` of one task, seeded by ``(seed, label, axis)``: every method
    (and every benchmark that calls this) sees the same query sample and the same support draws."""
    rng = np.random.default_rng([seed, task.label, 0 if task.axis is None else task.axis + 1])
    queries = task.queries
    if max_queries is not None and len(queries) > max_queries:
        queries = [queries[i] for i in sorted(rng.choice(len(queries), max_queries, replace=False))]
    for batch in query_batches(queries, batch_size):
        yield batch, support_subsets(task, support_size, ensemble, rng)


def load_tasks(
    folder: str | Path,
    support_split: str = "val",
    label_values: Sequence[int] | None = None,
    axes: Sequence[int] | None = None,
) -> Generator[Progress, None, tuple[EvalFolder, list[EvalTask]]]:
    """Read a labelled folder into tasks (yields progress per case); returns ``(folder, tasks)``."""
    evaluation_folder = find_folder(folder)
    tasks: list[EvalTask] = []
    for stage, found in build_tasks(evaluation_folder, support_split, label_values):
        tasks = found
        yield Progress(0, 0, stage)
    tasks = [t for t in tasks if (label_values is None or t.label in label_values)
             and (axes is None or t.axis is None or t.axis in axes)]
    if not tasks:
        raise OpenSegError(f"no task left after choosing labels {label_values} and axes {axes}")
    return evaluation_folder, tasks


def iter_evaluate_tasks(
    tasks: Sequence[EvalTask],
    nets: dict,
    grid: int,
    *,
    methods: Sequence[str] = METHODS,
    support_size: int = 16,
    ensemble: int = 1,
    seed: int = 0,
    max_queries: int | None = None,
    batch_size: int = 8,
    device: torch.device | None = None,
    ensemble_rule: str = "area-matched",
) -> Generator[Progress, None, dict[str, dict]]:
    """Dice lists per method for every task; ``nets`` maps ``model``/``random_init`` to prepared networks.

    ``ensemble_rule`` combines the networks' K predictions (:mod:`~napari_openseg.core.ensemble`)."""
    device = device or torch.device("cpu")
    results: dict[str, dict] = {}
    for number, task in enumerate(tasks):
        dice: dict[str, list[float]] = {m: [] for m in methods}
        for batch, subsets in task_episodes(task, support_size, ensemble, seed, max_queries, batch_size):
            images = np.stack([q.image for q in batch])
            probs: dict[str, np.ndarray] = {}
            for name in ("model", "random_init"):
                if name in methods:
                    probs[name] = network_probabilities(nets[name], images, subsets, device, ensemble_rule)
            if "label_prior" in methods:
                prior = label_prior([e for s in subsets for e in s], images.shape[1:], grid)
                probs["label_prior"] = np.broadcast_to(prior, images.shape)
            if "pixel_classifier" in methods:
                forests = [PixelClassifier(s, seed) for s in subsets]
                probs["pixel_classifier"] = np.stack(
                    [np.mean([f.predict(q.image) for f in forests], axis=0) for q in batch])
            for name in methods:
                dice[name].extend(dice_score(p >= 0.5, q.mask) for p, q in zip(probs[name], batch))
            yield Progress(number, len(tasks), f"evaluating {task.name}")  # a task can take minutes: stop here
        results[task.key] = {"label": task.label, "axis": task.axis, "support_pool": len(task.support),
                             "queries_available": len(task.queries), "dice": dice}
        yield Progress(number + 1, len(tasks), f"evaluated {task.name}")
    return results


def iter_evaluate(
    folder: str | Path,
    model=None,
    *,
    support_size: int = 16,
    ensemble: int = 1,
    seed: int = 0,
    support_split: str = "val",
    max_queries: int | None = None,
    methods: Sequence[str] = METHODS,
    label_values: Sequence[int] | None = None,
    axes: Sequence[int] | None = None,
    batch_size: int = 8,
    device: str = "cpu",
) -> Generator[Progress, None, EvaluationReport]:
    """Evaluate ``model`` (weights name, path or network; ``None`` = default) and the baselines.

    ``max_queries`` caps the queries per task (a seeded sample); ``label_values`` and ``axes`` restrict
    the tasks. Yields progress per case read and per task; returns an :class:`EvaluationReport`.
    """
    from ..core.device import resolve_device

    unknown = set(methods) - set(METHODS)
    if unknown or not methods:
        raise OpenSegError(f"methods must be among {METHODS}, got {list(methods)}")
    methods = list(dict.fromkeys(methods))  # a method named twice would count every query twice
    if support_size < 1 or ensemble < 1:
        raise OpenSegError(f"support size and ensemble must be >= 1, got S={support_size}, K={ensemble}")
    if max_queries is not None and max_queries < 1:
        raise OpenSegError(f"--max-queries must be >= 1, got {max_queries}")
    torch_device = resolve_device(device)
    nets, grid = networks(model, methods, seed, torch_device)
    found, tasks = yield from load_tasks(folder, support_split, label_values, axes)
    cases = len(found.pairs)
    query_cases = sorted({q.case for t in tasks for q in t.queries})
    settings = {
        "folder": str(folder), "layout": found.layout, "cases": cases,
        "split": "by slice" if cases == 1 else "by case", "support_size": support_size,
        "ensemble": ensemble, "seed": seed, "support_split": support_split,
        "support_from": split_roles(sorted(found.pairs), support_split)[2] if cases > 1 else None,
        "queries_in_bundled_training": sorted(set(query_cases) & BUNDLED_WEIGHTS_CASES),
        "labels_without_task": sorted(set(label_values or []) - {t.label for t in tasks}),
        "max_queries": max_queries, "weights": _weights_name(model), "grid": grid, "methods": list(methods),
    }
    results = yield from iter_evaluate_tasks(
        tasks, nets, grid, methods=methods, support_size=support_size, ensemble=ensemble, seed=seed,
        max_queries=max_queries, batch_size=batch_size, device=torch_device)
    return EvaluationReport(settings, results)


def _weights_name(model) -> str:
    if model is None:
        return "default"
    if isinstance(model, (str, Path)):
        return str(model)
    source = getattr(model, "weights_info", {}).get("source")
    return str(source) if source else f"an unsaved {type(model).__name__} network"


def evaluate(folder: str | Path, model=None, **kwargs) -> EvaluationReport:
    """Run :func:`iter_evaluate` to the end."""
    return run_to_end(iter_evaluate(folder, model, **kwargs))

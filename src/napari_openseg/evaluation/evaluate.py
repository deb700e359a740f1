"""Dice of the segmentation engine, of each of its methods and of two baselines on a labelled
folder, task by task, with the engine's own cross-validated estimate beside each measurement.

For each task (label value, and axis for volumes; see :mod:`.data`) the queries are processed in
batches of up to ``batch_size`` slices of one case. Each batch gets K support subsets of S entries,
drawn (seeded) from the task's support pool; every method sees the same subsets, and the
:class:`~napari_openseg.core.engine.Engine` is fitted to their entries exactly as at inference:

* ``model``: the engine as users run it (``method="auto"``: per task, the method with the best
  cross-validated Dice on the support entries);
* ``network``, ``pixel_classifier``, ``stacked``: each of the engine's methods on its own (the
  network: grid placement, fast formulation, the K outputs combined by the area-matched mean of
  :mod:`~napari_openseg.core.ensemble`; the pixel classifier: filters of the pixels; stacked: filters
  and the network's probability, see :mod:`~napari_openseg.core.stacking`);
* ``random_init``: a network of the same architecture with random weights (seeded);
* ``label_prior``: the mean of the support masks (of all K subsets), >= 0.5.

Dice is computed per query slice at its own resolution. A task's score is the mean (and standard
deviation) over its queries; the summary averages tasks. ``estimate`` holds, per engine method, the
mean over the batches of the cross-validated Dice the engine predicted from the support alone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from napari_openseg.core.engine import (
    Engine,
    Network,
    load_network,
    prepare_network,
    weights_name,
)
from napari_openseg.core.engine_settings import DEFAULT_ENSEMBLE, DEFAULT_SUPPORT_SIZE, DEFAULT_THRESHOLD
from napari_openseg.core.metrics import dice_score
from napari_openseg.core.progress import Progress, run_to_end
from napari_openseg.errors import OpenSegError
from napari_openseg.evaluation.baselines import label_prior
from napari_openseg.evaluation.data import (
    BUNDLED_WEIGHTS_CASES,
    EvalFolder,
    EvalTask,
    Query,
    build_tasks,
    find_folder,
    split_roles,
)

log = logging.getLogger(__name__)

METHODS = ("model", "network", "pixel_classifier", "stacked", "random_init", "label_prior")
#: Report names of the engine's methods (``None``: each task's own choice, the engine as users run it).
ENGINE_METHODS = {
    "model": None,
    "network": "network",
    "pixel_classifier": "pixel-classifier",
    "stacked": "stacked",
}


@dataclass
class EvaluationReport:
    """Per-task Dice lists by method, and the settings that produced them."""

    settings: dict
    tasks: dict[str, dict] = field(default_factory=dict)

    def task_scores(self, key: str) -> dict[str, dict]:
        """Per method: mean, std and n of the Dice, and ``estimate`` (the engine's cross-validated
        Dice from the support, mean over batches) where the method has one."""
        task = self.tasks[key]
        scores = {m: _stats(task["dice"][m]) for m in task["dice"]}
        for method, values in task.get("estimate", {}).items():
            if values and method in scores:
                scores[method]["estimate"] = float(np.mean(values))
        return scores

    def summary(self) -> dict[str, dict]:
        """Per method: mean and std over tasks of the task means, and the number of tasks."""
        methods = {m for t in self.tasks.values() for m in t["dice"]}
        out = {}
        for method in [m for m in METHODS if m in methods]:
            means = [float(np.mean(t["dice"][method])) for t in self.tasks.values() if t["dice"].get(method)]
            out[method] = {"mean": float(np.mean(means)), "std": float(np.std(means)), "tasks": len(means)}
            pairs = [
                (self.task_scores(k)[method]["estimate"], self.task_scores(k)[method]["mean"])
                for k in self.tasks
                if "estimate" in self.task_scores(k).get(method, {})
            ]
            if pairs:
                out[method]["estimate_error"] = float(np.mean([abs(e - m) for e, m in pairs]))
        return out

    def to_dict(self) -> dict:
        tasks = {}
        for key, task in self.tasks.items():
            tasks[key] = {k: v for k, v in task.items() if k not in ("dice", "estimate")}
            tasks[key].update(self.task_scores(key))
        return {"settings": self.settings, "summary": self.summary(), "tasks": tasks}

    def write_json(self, path: str | Path, overwrite: bool = False) -> Path:
        from napari_openseg.io import atomic_path

        with atomic_path(path, overwrite) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2))
        return Path(path)

    def split_note(self) -> str:
        """Where support and queries came from (the support split does not apply to one case), and
        what makes a number mean less than it seems: queries the bundled weights were trained on,
        tasks whose support pool was smaller than S."""
        s = self.settings
        if s.get("split") == "by slice":
            note = (
                "one case in the folder: support and queries are different slices of it "
                "(the support split does not apply)"
            )
        else:
            source = s.get("support_from", s.get("support_split", "val"))
            note = f"support from the {source} cases, queries from the test cases"
            if source != s.get("support_split", source):
                note += f" (no case fell in {s['support_split']}, so support came from {source})"
        seen = s.get("queries_in_bundled_training") or []
        if seen:
            note += (
                f"\nwarning: {len(seen)} query case(s) were training or selection cases of the bundled "
                f"weights ({', '.join(seen[:4])}{', ...' if len(seen) > 4 else ''}): their Dice overstates"
            )
        missing = s.get("labels_without_task") or []
        if missing:
            note += (
                f"\nlabel value(s) {', '.join(map(str, missing))}: no task (not in both the support "
                "and the query cases)"
            )
        small = [key for key, task in self.tasks.items() if task["support_pool"] <= s.get("support_size", 0)]
        if small:
            note += (
                f"\n{len(small)} task(s) had at most S support entries and used their whole pool once "
                f"(smaller S, K = 1): {', '.join(small[:4])}{', ...' if len(small) > 4 else ''}"
            )
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

    def estimate_table(self) -> str:
        """Plain-text table of the engine's methods: measured Dice beside the cross-validated
        estimate, per task, and the mean absolute error of the estimates; empty without estimates."""
        summary = self.summary()
        methods = [m for m in summary if "estimate_error" in summary[m]]
        if not methods:
            return ""
        lines = [f"{'task':<24}" + "".join(f"{m + ' meas / est':>30}" for m in methods)]
        for key in self.tasks:
            scores = self.task_scores(key)
            cells = "".join(
                f"{scores[m]['mean']:>23.3f} / {scores[m]['estimate']:.2f}"
                if "estimate" in scores[m]
                else f"{scores[m]['mean']:>23.3f} /   — "
                for m in methods
            )
            lines.append(f"{key:<24}{cells}")
        lines.append(
            f"{'mean |est - meas|':<24}" + "".join(f"{summary[m]['estimate_error']:>30.3f}" for m in methods)
        )
        return "\n".join(lines)


def _stats(values: Sequence[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def query_batches(queries: list[Query], size: int) -> list[list[Query]]:
    """Consecutive queries of one case and one shape, at most ``size`` per batch."""
    batches: list[list[Query]] = []
    for query in queries:
        last = batches[-1] if batches else None
        if (
            last
            and len(last) < size
            and last[0].case == query.case
            and last[0].image.shape == query.image.shape
        ):
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


def networks(
    model, methods: Sequence[str], seed: int, device: torch.device
) -> tuple[dict[str, Network], int]:
    """Prepared networks (:class:`~napari_openseg.core.engine.Network`) by method name (``network``
    for the weights, which every engine method uses; ``random_init``), and the grid of ``model``."""
    from napari_openseg.model.universeg import UniverSeg

    net = load_network(model)
    nets = {}
    if set(methods) & set(ENGINE_METHODS):
        nets["network"] = prepare_network(net, device, "float32")
    if "random_init" in methods:
        torch.manual_seed(seed)
        nets["random_init"] = prepare_network(UniverSeg(net.config), device, "float32")
    return nets, net.config.grid_size


def task_episodes(
    task: EvalTask,
    support_size: int,
    ensemble: int,
    seed: int,
    max_queries: int | None = None,
    batch_size: int = 8,
    queries_per_draw: int | None = None,
) -> Generator[tuple[list[Query], list[list]], None, None]:
    """``(query batch, K support subsets)`` of one task, seeded by ``(seed, label, axis)``: every method
    (and every benchmark that calls this) sees the same query sample and the same support draws.

    Support is drawn again for every batch, or, with ``queries_per_draw``, once the batches since the
    last draw hold that many queries (the same subsets object is yielded until then)."""
    rng = np.random.default_rng([seed, task.label, 0 if task.axis is None else task.axis + 1])
    queries = task.queries
    if max_queries is not None and len(queries) > max_queries:
        queries = [queries[i] for i in sorted(rng.choice(len(queries), max_queries, replace=False))]
    subsets, used = None, 0
    for batch in query_batches(queries, batch_size):
        if subsets is None or queries_per_draw is None or used >= queries_per_draw:
            subsets, used = support_subsets(task, support_size, ensemble, rng), 0
        used += len(batch)
        yield batch, subsets


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
    tasks = [
        t
        for t in tasks
        if (label_values is None or t.label in label_values)
        and (axes is None or t.axis is None or t.axis in axes)
    ]
    if not tasks:
        raise OpenSegError(f"no task left after choosing labels {label_values} and axes {axes}")
    return evaluation_folder, tasks


def iter_evaluate_tasks(
    tasks: Sequence[EvalTask],
    nets: dict,
    grid: int,
    *,
    methods: Sequence[str] = METHODS,
    support_size: int = DEFAULT_SUPPORT_SIZE,
    ensemble: int = DEFAULT_ENSEMBLE,
    seed: int = 0,
    max_queries: int | None = None,
    batch_size: int = 8,
    device: torch.device | None = None,
    ensemble_rule: str = "area-matched",
    queries_per_draw: int | None = None,
    **stacking,
) -> Generator[Progress, None, dict[str, dict]]:
    """Dice lists per method for every task, and the engine's estimates; ``nets`` maps ``network``
    and ``random_init`` to prepared networks (:func:`networks`).

    ``ensemble_rule`` combines the random network's K predictions (:mod:`~napari_openseg.core.ensemble`);
    ``queries_per_draw``: see :func:`task_episodes` (the engine is fitted once per draw);
    ``stacking`` goes to the :class:`~napari_openseg.core.engine.Engine` (folds, classifier, balance, tune)."""
    engine_methods = [m for m in methods if m in ENGINE_METHODS]
    results: dict[str, dict] = {}
    for number, task in enumerate(tasks):
        dice: dict[str, list[float]] = {m: [] for m in methods}
        estimate: dict[str, list[float]] = {m: [] for m in engine_methods}
        chosen: dict[str, int] = {}
        engine, drawn = None, None
        for batch, subsets in task_episodes(
            task, support_size, ensemble, seed, max_queries, batch_size, queries_per_draw
        ):
            images = np.stack([q.image for q in batch])
            probs: dict[str, np.ndarray] = {}
            if engine_methods:
                if (
                    subsets is not drawn
                ):  # a new support draw: the engine is fitted to it, as a user's would be
                    engine, drawn = (
                        _fitted_engine(
                            task,
                            batch,
                            subsets,
                            nets["network"],
                            engine_methods,
                            support_size,
                            ensemble,
                            seed,
                            estimate,
                            chosen,
                            stacking,
                        ),
                        subsets,
                    )
                probs.update(_engine_methods(engine, batch, images, engine_methods))
            if "random_init" in methods:
                probs["random_init"] = nets["random_init"].predict(images, subsets, rule=ensemble_rule)
            if "label_prior" in methods:
                prior = label_prior([e for s in subsets for e in s], images.shape[1:], grid)
                probs["label_prior"] = np.broadcast_to(prior, images.shape)
            for name in methods:
                dice[name].extend(dice_score(p >= 0.5, q.mask) for p, q in zip(probs[name], batch))
            yield Progress(
                number, len(tasks), f"evaluating {task.name}"
            )  # a task can take minutes: stop here
        results[task.key] = {
            "label": task.label,
            "axis": task.axis,
            "support_pool": len(task.support),
            "queries_available": len(task.queries),
            "dice": dice,
            "estimate": estimate,
        }
        if chosen:
            results[task.key]["model_methods"] = chosen
        yield Progress(number + 1, len(tasks), f"evaluated {task.name}")
    return results


def _fitted_engine(
    task: EvalTask,
    batch: list[Query],
    subsets: list[list],
    network: Network,
    methods: list[str],
    support_size: int,
    ensemble: int,
    seed: int,
    estimate: dict,
    chosen: dict,
    stacking: dict,
) -> Engine:
    """The engine fitted to one support draw, as users run it; its estimates and the method ``model``
    chose are added to ``estimate`` and ``chosen``."""
    entries = list({id(e): e for subset in subsets for e in subset}.values())
    engine = Engine(
        entries,
        network,
        support_size=support_size,
        ensemble=ensemble,
        seed=seed,
        threshold=DEFAULT_THRESHOLD,
        subsets={task.label: subsets},
        fit_all=True,
        **stacking,
    )
    report = engine.estimates(_colour(batch) is not None and engine.uses_colour(True))[task.label]
    for name in methods:
        method = ENGINE_METHODS[name] or report.method
        if method in report.dice:
            estimate[name].append(report.dice[method][0])
    chosen[report.method] = chosen.get(report.method, 0) + 1
    return engine


def _colour(batch: list[Query]) -> np.ndarray | None:
    return np.stack([q.colour for q in batch]) if all(q.colour is not None for q in batch) else None


def _engine_methods(
    engine: Engine, batch: list[Query], images: np.ndarray, methods: list[str]
) -> dict[str, np.ndarray]:
    """Probabilities ``"b H W"`` of each report method of the engine (one task)."""
    found = engine.predict_methods(images, _colour(batch), [ENGINE_METHODS[m] for m in methods])
    return {name: found[ENGINE_METHODS[name]][:, 0] for name in methods}


def iter_evaluate(
    folder: str | Path,
    model=None,
    *,
    support_size: int = DEFAULT_SUPPORT_SIZE,
    ensemble: int = DEFAULT_ENSEMBLE,
    seed: int = 0,
    support_split: str = "val",
    max_queries: int | None = None,
    methods: Sequence[str] = METHODS,
    label_values: Sequence[int] | None = None,
    axes: Sequence[int] | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    **stacking,
) -> Generator[Progress, None, EvaluationReport]:
    """Evaluate the engine with ``model`` (weights name, path or network; ``None`` = default), each of
    its methods, and the baselines.

    ``max_queries`` caps the queries per task (a seeded sample); ``label_values`` and ``axes`` restrict
    the tasks; ``stacking`` goes to the engine (folds, classifier, balance, tune). Yields progress per case
    read and per task; returns an :class:`EvaluationReport`.
    """
    from napari_openseg.core.device import resolve_device

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
        "folder": str(folder),
        "layout": found.layout,
        "cases": cases,
        "split": "by slice" if cases == 1 else "by case",
        "support_size": support_size,
        "ensemble": ensemble,
        "seed": seed,
        "support_split": support_split,
        "support_from": split_roles(sorted(found.pairs), support_split)[2] if cases > 1 else None,
        "queries_in_bundled_training": sorted(set(query_cases) & BUNDLED_WEIGHTS_CASES),
        "labels_without_task": sorted(set(label_values or []) - {t.label for t in tasks}),
        "max_queries": max_queries,
        "weights": weights_name(model),
        "grid": grid,
        "methods": list(methods),
        **stacking,
    }
    results = yield from iter_evaluate_tasks(
        tasks,
        nets,
        grid,
        methods=methods,
        support_size=support_size,
        ensemble=ensemble,
        seed=seed,
        max_queries=max_queries,
        batch_size=batch_size,
        device=torch_device,
        **stacking,
    )
    return EvaluationReport(settings, results)


def evaluate(folder: str | Path, model=None, **kwargs) -> EvaluationReport:
    """Run :func:`iter_evaluate` to the end."""
    return run_to_end(iter_evaluate(folder, model, **kwargs))

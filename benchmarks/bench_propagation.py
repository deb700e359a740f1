"""Prompt propagation from one painted slice: the two memories against one bank and the baselines,
per weights file, with the correction step, the confidence/Dice correlation, and speed.

Protocol (needs ../shared/data). Every object is propagated alone: its prompt is the true mask on the
slice (along ``--axis``) where the object is largest, zeros elsewhere; the score is the 3D Dice of the
object. Variants, all with the same network, stop rule and long-term bank size M:

* (a) ``two memories``: the self-sorting long-term bank (pinned prompt, confident and diverse
  predictions, the published rules) and each front's short-term memory of its last accepted slices;
* (b) ``fifo``: one bank of the last M predicted slices (plus the prompt), the whole bank as support;
* (c) ``prompt-only``: the prompt slice is the only support;
* (d) ``admit-all``: one bank that takes every prediction in place of its most redundant entry;
* (e) ``one bank``: the self-sorting bank alone (no short-term memory; the default before);
* (f) ``short-term + prompt``: the short-term memory and the prompt slice, no long-term bank.

One-prompt 2D stacks (``--stack``, instead of the volumes): per label, each hippocampus subject's
largest slice on a common canvas, shuffled; one image is prompted (three prompts averaged) and the
others are segmented in order of similarity (``unordered=True``) with each bank policy.

Correction (``--correction``): after (a), the least confident slice is replaced by its true mask
and marked complete, and the object is propagated again. Confidence: Spearman correlation between
each predicted slice's confidence and its true 2D Dice, over slices where the prediction or the
truth has foreground. ``--oracle-ends`` gives the first empty slice past each end of the true
object as a complete slice, so every front covers the object's true extent and no more (pair it
with ``--stop-confidence 0``, which turns both stops off).

Data (``--data``): ``hippocampus`` (MSD Task04, subjects of ``--split``, labels 1 and 2), ``lgg``
(the LGG FLAIR tumour volumes, patients split as the task bank splits them) and ``brain`` (the VoxelMorph
scan, FreeSurfer structures: the deep grey ones for ``--split test``, other structures for ``val``).
Choices are made on ``val``; tables report ``test``.

Weights (``--weights``, one or more names or files): each is run in turn and gets its own tables;
the default runs both bundled files, ``openseg-propagate`` and ``openseg-default``, each with its
stop rule (``--stop-confidence`` and ``--stop-ratio`` override it; the one not given is off). Propagation's default weights are
``openseg-propagate``.

Run: ``nice -n 10 python benchmarks/bench_propagation.py [--split test] [--threads 1] [--json OUT]``;
it prints Markdown tables (docs/propagation.md).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from napari_openseg.core.metrics import dice_score
from napari_openseg.core.propagate.propagation import iter_propagate
from napari_openseg.io import read_image
from napari_openseg.model.registry import load_model
from napari_openseg.training.splits import hippocampus_splits, shared_data_dir

log = logging.getLogger("bench_propagation")
VARIANTS = {
    "a": ("two memories", {}),
    "b": ("fifo", {"policy": "fifo", "short_term": 0}),
    "c": ("prompt-only", {"policy": "prompt-only", "short_term": 0}),
    "d": ("admit-all", {"policy": "admit-all", "short_term": 0}),
    "e": ("one bank", {"short_term": 0}),
    "f": ("short-term + prompt", {"policy": "prompt-only"}),
}
BRAIN_STRUCTURES = (10, 11, 12, 17, 49, 50, 51, 53)  # thalamus, caudate, putamen, hippocampus (L, R)
#: Other structures of the same scan, for choices made on validation (never the reported ones):
#: lateral ventricle, pallidum, amygdala, ventral diencephalon (L, R).
VALIDATION_STRUCTURES = (4, 43, 13, 52, 18, 54, 28, 60)
BUNDLED = ("openseg-propagate", "openseg-default")
#: The stop rule each bundled file was tuned to on the validation objects (docs/propagation.md):
#: ``openseg-propagate`` is the library's default (0.7 x the front's first slice's confidence).
STOP_RULES = {
    "openseg-propagate": {},
    "openseg-default": {"stop_confidence": 0.5, "stop_ratio": 0.0},
}
MEASURES = ("confidence", "sharpness", "agreement", "consistency")


@dataclass
class Case:
    dataset: str
    name: str
    image: np.ndarray
    truth: np.ndarray  # "Z H W" bool, slices along axis 0


def lgg_split(case: str) -> str:
    """The LGG patient's split in the task bank (a stable hash of the set and the patient id)."""
    from napari_openseg.training.taskbank import load_manifest

    return load_manifest()["lgg_flair_volumes"].split_of(case)


def hippocampus_cases(split: str, limit: int | None):
    data = shared_data_dir() / "msd_task04_hippocampus"
    for subject in hippocampus_splits()[split][:limit]:
        image = read_image(data / "imagesTr" / f"{subject}.nii.gz").data
        labels = read_image(data / "labelsTr" / f"{subject}.nii.gz").data
        for value in (1, 2):
            yield Case("hippocampus", f"{subject}/{value}", image, labels == value)


def lgg_cases(split: str, limit: int | None):
    folder = shared_data_dir() / "lgg_flair_volumes"
    with open(folder / "cases.csv") as handle:
        cases = [row["case"] for row in csv.DictReader(handle) if lgg_split(row["case"]) == split]
    for case in cases[:limit]:
        image = read_image(folder / "imagesTr" / f"{case}.nii.gz").data
        labels = read_image(folder / "labelsTr" / f"{case}.nii.gz").data
        yield Case("lgg", case, image, labels == 1)


def brain_cases(structures):
    folder = shared_data_dir() / "voxelmorph_test_scan"
    image = read_image(folder / "vol_uint8.nii.gz").data
    labels = read_image(folder / "seg_freesurfer_labels.nii.gz").data
    for value in structures:
        yield Case("brain", f"label {value}", image, labels == value)


def prompt_of(truth: np.ndarray) -> tuple[np.ndarray, int]:
    z = int(np.argmax(truth.reshape(truth.shape[0], -1).sum(axis=1)))
    prompt = np.zeros(truth.shape, np.uint8)
    prompt[z] = truth[z]
    return prompt, z


def true_ends(truth: np.ndarray) -> list[int]:
    """The first empty slice past each end of the true object (``--oracle-ends``)."""
    present = np.flatnonzero(truth.reshape(truth.shape[0], -1).any(axis=1))
    return [s for s in (int(present.min()) - 1, int(present.max()) + 1) if 0 <= s < truth.shape[0]]


def each_payload(generator, visit):
    """Run a propagation generator to its end, passing each predicted slice's payload to ``visit``;
    returns the generator's result."""
    while True:
        try:
            step = next(generator)
        except StopIteration as stop:
            return stop.value
        if step.payload:
            visit(step.payload)


def run(image, prompt, net, settings, **kwargs):
    """Propagate; returns (result, per-slice records, predicted slice count, seconds)."""
    began = time.perf_counter()
    generator = iter_propagate(image, prompt, net, device="cpu", **{**settings, **kwargs})
    records = []
    result = each_payload(
        generator,
        lambda payload: records.append(
            {"slice": payload["slice"], "bank": payload["bank"], **payload["measures"]}
        ),
    )
    return result, records, len(records), time.perf_counter() - began


def propagation(cases, net, settings, variants, deadline, oracle_ends=False, correction=False):
    rows, slices = [], []
    for case in cases:
        if time.monotonic() > deadline:
            log.warning("time budget spent; stopping before %s", case.name)
            break
        prompt, _ = prompt_of(case.truth)
        ends = true_ends(case.truth) if oracle_ends else []
        row = {"dataset": case.dataset, "case": case.name}
        for key in variants:
            result, records, steps, seconds = run(
                case.image, prompt, net, settings, complete_slices=ends, **VARIANTS[key][1]
            )
            row[key] = dice_score(result.labels == 1, case.truth)
            row[f"{key}_steps"], row[f"{key}_seconds"] = steps, seconds
            row[f"{key}_bank"] = dict(Counter(record["bank"] for record in records))
            for record in records:
                s = record["slice"]
                predicted, truth = result.labels[s] == 1, case.truth[s]
                if predicted.any() or truth.any():
                    slices.append(
                        {
                            "dataset": case.dataset,
                            "variant": key,
                            "dice": dice_score(predicted, truth),
                            **{m: record[m] for m in MEASURES},
                        }
                    )
            if key == "a" and correction:
                row["a+1"] = corrected(case, prompt, result, net, settings) if records else row["a"]
        log.info("%s: %s", case.name, {k: round(v, 3) for k, v in row.items() if isinstance(v, float)})
        rows.append(row)
    return rows, slices


def corrected(case, prompt, result, net, settings) -> float:
    """3D Dice after the least confident slice is replaced by its true mask and the run repeated."""
    weakest = result.least_confident_slice()
    if weakest is None:
        return dice_score(result.labels == 1, case.truth)
    edited = result.labels.copy()
    edited[weakest] = case.truth[weakest]
    new_prompt, complete = result.with_corrections(prompt, edited, slices=[weakest])
    fixed, *_ = run(case.image, new_prompt, net, settings, complete_slices=complete)
    return dice_score(fixed.labels == 1, case.truth)


def stack_cases(split: str, limit: int | None, value: int):
    """Per subject, the hippocampus slice where ``value`` is largest, each normalised with its own
    volume, centred on a common canvas, shuffled."""
    from napari_openseg.core.preprocess import normalize_intensity

    data = shared_data_dir() / "msd_task04_hippocampus"
    images, masks = [], []
    for subject in hippocampus_splits()[split][:limit]:
        volume = normalize_intensity(read_image(data / "imagesTr" / f"{subject}.nii.gz").data)
        truth = read_image(data / "labelsTr" / f"{subject}.nii.gz").data == value
        z = int(np.argmax(truth.reshape(truth.shape[0], -1).sum(axis=1)))
        images.append(volume[z])
        masks.append(truth[z])
    height, width = max(i.shape[0] for i in images), max(i.shape[1] for i in images)
    stack_image = np.zeros((len(images), height, width), np.float32)
    stack_truth = np.zeros((len(images), height, width), bool)
    for k, (image, mask) in enumerate(zip(images, masks)):
        top, left = (height - image.shape[0]) // 2, (width - image.shape[1]) // 2
        stack_image[k, top : top + image.shape[0], left : left + image.shape[1]] = image
        stack_truth[k, top : top + image.shape[0], left : left + image.shape[1]] = mask
    order = np.random.default_rng(value).permutation(len(images))
    return stack_image[order], stack_truth[order]


def one_prompt_stack(split, limit, net, settings, prompts=3) -> list[str]:
    """One-prompt segmentation of a 2D stack (``unordered=True``) with each bank policy; a table."""
    policies = ("self-sorting", "fifo", "prompt-only", "admit-all")
    lines = [
        "| 2D stack, label | prompts | " + " | ".join(policies) + " |",
        "|---" * (len(policies) + 2) + "|",
    ]
    for value in (1, 2):
        image, truth = stack_cases(split, limit, value)
        scores = {policy: [] for policy in policies}
        for k in range(min(prompts, len(image))):
            prompt = np.zeros(truth.shape, np.uint8)
            prompt[k] = truth[k]
            for policy in policies:
                result, *_ = run(image, prompt, net, settings, policy=policy, unordered=True)
                others = [i for i in range(len(image)) if i != k]
                scores[policy].append(np.mean([dice_score(result.labels[i] == 1, truth[i]) for i in others]))
        lines.append(
            f"| {value} | {len(scores[policies[0]])} | "
            + " | ".join(f"{100 * np.mean(scores[p]):.1f}" for p in policies)
            + " |"
        )
    return lines


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic) if len(x) > 2 else float("nan")


def report(rows, slices, variants) -> list[str]:
    extra = ["a+1"] if rows and "a+1" in rows[0] else []
    columns = [f"({k}) {VARIANTS[k][0]}" for k in variants] + (["(a) + 1 correction"] if extra else [])
    lines = ["| data | objects | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for dataset in sorted({r["dataset"] for r in rows}):
        sub = [r for r in rows if r["dataset"] == dataset]
        cells = [
            f"{100 * np.mean([r[k] for r in sub]):.1f} ± {100 * np.std([r[k] for r in sub]):.1f}"
            for k in [*variants, *extra]
        ]
        lines.append(f"| {dataset} | {len(sub)} | " + " | ".join(cells) + " |")
    lines += ["", "3D Dice (%) per object, mean ± sd.", "", "| variant | slices/s |", "|---|---|"]
    for k in variants:
        steps = sum(r[f"{k}_steps"] for r in rows)
        seconds = sum(r[f"{k}_seconds"] for r in rows)
        lines.append(f"| ({k}) {VARIANTS[k][0]} | {steps / max(seconds, 1e-9):.1f} |")
    lines += [
        "",
        "| data | variant | slices | " + " | ".join(f"Spearman({m}, Dice)" for m in MEASURES) + " |",
        "|---" * (len(MEASURES) + 3) + "|",
    ]
    for dataset in sorted({s["dataset"] for s in slices}):
        for key in variants[:1]:
            sub = [s for s in slices if s["dataset"] == dataset and s["variant"] == key]
            dice = [s["dice"] for s in sub]
            lines.append(
                f"| {dataset} | ({key}) | {len(sub)} | "
                + " | ".join(f"{spearman([s[m] for s in sub], dice):.3f}" for m in MEASURES)
                + " |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--weights",
        nargs="+",
        default=list(BUNDLED),
        help="weights names or files, each run in turn (default: both bundled files)",
    )
    parser.add_argument(
        "--data", nargs="+", default=["hippocampus", "lgg"], choices=["hippocampus", "lgg", "brain"]
    )
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--subjects", type=int, help="only the first N subjects (patients) of the split")
    parser.add_argument("--variants", default="abcdef")
    parser.add_argument("--axis", type=int, default=0)
    parser.add_argument("--stop-confidence", type=float, help="default: the rule tuned for each bundled file")
    parser.add_argument(
        "--stop-ratio",
        type=float,
        help="stop below this times a front's first slice's confidence (with --stop-confidence: "
        "what is not given is off)",
    )
    parser.add_argument(
        "--options",
        default="{}",
        help='other propagation settings as JSON, e.g. \'{"short_term": 3, "max_growth": 1.5}\'',
    )
    parser.add_argument(
        "--oracle-ends",
        action="store_true",
        help="end every front where the true object ends; pair with --stop-confidence 0 (both stops off)",
    )
    parser.add_argument("--correction", action="store_true", help="also run (a) + 1 correction")
    parser.add_argument("--stack", action="store_true", help="run the one-prompt 2D stack instead of volumes")
    parser.add_argument("--max-minutes", type=float, default=120.0, help="start no new case after this")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write every number to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if shared_data_dir() is None:
        raise SystemExit("../shared/data is not present")
    torch.set_num_threads(args.threads)
    deadline = time.monotonic() + 60 * args.max_minutes
    structures = BRAIN_STRUCTURES if args.split == "test" else VALIDATION_STRUCTURES
    sources = {
        "hippocampus": lambda: hippocampus_cases(args.split, args.subjects),
        "lgg": lambda: lgg_cases(args.split, args.subjects),
        "brain": lambda: brain_cases(structures),
    }
    everything = {}
    for weights in args.weights:
        began = time.perf_counter()
        name = Path(weights).stem if Path(weights).suffix else weights
        stop = STOP_RULES.get(name, {})
        if args.stop_confidence is not None or args.stop_ratio is not None:  # what is not given is off
            stop = {"stop_confidence": args.stop_confidence or 0.0, "stop_ratio": args.stop_ratio or 0.0}
        settings = {**json.loads(args.options), **stop}
        net = load_model(weights)
        if args.stack:
            print(f"\n### weights {weights}, one-prompt 2D stacks ({args.split})\n")
            print("\n".join(one_prompt_stack(args.split, args.subjects, net, json.loads(args.options))))
            continue

        def cases():  # alternate the datasets, so that a time limit cuts them alike
            for group in itertools.zip_longest(*(sources[d]() for d in args.data)):
                for case in group:
                    if case is not None:
                        yield Case(
                            case.dataset,
                            case.name,
                            np.moveaxis(case.image, args.axis, 0),
                            np.moveaxis(case.truth, args.axis, 0),
                        )

        rows, slices = propagation(
            cases(), net, settings, list(args.variants), deadline, args.oracle_ends, args.correction
        )
        shown = {
            "weights": weights,
            "split": args.split,
            "axis": args.axis,
            "threads": args.threads,
            "oracle_ends": args.oracle_ends,
            **settings,
        }
        print(f"\n### weights {weights}\n\nsettings: {shown}\n")
        print("\n".join(report(rows, slices, list(args.variants))))
        print(f"\n{len(rows)} objects in {(time.perf_counter() - began) / 60:.1f} min")
        everything[weights] = {"settings": shown, "objects": rows, "slices": slices}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(everything, handle)


if __name__ == "__main__":
    main()

"""Prompt propagation with a self-sorting memory bank against three baselines, the correction step,
the confidence/Dice correlation, one-prompt segmentation of a 2D stack, and speed.

Protocol (needs ../shared/data). Every object is propagated alone: its prompt is the true mask on the
slice (along ``--axis``) where the object is largest, zeros elsewhere; the score is the 3D Dice of the
object. Variants, all with the same network, bank size M, and stopping rule:

* (a) ``self-sorting``: the published admission/eviction rules and similarity-weighted retrieval;
* (b) ``fifo``: the last M predicted slices (plus the prompt), the whole bank as support;
* (c) ``prompt-only``: the prompt slice is the only support;
* (d) ``admit-all``: (a) without confidence control (every prediction enters, replacing the most
  redundant entry);
* (e) (a) with the published retrieval alone: every support set drawn by similarity, no prompt set
  (``prompt_set=False``).

(a) and (d) draw the same way: ``draws`` sets per slice, the last of them the painted slice alone.

Correction: after (a), the least confident slice is replaced by its true mask and marked complete
(``PropagationResult.with_corrections``) and the object is propagated again. Confidence: Spearman
correlation between each predicted slice's confidence and its true 2D Dice, over slices where the
prediction or the truth has foreground, pooled over objects, for variant (a) and for all variants
together (their slices span a wider range of quality), for each measure. 2D stack: per label,
the slice where it is largest in each subject of the split, each normalised with its own volume and
centred on a common canvas, shuffled; one image is prompted (three different prompts, averaged) and
the others are segmented in order of similarity (``unordered=True``) with each bank policy
(:data:`STACK_POLICIES`).

Oracle ends (``--oracle-ends``, with ``--stop-confidence 0``): the first empty slice past each end
of the true object is given as a complete slice, so every front covers the object's true extent
and no more; what is left to compare is only the support each policy gives inside the object.

Data: ``hippocampus`` (MSD Task04 subjects of ``--split``, default the 19 test subjects, labels 1 and
2) and ``brain`` (the VoxelMorph scan, FreeSurfer structures ``--structures``: by default the 8 deep
grey structures of :data:`BRAIN_STRUCTURES` with the test split, and 8 other structures of the same
scan, :data:`VALIDATION_STRUCTURES`, with ``--split val``, for choices made before reporting). The
default weights never saw the VoxelMorph scan or the hippocampus test subjects (see the model card).

Run: ``nice -n 10 python benchmarks/bench_propagation.py [--weights NAME|PATH] [--split test]
[--max-minutes 90] [--json OUT]``; it prints Markdown tables (docs/performance.md).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from napari_openseg.core import confidence
from napari_openseg.core.memory import DEFAULT_FLOOR, DEFAULT_TEMPERATURE
from napari_openseg.core.metrics import dice_score
from napari_openseg.core.preprocess import normalize_intensity
from napari_openseg.core.propagate import (
    DEFAULT_DRAWS,
    DEFAULT_STOP_CONFIDENCE,
    DEFAULT_SUPPORT_SIZE,
    iter_propagate,
)
from napari_openseg.io import read_image
from napari_openseg.model.registry import load_model, propagation_weights
from napari_openseg.training.splits import hippocampus_splits, shared_data_dir

log = logging.getLogger("bench_propagation")
VARIANTS = {"a": "self-sorting", "b": "fifo", "c": "prompt-only", "d": "admit-all", "e": "self-sorting"}
#: Variant (e) is (a) with the published retrieval alone (no prompt set; see core/memory.py).
VARIANT_NAMES = {**VARIANTS, "e": "self-sorting, no prompt set"}
VARIANT_OPTIONS = {"e": {"prompt_set": False}}
BRAIN_STRUCTURES = (10, 11, 12, 17, 49, 50, 51, 53)  # thalamus, caudate, putamen, hippocampus (L, R)
#: Other structures of the same scan, for choices made on validation (never the reported ones):
#: lateral ventricle, pallidum, amygdala, ventral diencephalon (L, R).
VALIDATION_STRUCTURES = (4, 43, 13, 52, 18, 54, 28, 60)
#: Bank policies compared on the one-prompt 2D stack.
STACK_POLICIES = ("self-sorting", "fifo", "prompt-only", "admit-all")
MEASURES = ("confidence", "sharpness", "agreement", "consistency")


@dataclass
class Case:
    dataset: str
    name: str
    image: np.ndarray
    truth: np.ndarray  # "Z H W" bool, slices along axis 0


def hippocampus_cases(split: str, limit: int | None):
    data = shared_data_dir() / "msd_task04_hippocampus"
    for subject in hippocampus_splits()[split][:limit]:
        image = read_image(data / "imagesTr" / f"{subject}.nii.gz").data
        labels = read_image(data / "labelsTr" / f"{subject}.nii.gz").data
        for value in (1, 2):
            yield Case("hippocampus", f"{subject}/{value}", image, labels == value)


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


def run(image, prompt, net, settings, **kwargs):
    """Propagate; returns (result, per-slice records, predicted slice count, seconds)."""
    began = time.perf_counter()
    generator = iter_propagate(image, prompt, net, **settings, **kwargs)
    records = []
    while True:
        try:
            step = next(generator)
        except StopIteration as stop:
            result = stop.value
            break
        if step.payload:
            records.append({"slice": step.payload["slice"], "bank": step.payload["bank"], **step.payload["measures"]})
    return result, records, len(records), time.perf_counter() - began


def propagation(cases, net, settings, variants, deadline, oracle_ends=False):
    rows, slices = [], []
    for case in cases:
        if time.monotonic() > deadline:
            log.warning("time budget spent; stopping before %s", case.name)
            break
        prompt, _ = prompt_of(case.truth)
        ends = true_ends(case.truth) if oracle_ends else []
        row = {"dataset": case.dataset, "case": case.name}
        for key in variants:
            result, records, steps, seconds = run(case.image, prompt, net, settings, policy=VARIANTS[key],
                                                   complete_slices=ends,
                                                   **VARIANT_OPTIONS.get(key, {}))
            row[key] = dice_score(result.labels == 1, case.truth)
            row[f"{key}_steps"], row[f"{key}_seconds"] = steps, seconds
            row[f"{key}_bank"] = dict(Counter(record["bank"] for record in records))
            for record in records:
                s = record["slice"]
                predicted, truth = result.labels[s] == 1, case.truth[s]
                if predicted.any() or truth.any():
                    slices.append({"dataset": case.dataset, "variant": key, "dice": dice_score(predicted, truth),
                                   **{m: record[m] for m in MEASURES}})
            if key == "a":
                weakest = result.least_confident_slice()
                if weakest is not None:
                    edited = result.labels.copy()
                    edited[weakest] = case.truth[weakest]
                    new_prompt, complete = result.with_corrections(prompt, edited, slices=[weakest])
                    fixed, *_ = run(case.image, new_prompt, net, settings, complete_slices=complete)
                    row["a+1"] = dice_score(fixed.labels == 1, case.truth)
                else:
                    row["a+1"] = row["a"]
        log.info("%s: %s", case.name, {k: round(v, 3) for k, v in row.items() if isinstance(v, float)})
        rows.append(row)
    return rows, slices


def true_ends(truth: np.ndarray) -> list[int]:
    """The first empty slice past each end of the true object: given as complete slices, they end
    its fronts where the object really ends (``--oracle-ends``)."""
    present = np.flatnonzero(truth.reshape(truth.shape[0], -1).any(axis=1))
    return [s for s in (int(present.min()) - 1, int(present.max()) + 1) if 0 <= s < truth.shape[0]]


def stack_cases(split: str, limit: int | None, value: int):
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


def one_prompt_stack(split, limit, net, settings, prompts=3):
    rows = []
    for value in (1, 2):
        image, truth = stack_cases(split, limit, value)
        for k in range(min(prompts, len(image))):
            prompt = np.zeros(truth.shape, np.uint8)
            prompt[k] = truth[k]
            row = {"label": value, "prompt": k}
            for policy in STACK_POLICIES:
                result, *_ = run(image, prompt, net, settings, policy=policy, unordered=True)
                others = [i for i in range(len(image)) if i != k]
                row[policy] = float(np.mean([dice_score(result.labels[i] == 1, truth[i]) for i in others]))
            rows.append(row)
    return rows


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic) if len(x) > 2 else float("nan")


def report(rows, slices, stack_rows, variants, settings) -> str:
    lines = [f"settings: {settings}", ""]
    if rows:
        lines += _object_tables(rows, slices, variants)
    if stack_rows:
        lines += ["", "| 2D stack, label | prompts | " + " | ".join(STACK_POLICIES) + " |",
                  "|---" * (len(STACK_POLICIES) + 2) + "|"]
        for value in (1, 2):
            sub = [r for r in stack_rows if r["label"] == value]
            lines.append(f"| {value} | {len(sub)} | "
                         + " | ".join(f"{100 * np.mean([r[p] for r in sub]):.1f}" for p in STACK_POLICIES) + " |")
    return "\n".join(lines)


def _object_tables(rows, slices, variants) -> list[str]:
    columns = [f"({k}) {VARIANT_NAMES[k]}" for k in variants] + (["(a) + 1 correction"] if "a" in variants else [])
    lines = ["| data | objects | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for dataset in sorted({r["dataset"] for r in rows}):
        sub = [r for r in rows if r["dataset"] == dataset]
        cells = [f"{100 * np.mean([r[k] for r in sub]):.1f} ± {100 * np.std([r[k] for r in sub]):.1f}"
                 for k in [*variants, "a+1"] if k in sub[0]]
        lines.append(f"| {dataset} | {len(sub)} | " + " | ".join(cells) + " |")
    lines += ["", "3D Dice (%) per object, mean ± sd.", "", "| variant | slices/s |", "|---|---|"]
    for k in variants:
        steps = sum(r[f"{k}_steps"] for r in rows)
        seconds = sum(r[f"{k}_seconds"] for r in rows)
        lines.append(f"| ({k}) {VARIANT_NAMES[k]} | {steps / seconds:.1f} |")
    lines += ["", "| data | variants | slices | " + " | ".join(f"Spearman({m}, Dice)" for m in MEASURES) + " |",
              "|---" * (len(MEASURES) + 3) + "|"]
    for dataset in sorted({s["dataset"] for s in slices}):
        for subset in ("a", "".join(variants)):
            sub = [s for s in slices if s["dataset"] == dataset and s["variant"] in subset]
            dice = [s["dice"] for s in sub]
            lines.append(f"| {dataset} | {subset} | {len(sub)} | "
                         + " | ".join(f"{spearman([s[m] for s in sub], dice):.3f}" for m in MEASURES) + " |")
    lines += ["", "| data | variant | offers to the bank | what the bank did |", "|---|---|---|---|"]
    for dataset in sorted({r["dataset"] for r in rows}):
        for k in (k for k in variants if VARIANTS[k] in ("self-sorting", "admit-all")):
            actions = sum((Counter(r[f"{k}_bank"]) for r in rows if r["dataset"] == dataset), Counter())
            lines.append(f"| {dataset} | ({k}) | {sum(actions.values())} | "
                         + ", ".join(f"{n} {action}" for action, n in actions.most_common()) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", help="weights name or path (default: propagation's, openseg-propagate)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--subjects", type=int, help="only the first N subjects of the split")
    parser.add_argument("--structures", type=int, nargs="*",
                        help="brain labels (default: the reported ones for --split test, else the validation ones)")
    parser.add_argument("--variants", default="abcde")
    parser.add_argument("--axis", type=int, default=0)
    parser.add_argument("--bank-size", type=int, default=16)
    parser.add_argument("--draws", type=int, default=DEFAULT_DRAWS)
    parser.add_argument("--support-size", type=int, default=DEFAULT_SUPPORT_SIZE)
    parser.add_argument("--floor", type=float, default=DEFAULT_FLOOR)
    parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    parser.add_argument("--stop-after", type=int, default=2)
    parser.add_argument("--min-area", type=float, default=0.02)
    parser.add_argument("--stop-confidence", type=float, default=DEFAULT_STOP_CONFIDENCE)
    parser.add_argument("--confidence-terms", nargs="+", choices=["sharpness", "agreement", "consistency"],
                        help="measures whose product is the confidence (default: the library's)")
    parser.add_argument("--oracle-ends", action="store_true",
                        help="end every front where the true object ends (complete slices); pair with --stop-confidence 0")
    parser.add_argument("--no-stack", action="store_true", help="skip the one-prompt 2D stack")
    parser.add_argument("--only-stack", action="store_true", help="run the one-prompt 2D stack alone")
    parser.add_argument("--max-minutes", type=float, default=90.0, help="start no new case after this")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write every number to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if shared_data_dir() is None:
        raise SystemExit("../shared/data is not present")
    if args.structures is None:
        args.structures = list(BRAIN_STRUCTURES if args.split == "test" else VALIDATION_STRUCTURES)
    torch.set_num_threads(args.threads)
    if args.confidence_terms:
        confidence.CONFIDENCE_TERMS = tuple(args.confidence_terms)
    net = load_model(propagation_weights(args.weights))
    settings = {"bank_size": args.bank_size, "draws": args.draws, "support_size": args.support_size,
                "floor": args.floor, "temperature": args.temperature, "stop_after": args.stop_after,
                "min_area": args.min_area, "stop_confidence": args.stop_confidence, "device": "cpu"}
    deadline = time.monotonic() + 60 * args.max_minutes
    began = time.perf_counter()

    def cases():  # alternate the datasets, so that a time limit cuts both alike
        for pair in itertools.zip_longest(hippocampus_cases(args.split, args.subjects), brain_cases(args.structures)):
            yield from (case for case in pair if case is not None)

    moved = (Case(c.dataset, c.name, np.moveaxis(c.image, args.axis, 0), np.moveaxis(c.truth, args.axis, 0))
             for c in cases())
    variants = [] if args.only_stack else list(args.variants)
    rows, slices = propagation(moved, net, settings, variants, deadline, args.oracle_ends) if variants else ([], [])
    stack_rows = [] if args.no_stack else one_prompt_stack(args.split, args.subjects, net, settings)
    shown = {k: v for k, v in settings.items() if k != "device"}
    shown.update(weights=propagation_weights(args.weights), split=args.split, axis=args.axis, threads=args.threads,
                 oracle_ends=args.oracle_ends,
                 confidence=confidence.CONFIDENCE_TERMS)
    print(report(rows, slices, stack_rows, variants, shown))
    print(f"\n{len(rows)} objects in {(time.perf_counter() - began) / 60:.1f} min")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"settings": shown, "objects": rows, "slices": slices, "stack": stack_rows}, handle)


if __name__ == "__main__":
    main()

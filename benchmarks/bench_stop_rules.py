"""Stop rules for propagation, compared on validation objects without re-running the network.

Each object is propagated once with the confidence stop off (fronts end only where the object
vanishes), recording every predicted slice's confidence, predicted area and overlap with the truth.
A stop rule is then replayed on those records, front by front, with the rule ``iter_propagate``
applies (``StopRule.judge`` and ``Front.observe``: ``stop_after`` consecutive vanished or doubtful
slices end a front; the doubtful slices of that final run are left empty), and the 3D Dice is
recomputed. Rules: an absolute confidence threshold, one relative to the front's first slice, and
the area trend (a slice more than ``max_growth`` times the front's last accepted area is doubtful). The replay ignores
one thing: a front that stops earlier no longer feeds the shared bank, so the other front's later
slices could differ; on the validation objects replayed and real runs agreed within 0.4 Dice points.

Objects (needs ../shared/data): the hippocampus validation subjects, the LGG validation patients,
the validation structures of the brain scan (``bench_propagation.VALIDATION_STRUCTURES``), seven
large structures of that scan (:data:`LARGE_STRUCTURES`) and the bundled sample's white and grey
matter; prompt = the true mask on the slice where the object is largest, as in
``bench_propagation.py``. The recording runs with the library's default memories.

Run: ``nice -n 10 python benchmarks/bench_stop_rules.py [--split val|test] [--threads 2] [--weights W ...] [--json OUT]``
(both bundled files by default; about 15 minutes per file on 2 quiet cores); it prints a Markdown
table per file (docs/propagation.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from bench_propagation import (
    BRAIN_STRUCTURES,
    BUNDLED,
    VALIDATION_STRUCTURES,
    Case,
    brain_cases,
    each_payload,
    hippocampus_cases,
    lgg_cases,
    prompt_of,
)
from napari_openseg.core.propagate.fronts import Front, StopRule
from napari_openseg.core.propagate.propagation import iter_propagate
from napari_openseg.core.propagate.settings import DEFAULT_MIN_AREA
from napari_openseg.model.registry import load_model
from napari_openseg.sample import load_sample
from napari_openseg.training.splits import shared_data_dir
from saved_runs import write_run

log = logging.getLogger("bench_stop_rules")
#: Brainstem, cerebellar white matter and cortex (L, R), cerebral white matter (L, R).
LARGE_STRUCTURES = (16, 7, 46, 8, 47, 2, 41)
ABSOLUTE = (0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65)
RELATIVE = (0.6, 0.7, 0.8)
#: Area trends: a slice more than this many times the front's last accepted area is doubtful.
GROWTH = (1.2, 1.3, 1.5, 2.0)
#: Marks the reference rule that knows the truth (a bound on what a stop rule can reach).
ORACLE = -1.0
#: Lower thresholds of the two-level rules: below them a slice is doubtful whatever its area.
LENIENT = (0.3, 0.4)


GROUPS = ("sample", "large", "brain", "hippocampus", "lgg")


def objects_of(groups=GROUPS, limit: int | None = None, split: str = "val"):
    """The objects of ``groups``; ``split="test"`` takes the test subjects, patients and brain
    structures of ``bench_propagation.py`` instead (the sample and the large structures are
    validation only)."""
    if split == "val" and "sample" in groups:
        image, labels = load_sample()
        for value in (2, 1):
            yield Case("sample", f"sample {value}", image.data, labels.data == value)
    if split == "val" and "large" in groups:
        for case in brain_cases(LARGE_STRUCTURES):
            yield Case("large", case.name, case.image, case.truth)
    if "brain" in groups:
        yield from brain_cases(VALIDATION_STRUCTURES if split == "val" else BRAIN_STRUCTURES)
    if "hippocampus" in groups:
        yield from hippocampus_cases(split, limit)
    if "lgg" in groups:
        yield from lgg_cases(split, limit)


def record(case: Case, net, options: dict | None = None) -> dict:
    """Propagate ``case`` with the confidence stops off; per predicted slice: confidence and areas
    (where a pixel classifier joins, also the network's own mask and the two masks' agreement)."""
    prompt, z = prompt_of(case.truth)
    stops_off = {"stop_confidence": 0.0, "stop_ratio": 0.0, "classifier_stop": 0.0}
    generator = iter_propagate(case.image, prompt, net, device="cpu", **{**(options or {}), **stops_off})
    slices = []

    def visit(payload: dict) -> None:
        s, mask, network, truth = (
            payload["slice"],
            payload["mask"],
            payload["network_mask"],
            case.truth[payload["slice"]],
        )
        slices.append(
            {
                "slice": s,
                "confidence": payload["confidence"],
                "predicted": int(mask.sum()),
                "overlap": int((mask & truth).sum()),
                "network_predicted": int(network.sum()),
                "network_overlap": int((network & truth).sum()),
                "classifier_agreement": payload["measures"].get("classifier_agreement"),
            }
        )

    result = each_payload(generator, visit)
    return {
        "dataset": case.dataset,
        "case": case.name,
        "prompt_slice": z,
        "truth": int(case.truth.sum()),
        "prompt_area": int(case.truth[z].sum()),
        "half_split": result.classifier_dice.get(1),
        "slices": slices,
    }


def replay(
    obj: dict,
    threshold_of,
    stop_after: int = 2,
    max_growth: float = float("inf"),
    lenient: float | None = None,
    stop_ratio: float = 0.0,
    joined: bool = True,
    classifier_stop: float = 0.0,
) -> float:
    """3D Dice of ``obj`` had each front stopped by the rule ``threshold_of(front slices) -> float``,
    the area trend ``max_growth`` and, with ``lenient``, a second threshold: a slice between the two
    thresholds counts as doubtful only if its area also broke the trend. In a recording made with
    a pixel classifier, ``joined=False`` replays the network alone, and ``classifier_stop`` the
    agreement rule of a joined classifier (``StopRule``)."""
    if not joined:
        obj = network_alone(obj)
    overlap = predicted = obj["prompt_area"]
    for sign in (-1, 1):
        records = [r for r in obj["slices"] if np.sign(r["slice"] - obj["prompt_slice"]) == sign]
        threshold = threshold_of(records)
        strict = StopRule(stop_after, 0.0, threshold, max_growth, stop_ratio, classifier_stop)
        first = records[0]["confidence"] if records else None
        front, kept, last_area = Front(0, [r["slice"] for r in records]), [], float(obj["prompt_area"])
        for r in records:
            # the recording already emptied vanished slices (min_area): they come with no pixels
            if r["predicted"] == 0:
                verdict = "vanished"
            elif threshold == ORACLE:  # ends where the prediction first misses the object entirely
                verdict = "doubtful" if r["overlap"] == 0 else "accepted"
            elif lenient is None:
                agreement = r.get("classifier_agreement")
                verdict = strict.judge(r["predicted"], r["confidence"], 1.0, last_area, first, agreement)
            elif r["confidence"] < lenient:
                verdict = "doubtful"
            else:
                grew = r["predicted"] > max_growth * last_area
                verdict = "doubtful" if r["confidence"] < threshold and grew else "accepted"
            front.observe(r["slice"], verdict == "vanished", verdict == "doubtful", r, stop_after)
            if verdict == "accepted":
                last_area = r["predicted"]
            kept.append(r)
            if front.stopped:  # iter_propagate undoes the doubtful slices of the final run
                undone = [written for _, written in front.doubtful]
                kept = [k for k in kept if not any(k is u for u in undone)]
                break
        overlap += sum(r["overlap"] for r in kept)
        predicted += sum(r["predicted"] for r in kept)
    return 2 * overlap / (predicted + obj["truth"])


def network_alone(obj: dict) -> dict:
    """A recording as the network alone would have written it (no classifier's areas or agreement;
    slices where its mask vanished are emptied, as ``iter_propagate`` empties them)."""
    least = max(1.0, DEFAULT_MIN_AREA * obj["prompt_area"])
    slices = []
    for r in obj["slices"]:
        area = r.get("network_predicted", r["predicted"])
        kept = area >= least
        slices.append(
            {
                **r,
                "predicted": area if kept else 0,
                "overlap": r.get("network_overlap", r["overlap"]) if kept else 0,
                "classifier_agreement": None,
            }
        )
    return {**obj, "slices": slices}


def rules():
    """(name, threshold of a front's records, keywords of :func:`replay`)."""
    yield (
        "(reference) a front ends at its first slice that misses the object",
        lambda front: ORACLE,
        {"stop_after": 1},
    )
    for t in ABSOLUTE:
        for after in (2, 3):
            yield f"confidence < {t}, {after} in a row", lambda front, t=t: t, {"stop_after": after}
    for ratio in RELATIVE:  # relative to the confidence of the front's first slice
        yield f"confidence < {ratio} x first slice's", lambda front: 0.0, {"stop_ratio": ratio}
    for t in ABSOLUTE:
        for growth in GROWTH:
            yield (
                f"confidence < {t} or area > {growth} x last accepted",
                lambda front, t=t: t,
                {"max_growth": growth},
            )
    for low in LENIENT:
        for t in ABSOLUTE:
            for growth in GROWTH:
                if low < t:
                    yield (
                        f"confidence < {low}, or < {t} and area > {growth} x last accepted",
                        lambda front, t=t: t,
                        {"max_growth": growth, "lenient": low},
                    )


def table_head(rows: list[dict], before: list[str], after: list[str]) -> list[str]:
    """The first two lines of a Markdown table: the ``before`` columns, one per group of ``rows``
    (its name and count), then the ``after`` columns."""
    groups = sorted({r["dataset"] for r in rows})
    columns = [*before, *(f"{g} ({sum(r['dataset'] == g for r in rows)})" for g in groups), *after]
    return ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]


def report(objects: list[dict]) -> str:
    groups = sorted({o["dataset"] for o in objects})
    lines = table_head(objects, ["stop rule"], ["mean"])
    for name, rule, keywords in rules():
        cells = [
            100 * np.mean([replay(o, rule, **keywords) for o in objects if o["dataset"] == g]) for g in groups
        ]
        lines.append(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {np.mean(cells):.1f} |")
    return "\n".join(lines) + "\n\n3D Dice (%), mean per group of objects; mean: of the groups."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--weights",
        nargs="+",
        default=list(BUNDLED),
        help="weights names or files, each recorded in turn (default: both bundled files)",
    )
    parser.add_argument("--json", help="write the per-slice records to this file (one per weights: a suffix)")
    parser.add_argument("--records", nargs="+", help="replay records written earlier with --json instead")
    parser.add_argument(
        "--data", nargs="+", default=list(GROUPS), choices=GROUPS, help="groups of objects to record"
    )
    parser.add_argument(
        "--options", default="{}", help="other propagation settings for the recording, as JSON"
    )
    parser.add_argument("--subjects", type=int, help="only the first N hippocampus subjects and LGG patients")
    parser.add_argument(
        "--split",
        default="val",
        choices=("val", "test"),
        help="val (choices) or test (report; brain, hippocampus and lgg only)",
    )
    args = parser.parse_args()
    options = json.loads(args.options)
    run_objects(args, lambda case, net, weights: record(case, net, options), report)


def run_objects(args, measure, report) -> None:
    """The shared loop of the propagation benchmarks: with ``args.records``, print the ``report`` of
    each saved file; otherwise, per weights in ``args.weights``, ``measure(case, net, weights)`` each
    object of ``args.data`` (``--subjects``, ``--split``), save the rows after every object (a run
    cut short keeps what it did) and print their ``report``."""
    logging.basicConfig(level=logging.WARNING)
    if args.records:
        for path in args.records:
            print(f"\n### {path}\n\n{report(json.loads(Path(path).read_text()))}")
        return
    if shared_data_dir() is None:
        raise SystemExit("../shared/data is not present")
    torch.set_num_threads(args.threads)
    for weights in args.weights:
        net, began, rows = load_model(weights), time.perf_counter(), []
        for case in objects_of(args.data, args.subjects, args.split):
            rows.append(measure(case, net, weights))
            if args.json:
                write_run(Path(f"{args.json}.{Path(weights).stem}.json"), rows)
        minutes = (time.perf_counter() - began) / 60
        print(f"\n### weights {weights}, {args.split}: {len(rows)} objects in {minutes:.1f} min\n")
        print(report(rows))


if __name__ == "__main__":
    main()

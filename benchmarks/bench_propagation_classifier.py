"""Propagation with and without the pixel classifier, and the gate that decides between them.

Each object (the groups of ``bench_stop_rules.py``; prompt = the true mask on the slice where it is
largest) is propagated twice with the weights' own stop rule (``bench_propagation.STOP_RULES``):
with its pixel classifier joined (``pixel_classifier="always"``; its fronts then end by the
library's ``classifier_stop``, the two masks' agreement) and without (``"never"``). The
classifier's half-split Dice on the painted slice does not depend on the network, so every gate
is replayed from these two runs: an object whose half-split Dice reaches the gate takes the first
run's Dice, the others the second's. The table gives the 3D Dice (%) per group for each gate, the
objects the classifier joins, slices/s of each run, and the seconds a run spends once per object to
fit the classifier and test it.

Run: ``python benchmarks/bench_propagation_classifier.py [--split val|test] [--weights W ...]
[--data GROUP ...] [--json OUT] [--threads 1]``; ``--records FILE ...`` prints the tables of
earlier ``--json`` runs.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench_propagation import BUNDLED, STOP_RULES, prompt_of
from bench_stop_rules import GROUPS, run_objects, table_head
from napari_openseg.core.metrics import dice_score
from napari_openseg.core.preprocess import normalize_intensity
from napari_openseg.core.propagate.classifier import SliceFeatures, fit_object
from napari_openseg.core.propagate.propagation import propagate
from napari_openseg.core.propagate.settings import DEFAULT_CLASSIFIER_GATE

GATES = (0.0, 0.4, 0.5, 0.55, 0.6, 0.7, 0.8, 1.01)


def measure(case, net, weights: str) -> dict:
    """Both runs of one object: 3D Dice, seconds and slices predicted, and the half-split Dice."""
    prompt, z = prompt_of(case.truth)
    row = {"dataset": case.dataset, "case": case.name}
    began = time.perf_counter()  # what a run adds once per object: the fit and the half-split test
    fitted = fit_object(
        SliceFeatures(normalize_intensity(case.image)),
        [z],
        [case.truth[z]],
        "auto",
        DEFAULT_CLASSIFIER_GATE,
        0,
    )
    # the half-split Dice does not depend on the network: the same the runs below compute
    row["setup_seconds"], row["half_split"] = time.perf_counter() - began, fitted.dice
    for mode in ("always", "never"):
        began = time.perf_counter()
        result = propagate(
            case.image, prompt, net, device="cpu", pixel_classifier=mode, **STOP_RULES.get(weights, {})
        )
        row[mode] = dice_score(result.labels == 1, case.truth)
        row[f"{mode}_seconds"] = time.perf_counter() - began
        row[f"{mode}_slices"] = int((~np.isnan(result.confidence)).sum())
    return row


def gated(row: dict, gate: float) -> float:
    return row["always"] if row["half_split"] >= gate else row["never"]


def report(rows: list[dict]) -> str:
    groups = sorted({r["dataset"] for r in rows})
    lines = table_head(rows, ["gate (half-split Dice)"], ["mean", "objects joined"])
    for gate in GATES:
        cells = [100 * np.mean([gated(r, gate) for r in rows if r["dataset"] == g]) for g in groups]
        name = "always" if gate == 0 else "never" if gate > 1 else f"{gate:.2f}"
        joined = sum(r["half_split"] >= gate for r in rows)
        lines.append(
            f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {np.mean(cells):.1f} | {joined} |"
        )
    speed = []
    for mode in ("always", "never"):
        slices = sum(r[f"{mode}_slices"] for r in rows)
        speed.append(f"{mode}: {slices / sum(r[f'{mode}_seconds'] for r in rows):.2f} slices/s")
    if all("setup_seconds" in r for r in rows):
        setup = {g: np.mean([r["setup_seconds"] for r in rows if r["dataset"] == g]) for g in groups}
        speed.append(
            "fit and half-split test per object " + ", ".join(f"{g} {t:.2f} s" for g, t in setup.items())
        )
    lines.append("")
    lines.append("3D Dice (%), mean per group; mean: of the groups. Speed, " + ", ".join(speed) + ".")
    lines.append("")
    lines.append("| object | half-split Dice | with classifier | without |")
    lines.append("|---|---|---|---|")
    for r in rows:
        lines.append(
            f"| {r['dataset']} {r['case']} | {r['half_split']:.2f} | {100 * r['always']:.1f} | {100 * r['never']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--weights", nargs="+", default=list(BUNDLED))
    parser.add_argument("--data", nargs="+", default=list(GROUPS), choices=GROUPS)
    parser.add_argument("--split", default="val", choices=("val", "test"))
    parser.add_argument("--subjects", type=int, help="only the first N hippocampus subjects and LGG patients")
    parser.add_argument("--json", help="write the rows to this file (a suffix per weights)")
    parser.add_argument("--records", nargs="+", help="print the tables of earlier --json files")
    run_objects(parser.parse_args(), measure, report)


if __name__ == "__main__":
    main()

"""Where the pixel classifier joins propagation, what ends a front: the network's confidence, or how
well the classifier's mask agrees with the network's (``classifier_stop``).

Each object (the groups of ``bench_stop_rules.py``; prompt = the true mask on the slice where it is
largest) is propagated once with its pixel classifier joined (``pixel_classifier="always"``) and
every stop off but the vanished area, recording per slice the confidence, the written (fused) and
the network's own areas and overlaps with the truth, and the agreement of the two masks. Every
combination of gate and stop rule is then replayed on that recording with ``StopRule`` itself: an
object whose half-split Dice reaches the gate writes the fused mask and stops by the agreement
(``classifier_stop`` > 0) or by the weights' own confidence rule (``classifier_stop`` = 0, as
before); the others write the network's mask and stop by the confidence rule. As in
``bench_stop_rules.py``, the replay ignores that a front stopping earlier no longer feeds the shared
bank; ``bench_propagation_classifier.py`` runs the chosen rule for real.

Run: ``python benchmarks/bench_classifier_stop.py [--split val|test] [--weights W ...] [--data GROUP
...] [--json OUT] [--threads 1]`` (both bundled files by default; about 15 minutes per file for the
validation objects on 2 quiet cores, whose fronts run to the volume's ends); ``--records FILE ...``
prints the tables of earlier ``--json`` runs.
"""

from __future__ import annotations

import argparse

import numpy as np

from bench_propagation import BUNDLED, STOP_RULES
from bench_stop_rules import GROUPS, record, replay, run_objects, table_head
from napari_openseg.core.propagate.settings import DEFAULT_STOP_CONFIDENCE, DEFAULT_STOP_RATIO

GATES = (0.0, 0.4, 0.5, 0.55, 0.6, 0.7, 0.8)
#: 0: the weights' own confidence rule for joined objects too (what propagation did before).
AGREEMENTS = (0.0, 0.2, 0.3, 0.4, 0.5)


def measure(case, net, weights: str) -> dict:
    """The recording of one object, with the weights' own confidence rule to replay."""
    row = record(case, net, {"pixel_classifier": "always"})
    rule = {"stop_confidence": DEFAULT_STOP_CONFIDENCE, "stop_ratio": DEFAULT_STOP_RATIO}
    rule.update(STOP_RULES.get(weights, {}))
    return {**row, **rule}


def dice(obj: dict, gate: float, agreement: float) -> float:
    """3D Dice of one recorded object under one gate and ``classifier_stop``."""
    joined = obj["half_split"] >= gate
    return replay(
        obj,
        lambda front: obj["stop_confidence"],
        stop_ratio=obj["stop_ratio"],
        joined=joined,
        classifier_stop=agreement if joined else 0.0,
    )


def report(rows: list[dict]) -> str:
    groups = sorted({r["dataset"] for r in rows})
    lines = table_head(rows, ["gate", "classifier_stop"], ["mean", "joined"])
    for gate in GATES:
        joined = sum(r["half_split"] >= gate for r in rows)
        for agreement in AGREEMENTS:
            cells = [
                100 * np.mean([dice(r, gate, agreement) for r in rows if r["dataset"] == g]) for g in groups
            ]
            name = f"{agreement}" if agreement else "0 (the confidence rule)"
            lines.append(
                f"| {gate} | {name} | "
                + " | ".join(f"{c:.1f}" for c in cells)
                + f" | {np.mean(cells):.1f} | {joined} |"
            )
    cells = [100 * np.mean([dice(r, 2.0, 0.0) for r in rows if r["dataset"] == g]) for g in groups]
    lines.append(
        "| never joins | - | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {np.mean(cells):.1f} | 0 |"
    )
    return "\n".join(lines) + "\n\n3D Dice (%), mean per group of objects; mean: of the groups (replayed)."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--weights", nargs="+", default=list(BUNDLED), help="weights names or files")
    parser.add_argument("--json", help="write the rows to this file (one per weights: a suffix)")
    parser.add_argument("--records", nargs="+", help="print the tables of files written with --json")
    parser.add_argument("--data", nargs="+", default=list(GROUPS), choices=GROUPS, help="groups of objects")
    parser.add_argument("--subjects", type=int, help="only the first N hippocampus subjects and LGG patients")
    parser.add_argument("--split", default="val", choices=("val", "test"))
    run_objects(parser.parse_args(), measure, report)


if __name__ == "__main__":
    main()

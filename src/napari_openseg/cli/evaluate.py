"""``openseg evaluate``: Dice of the model and of three baselines on a labelled folder."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from napari_openseg.core.engine_settings import DEFAULT_ENSEMBLE, DEFAULT_SUPPORT_SIZE
    from napari_openseg.core.pixel_classifier import CLASSIFIERS, DEFAULT_CLASSIFIER

    parser = subparsers.add_parser(
        "evaluate",
        help="Dice of the model and baselines on a labelled folder",
        description="DIR holds images/ + masks/ (2D pictures paired by file stem) or imagesTr/ + labelsTr/ "
        "(NIfTI volumes, MSD layout, evaluated on 2D slices along each axis). Every label "
        "value is a task; support comes from the validation cases, queries from the test cases. "
        "model is the engine as users run it (method auto); network, pixel_classifier and stacked "
        "are its methods on their own; baselines: random_init, label_prior. The engine's "
        "cross-validated estimate is printed beside the measured Dice.",
    )
    parser.add_argument("dir", help="labelled folder")
    parser.add_argument(
        "--support-size", type=int, default=DEFAULT_SUPPORT_SIZE, help="S: support entries per prediction"
    )
    parser.add_argument(
        "--ensemble", type=int, default=DEFAULT_ENSEMBLE, help="K: support subsets combined per prediction"
    )
    parser.add_argument("--weights", help="weights name (openseg-default, universeg-v1) or file path")
    parser.add_argument("--seed", type=int, default=0, help="seed of the support subsets and query samples")
    parser.add_argument("--json", help="write per-task Dice (mean, std, n) for every method to this file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    parser.add_argument(
        "--support-split",
        default="val",
        choices=["val", "train+val"],
        help="cases the support entries come from (default val)",
    )
    parser.add_argument("--max-queries", type=int, help="at most N query slices per task (seeded sample)")
    parser.add_argument("--label-values", type=int, nargs="+", help="only these label values")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="subset of: model network pixel_classifier stacked random_init label_prior",
    )
    parser.add_argument(
        "--classifier",
        choices=CLASSIFIERS,
        default=DEFAULT_CLASSIFIER,
        help=f"the engine's pixel classifier (default {DEFAULT_CLASSIFIER})",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, cuda:N or mps")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from napari_openseg.cli._progress import with_progress_bar
    from napari_openseg.evaluation.evaluate import METHODS, iter_evaluate
    from napari_openseg.io import check_writable

    if args.json:
        check_writable(args.json, args.overwrite)  # refuse before any work is done
    report = with_progress_bar(
        iter_evaluate(
            args.dir,
            args.weights,
            support_size=args.support_size,
            ensemble=args.ensemble,
            seed=args.seed,
            support_split=args.support_split,
            max_queries=args.max_queries,
            methods=tuple(args.methods or METHODS),
            label_values=args.label_values,
            device=args.device,
            classifier=args.classifier,
        ),
        f"evaluate {args.dir}",
    )
    print(f"S={args.support_size} K={args.ensemble} seed={args.seed}; {report.split_note()}")
    print("Dice per task (mean ± std over queries)")
    print(report.table())
    estimates = report.estimate_table()
    if estimates:
        print("\nMeasured Dice / the engine's cross-validated estimate from the support (mean over batches)")
        print(estimates)
    if args.json:
        report.write_json(args.json, overwrite=args.overwrite)
        print(f"wrote {args.json}")
    return 0

"""``openseg propagate``: a volume and its painted slice(s) -> the whole volume's labels.

The prompt file holds the painted slice(s) and zeros elsewhere, with the image's shape. To correct a
run, paint the fixed slice into the prompt file (or copy it from the output) and run again; list a
slice with ``--complete-slices`` when an object was erased there, so that it stops there.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_openseg.cli import AXIS_HELP


def register(subparsers) -> None:
    from napari_openseg.core.propagate.settings import (
        DEFAULT_CAPACITY,
        DEFAULT_CLASSIFIER_STOP,
        DEFAULT_PIXEL_CLASSIFIER,
        DEFAULT_SHORT_TERM,
        DEFAULT_STOP_CONFIDENCE,
        DEFAULT_STOP_RATIO,
        PIXEL_CLASSIFIER_MODES,
        PropagationSettings,
    )

    parser = subparsers.add_parser(
        "propagate", help="carry objects painted on one or more slices through a volume"
    )
    parser.add_argument("--image", required=True, metavar="VOL", help="volume or 2D stack (NIfTI, TIFF, NPY)")
    parser.add_argument(
        "--prompt",
        required=True,
        metavar="LABELS",
        help="labels of the image's shape: painted slice(s), zeros elsewhere",
    )
    parser.add_argument(
        "--out", required=True, metavar="OUT", help="output labels file (.nii.gz, .tif, .npy)"
    )
    parser.add_argument("--axis", type=int, default=0, metavar="A", help=AXIS_HELP)
    parser.add_argument(
        "--bank-size",
        type=int,
        default=DEFAULT_CAPACITY,
        metavar="M",
        help="M: memory bank size per object (default %(default)s)",
    )
    parser.add_argument(
        "--short-term",
        type=int,
        default=DEFAULT_SHORT_TERM,
        metavar="K",
        help="K: each front's short-term memory, its last K accepted slices (0: none; default %(default)s)",
    )
    parser.add_argument(
        "--weights",
        metavar="NAME|PATH",
        help="weights name (default openseg-propagate; openseg-default means the same here; "
        "universeg-v1) or file path",
    )
    parser.add_argument("--json", metavar="OUT", help="also write the per-slice confidence to this JSON file")
    parser.add_argument("--label-values", type=int, nargs="+", metavar="V", help="only these painted labels")
    parser.add_argument(
        "--complete-slices",
        type=int,
        nargs="+",
        default=[],
        metavar="S",
        help="slices whose labels are complete: an object absent there stops there",
    )
    parser.add_argument(
        "--stop-confidence",
        type=float,
        default=DEFAULT_STOP_CONFIDENCE,
        metavar="C",
        help=f"slices less confident than C count towards ending an object (default {DEFAULT_STOP_CONFIDENCE}; 0 = off)",
    )
    parser.add_argument(
        "--stop-ratio",
        type=float,
        default=DEFAULT_STOP_RATIO,
        metavar="R",
        help="slices less confident than R times the first slice of their front count towards ending "
        f"an object (default {DEFAULT_STOP_RATIO}; 0 = off; lower it if an object stops too early)",
    )
    parser.add_argument(
        "--pixel-classifier",
        choices=PIXEL_CLASSIFIER_MODES,
        default=DEFAULT_PIXEL_CLASSIFIER,
        help="join each object's pixel classifier, fitted to its painted slices, to the network: auto = "
        "where it segments held-out halves of the painted slices well (objects defined by intensity); "
        "default %(default)s",
    )
    parser.add_argument(
        "--classifier-stop",
        type=float,
        default=DEFAULT_CLASSIFIER_STOP,
        metavar="A",
        help="where an object's pixel classifier joins, slices whose network and classifier masks agree "
        "with a Dice below A count towards ending the object, in place of --stop-confidence and "
        f"--stop-ratio (default {DEFAULT_CLASSIFIER_STOP}; 0 = off: the confidence rule for every object)",
    )
    parser.add_argument(
        "--unordered",
        action="store_true",
        help="the slices are an unordered stack of 2D images (one-prompt segmentation)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument(
        "--seed", type=int, default=PropagationSettings().seed, help="seed of the support draws"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import json

    from napari_openseg.cli._progress import with_progress_bar
    from napari_openseg.core.propagate.propagation import iter_propagate
    from napari_openseg.errors import OpenSegError
    from napari_openseg.io import atomic_path, check_writable, read_image, write_image
    from napari_openseg.model.registry import propagation_weights

    inputs = [args.image, args.prompt]
    check_writable(args.out, args.overwrite, image=True, inputs=inputs)  # refuse before any work is done
    options = {"stop_confidence": args.stop_confidence, "stop_ratio": args.stop_ratio}
    if args.json:
        check_writable(args.json, args.overwrite, inputs=inputs)
        if Path(args.json).resolve() == Path(args.out).resolve():
            raise OpenSegError("--json and --out name the same file: give the confidence report its own name")
    image = read_image(args.image)
    prompt = read_image(args.prompt)
    result = with_progress_bar(
        iter_propagate(
            image.data,
            prompt.data,
            args.weights,
            axis=args.axis,
            label_values=args.label_values,
            complete_slices=args.complete_slices,
            bank_size=args.bank_size,
            short_term=args.short_term,
            pixel_classifier=args.pixel_classifier,
            classifier_stop=args.classifier_stop,
            unordered=args.unordered,
            device=args.device,
            seed=args.seed,
            rgb=image.rgb,
            **options,
        ),
        f"propagate {image.name}",
    )
    write_image(args.out, result.labels, image, overwrite=args.overwrite)
    summary = result.summary()
    if args.json:
        report = {
            "image": str(args.image),
            "prompt": str(args.prompt),
            "out": str(args.out),
            "weights": propagation_weights(args.weights),
            **summary,
        }
        with atomic_path(args.json, args.overwrite) as tmp:
            tmp.write_text(json.dumps(report, indent=1) + "\n")
    counts = {v: int((result.labels == v).sum()) for v in result.label_values}
    print(f"{args.out}: voxels per label {counts}")
    weakest = summary["least_confident_slice"]
    if weakest is not None:
        print(
            f"mean confidence {summary['mean_confidence']:.3f}; least confident slice {weakest} "
            f"({summary['slices'][weakest]['confidence']:.3f}): check it first"
        )
    note = result.classifier_note()
    if note:
        print(note)
    hint = result.confidence_stop_hint(
        {"--stop-ratio": args.stop_ratio, "--stop-confidence": args.stop_confidence}, "--classifier-stop"
    )
    if hint:
        print(hint)
    return 0

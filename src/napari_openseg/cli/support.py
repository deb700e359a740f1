"""``openseg support build|show``: support-set files from image and label files."""

from __future__ import annotations

import argparse
import sys

from napari_openseg.cli import AXIS_HELP


def register(subparsers) -> None:
    parser = subparsers.add_parser("support", help="build or inspect support-set files")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    build = actions.add_parser("build", help="image + labels files -> support-set file")
    build.add_argument("--image", action="append", required=True, help="image file (repeat for several)")
    build.add_argument("--labels", action="append", required=True, help="labels file, one per --image")
    build.add_argument("--out", required=True, help="support-set file to write (.npz)")
    build.add_argument("--axis", type=int, default=0, help=AXIS_HELP)
    build.add_argument("--label-values", type=int, nargs="+", help="only these label values (tasks)")
    build.add_argument("--slices", type=int, nargs="+", help="only these slice indices")
    build.add_argument(
        "--background-label",
        type=int,
        metavar="B",
        help="the labels are strokes: B marks background, other values structures, 0 unpainted "
        "pixels (neither fitted nor scored)",
    )
    build.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    build.set_defaults(handler=run_build)
    show = actions.add_parser("show", help="print what a support-set file holds")
    show.add_argument("path")
    show.set_defaults(handler=run_show)


def run_build(args: argparse.Namespace) -> int:
    import numpy as np

    from napari_openseg.core.support import SupportSet, coverage_warning, entries_from_arrays
    from napari_openseg.errors import OpenSegError
    from napari_openseg.io import check_writable, read_image

    if len(args.image) != len(args.labels):
        raise OpenSegError(
            f"give one --labels per --image ({len(args.image)} images, {len(args.labels)} labels)"
        )
    check_writable(args.out, args.overwrite, inputs=[*args.image, *args.labels])
    metadata = {"axis": args.axis}
    if args.background_label is not None:
        metadata["background_label"] = args.background_label
    support = SupportSet(metadata=metadata)
    wanted = None if args.label_values is None else sorted(set(args.label_values))
    found: set[int] = set()
    for image_path, labels_path in zip(args.image, args.labels):
        image, labels = read_image(image_path), read_image(labels_path)
        present = None
        if wanted is not None:  # each requested value comes from the images that hold it
            present = [v for v in wanted if np.any(labels.data == v)]
            if not present:
                continue
            found.update(present)
        support.extend(
            entries_from_arrays(
                image.data,
                labels.data,
                axis=args.axis,
                source=image.name,
                label_values=present,
                slice_indices=args.slices,
                rgb=image.rgb,
                background_label=args.background_label,
            )
        )
    missing = sorted(set(wanted or []) - found)
    if missing:
        raise OpenSegError(f"label value {missing[0]} occurs in none of the --labels files")
    support.save(args.out, overwrite=args.overwrite)
    counts = ", ".join(f"label {k}: {v}" for k, v in support.counts().items())
    print(f"wrote {args.out}: {len(support)} entries ({counts})")
    warning = coverage_warning(support.entries)
    if warning:
        print(f"warning: {warning} (openseg support build --background-label B)", file=sys.stderr)
    return 0


def run_show(args: argparse.Namespace) -> int:
    from napari_openseg.core.support import SupportSet

    support = SupportSet.load(args.path)
    background = support.metadata.get("background_label")
    strokes = f", strokes (background label {background})" if background is not None else ""
    print(f"{args.path}: {len(support)} entries{strokes}")
    for label, count in support.counts().items():
        sources = sorted({e.source for e in support.task(label)})
        print(f"  label {label}: {count} entries from {', '.join(sources)}")
    return 0

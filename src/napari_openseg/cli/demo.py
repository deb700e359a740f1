"""``openseg demo``: the whole workflow on the bundled sample, with the Dice it reaches."""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_openseg.cli import AXIS_HELP


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="segment the bundled sample (MNI152, grey/white matter) from a few of its labelled slices",
    )
    parser.add_argument("--out", default="openseg-demo", help="folder for the results (default openseg-demo)")
    parser.add_argument(
        "--labelled-slices",
        type=int,
        default=8,
        help="how many evenly spaced slices count as painted (default 8)",
    )
    parser.add_argument("--axis", type=int, default=0, help=f"{AXIS_HELP} (axial slices for the sample)")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier demo results")
    from napari_openseg.cli.segment import add_model_options

    add_model_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import sys

    import numpy as np

    from napari_openseg.cli._progress import with_progress_bar
    from napari_openseg.cli.segment import model_settings
    from napari_openseg.core.axes import axis_text
    from napari_openseg.core.device import resolve_device
    from napari_openseg.core.metrics import dice_per_label
    from napari_openseg.core.segment.expected_time import describe_expected_time, pixels_per_slice
    from napari_openseg.core.segment.inference import iter_segment
    from napari_openseg.core.support import build_support_set
    from napari_openseg.errors import OpenSegError
    from napari_openseg.io import check_writable, write_image
    from napari_openseg.sample import SAMPLE_LABEL_NAMES, evenly_spaced_slices, load_sample

    image, labels = load_sample()
    if not 0 <= args.axis < image.data.ndim:
        raise OpenSegError(f"--axis must be 0, 1 or 2 (the sample is a volume), got {args.axis}")
    n_slices = image.data.shape[args.axis]
    if not 1 <= args.labelled_slices < n_slices:
        raise OpenSegError(f"--labelled-slices must be between 1 and {n_slices - 1}")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise OpenSegError(f"{out_dir} is a file; --out names the folder for the demo's results")
    out_dir.mkdir(parents=True, exist_ok=True)
    support_path = out_dir / "sample_support.npz"
    result_path = out_dir / "sample_openseg.nii.gz"
    for path in (support_path, result_path):
        check_writable(path, args.overwrite)
    settings = model_settings(args)  # a bad value is refused before the support set is built

    chosen = evenly_spaced_slices(labels.data, args.axis, args.labelled_slices)
    support = build_support_set(
        image.data, labels.data, axis=args.axis, source="mni152_2mm", slice_indices=chosen.tolist()
    )
    on_gpu = resolve_device(args.device).type != "cpu"
    expected = describe_expected_time(
        n_slices,
        support.counts(),
        args.support_size,
        args.ensemble,
        on_gpu,
        method=args.method,
        pixels=pixels_per_slice(image.data.shape, args.axis),
    )
    print(f"sample: {expected}", file=sys.stderr)
    result = with_progress_bar(
        iter_segment(
            image.data,
            support,
            args.weights,
            settings=settings,
            axis=args.axis,
            device=args.device,
            keep_probabilities=False,
        ),
        "segment sample",
        unit="slice",
    )
    support.save(support_path, overwrite=args.overwrite)  # only now: a failed run leaves nothing behind
    write_image(result_path, result.labels, image, overwrite=args.overwrite)

    held_out = np.setdiff1d(np.arange(n_slices), chosen)
    truth = np.take(labels.data, held_out, axis=args.axis)
    scores = dice_per_label(np.take(result.labels, held_out, axis=args.axis), truth, result.label_values)
    print(
        f"support: {len(support)} entries from slices {chosen.tolist()} along {axis_text(args.axis)} -> "
        f"{support_path}"
    )
    print(f"result: {result_path}")
    for line in result.describe_estimates():
        print(f"  {line}")
    print(f"Dice on the {len(held_out)} slices not in the support set:")
    for value, score in scores.items():
        print(f"  {value} {SAMPLE_LABEL_NAMES.get(value, '')}: {score:.3f}")
    print(f"  mean: {np.mean(list(scores.values())):.3f}")
    return 0

"""``openseg segment``: support set + image file(s) -> label file(s)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from napari_openseg.cli import AXIS_HELP
from napari_openseg.core.engine_settings import CHOICES, EXTENTS, PRECISIONS, SegmentSettings  # torch-free

#: The fields of :class:`~napari_openseg.core.engine_settings.SegmentSettings` that
#: :func:`add_model_options` sets.
MODEL_SETTINGS = ("support_size", "ensemble", "method", "precision", "seed")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs the segmentation engine; the defaults are
    :class:`~napari_openseg.core.engine_settings.SegmentSettings`'s."""
    defaults = SegmentSettings()
    parser.add_argument("--weights", help="weights name (openseg-default, universeg-v1) or file path")
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps"
    )
    parser.add_argument("--precision", default=defaults.precision, choices=PRECISIONS)
    parser.add_argument(
        "--support-size", type=int, default=defaults.support_size, help="S: entries per prediction"
    )
    parser.add_argument(
        "--ensemble",
        type=int,
        default=defaults.ensemble,
        help="K: predictions from K draws of S entries, combined; K times slower and it only acts "
        "on tasks with more than S entries: a larger S gains more for less time "
        "(docs/performance.md)",
    )
    parser.add_argument(
        "--method",
        default=defaults.method,
        choices=CHOICES,
        help="auto (per task: the best cross-validated on the support set from 12 examples, stacked "
        "below), network, "
        "pixel-classifier or stacked (filters and the network's probability)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the support subsets")


def model_settings(args: argparse.Namespace, **more) -> SegmentSettings:
    """The :class:`~napari_openseg.core.engine_settings.SegmentSettings` of :func:`add_model_options`'
    options and ``more`` fields: a bad value is refused before any file is read."""
    return SegmentSettings(**{name: getattr(args, name) for name in MODEL_SETTINGS}, **more)


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """The options of a segmentation (``openseg segment`` and ``openseg batch segment``), read back by
    :func:`engine_options`."""
    defaults = SegmentSettings()
    parser.add_argument("--axis", type=int, default=0, help=AXIS_HELP)
    parser.add_argument(
        "--slices",
        metavar="A:B",
        help="volumes: segment only slices A to B-1 along the axis "
        "(either may be left out: 40:, :90); the rest stays background",
    )
    parser.add_argument(
        "--extent",
        choices=EXTENTS,
        default=defaults.extent,
        help="volumes: 'auto' ends each label where it fades out, starting from the slices "
        "painted for it (default %(default)s; docs/propagation.md)",
    )
    parser.add_argument("--label-values", type=int, nargs="+", help="only these tasks")
    parser.add_argument(
        "--threshold", type=float, default=defaults.threshold, help="background below this probability"
    )
    parser.add_argument("--batch-size", type=int, help="slices per forward pass (default: automatic)")
    add_model_options(parser)


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of a :class:`~napari_openseg.core.cohort.tasks.SegmentTask` (the keywords of
    :func:`~napari_openseg.core.segment.inference.iter_segment`) that :func:`add_engine_options` set (the
    weights are its positional ``model``), checked as
    :class:`~napari_openseg.core.engine_settings.SegmentSettings` before any work."""
    from napari_openseg.core.segment.extent import parse_slice_range
    from napari_openseg.errors import OpenSegError

    if not -3 <= args.axis < 3:  # checked here: the core checks it per volume, after a 2D input's output
        raise OpenSegError(f"--axis must be 0, 1 or 2 (or -1..-3), got {args.axis}")
    if args.slices is not None:
        parse_slice_range(args.slices)  # a typo is refused before any work
    settings = model_settings(args, threshold=args.threshold, extent=args.extent)
    return {
        "axis": args.axis,
        "slices": args.slices,
        "label_values": args.label_values,
        "batch_size": args.batch_size,
        "device": args.device,
        # the fields given on the command line only: the settings hash of a cohort stays as it was
        **{name: getattr(settings, name) for name in (*MODEL_SETTINGS, "threshold", "extent")},
    }


def register(subparsers) -> None:
    parser = subparsers.add_parser("segment", help="segment images or volumes from a support set")
    parser.add_argument("images", nargs="+", help="image or volume files (NIfTI, TIFF, NPY, PNG)")
    parser.add_argument("--support", required=True, help="support-set file (.npz)")
    out = parser.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="output file (one input only)")
    out.add_argument("--out-dir", help="folder for outputs named <input>_openseg.<ext>")
    parser.add_argument("--probabilities", action="store_true", help="also write <output>_prob (float32)")
    parser.add_argument("--json", help="write each output's tasks, methods and expected Dice to this file")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    add_engine_options(parser)
    parser.set_defaults(handler=run)


def output_paths(args: argparse.Namespace) -> list[Path]:
    from napari_openseg.errors import OpenSegError
    from napari_openseg.io import result_path

    if args.out:
        if len(args.images) != 1:
            raise OpenSegError("--out takes one input; use --out-dir for several")
        return [Path(args.out)]
    folder = Path(args.out_dir)
    paths = [result_path(folder, p, "openseg") for p in args.images]
    clashes = sorted({str(p) for p in paths if paths.count(p) > 1})
    if clashes:
        raise OpenSegError(
            f"inputs with the same name would share the output {', '.join(clashes)}: "
            "segment them into different --out-dir folders"
        )
    return paths


def probability_path(path: Path) -> Path:
    from napari_openseg.io import strip_suffix

    suffix = path.name[len(strip_suffix(path)) :]
    return path.with_name(f"{strip_suffix(path)}_prob{suffix}")


def run(args: argparse.Namespace) -> int:
    from napari_openseg.cli._files import check_inputs, output_folder
    from napari_openseg.core.support import SupportSet

    options = engine_options(args)  # checks --axis before anything is read
    check_inputs(args.images)  # all of them, before the first is segmented
    support = SupportSet.load(args.support)
    if args.out_dir is None:
        return segment_all(args, support, options)
    with output_folder(args.out_dir, "--out-dir"):
        return segment_all(args, support, options)


def segment_all(args: argparse.Namespace, support, options: dict[str, Any]) -> int:
    import json
    import sys

    import numpy as np

    from napari_openseg.cli._progress import with_progress_bar
    from napari_openseg.core.cohort.tasks import SegmentTask
    from napari_openseg.core.device import resolve_device
    from napari_openseg.core.segment.expected_time import describe_expected_time, pixels_per_slice
    from napari_openseg.io import atomic_path, check_writable, read_image, write_image

    outputs = output_paths(args)
    inputs = [*args.images, args.support]
    for path in outputs:  # refuse before any work is done
        check_writable(path, args.overwrite, image=True, inputs=inputs)
        if args.probabilities:
            check_writable(probability_path(path), args.overwrite, image=True, inputs=inputs)
    if args.json:
        check_writable(args.json, args.overwrite, inputs=inputs)
    task = SegmentTask(support, args.weights, options)
    engine = task.prepare()  # one engine for every input: the tasks are fitted once
    report = []
    on_gpu = resolve_device(args.device).type != "cpu"
    tasks = {v: n for v, n in support.counts().items() if args.label_values is None or v in args.label_values}
    for number, (image_path, out_path) in enumerate(zip(args.images, outputs)):
        image = read_image(image_path)
        spatial = image.data.shape[:-1] if image.rgb else image.data.shape
        n_slices = 1 if len(spatial) == 2 else spatial[args.axis]
        expected = describe_expected_time(
            n_slices,
            tasks,
            args.support_size,
            args.ensemble,
            on_gpu,
            method=args.method,
            fitted=number > 0,  # the engine checked the support for the first image
            pixels=pixels_per_slice(spatial, args.axis),
        )
        print(f"{image.name}: {expected}", file=sys.stderr)
        result = with_progress_bar(
            task.iter_run(engine, image.data, rgb=image.rgb, keep_probabilities=args.probabilities),
            f"segment {image.name}",
            unit="slice",
        )
        write_image(out_path, result.labels, image, overwrite=args.overwrite)
        if args.probabilities:
            write_image(
                probability_path(out_path),
                result.probabilities.astype(np.float32),
                image,
                overwrite=args.overwrite,
            )
        counts = {v: int((result.labels == v).sum()) for v in result.label_values}
        print(f"{out_path}: voxels per label {counts}")
        if result.extent is not None:
            kept = ", ".join(f"{v}: {a}:{b}" for v, (a, b) in result.extent.items())
            print(f"slices kept per label (A:B, B not included): {kept}")
        for line in result.describe_estimates():
            print(f"  {line}")
        report.append(
            {
                "input": str(image_path),
                "output": str(out_path),
                "voxels": {str(v): n for v, n in counts.items()},
                "tasks": {str(v): e.to_dict() for v, e in result.estimates.items()},
            }
        )
    if args.json:
        with atomic_path(args.json, args.overwrite) as tmp:
            tmp.write_text(
                json.dumps(
                    {
                        "support": str(args.support),
                        "weights": args.weights or "default",
                        "method": args.method,
                        "support_size": args.support_size,
                        "ensemble": args.ensemble,
                        "outputs": report,
                    },
                    indent=2,
                )
            )
        print(f"wrote {args.json}")
    return 0

"""``openseg batch``: one task over a cohort of files, on Dask, resumable (:mod:`napari_openseg.core.cohort.runner`).

* ``openseg batch segment --support S.npz --out-dir DIR [--scheduler local|ADDRESS|none] [--workers N]
  [--threads-per-worker T] [segment's options] INPUTS...``
* ``openseg batch novelty (--model M | --support S.npz) --out-dir DIR [...] INPUTS...``

INPUTS are files, folders, glob patterns or one CSV manifest with a ``path`` column. Results go to
``DIR/<input>_labels.<ext>``, or for novelty maps ``DIR/<input>_novelty.<ext>`` and the novel region
``DIR/<input>_novelty_novel_region.<ext>`` (the names ``openseg novelty map`` gives them), and every
item's fate to ``DIR/manifest.csv``. The exit status is 1 when any item failed.
"""

from __future__ import annotations

import argparse
import logging
import sys

from napari_openseg.cli.novelty import add_map_options, check_map_options, map_options
from napari_openseg.cli.segment import add_engine_options, engine_options


def add_cohort_options(parser: argparse.ArgumentParser) -> None:
    """Inputs, output folder and where the work runs."""
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="files, folders, glob patterns (quoted) or one CSV manifest with a 'path' column",
    )
    parser.add_argument("--out-dir", required=True, help="folder for the results and manifest.csv")
    parser.add_argument(
        "--scheduler",
        default="local",
        help="local: a Dask cluster on this machine (default); an address such as tcp://host:8786: "
        "a running Dask scheduler; none: in this process, without Dask",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="worker processes of a local cluster (default: one per core, or one per GPU)",
    )
    parser.add_argument("--threads-per-worker", type=int, help="items at once per local worker (default 1)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace existing outputs that manifest.csv does not list"
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "batch", help="a whole cohort of files from one support set or model, on Dask"
    )
    commands = parser.add_subparsers(dest="batch_command", metavar="ACTION")
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)

    segment = commands.add_parser("segment", help="segment every input from one support set")
    segment.add_argument("--support", required=True, help="support-set file (.npz)")
    add_engine_options(segment)
    add_cohort_options(segment)
    segment.set_defaults(handler=run_segment)

    novelty = commands.add_parser("novelty", help="novelty map and novel region of every input volume")
    add_map_options(novelty)
    add_cohort_options(novelty)
    novelty.set_defaults(handler=run_novelty)


def run_segment(args: argparse.Namespace) -> int:
    from napari_openseg.core.cohort.tasks import SegmentTask

    return run_task(SegmentTask(args.support, args.weights, engine_options(args)), args)


def run_novelty(args: argparse.Namespace) -> int:
    from napari_openseg.core.cohort.tasks import NoveltyTask
    from napari_openseg.errors import OpenSegError

    check_map_options(args)
    if args.seed_mask and not args.seed_image:
        raise OpenSegError("--seed-mask needs --seed-image, the volume it was painted on")
    if args.model:
        task = NoveltyTask(model=args.model, options=map_options(args))
    else:
        seed = (args.seed_image, args.seed_mask) if args.seed_mask else None
        task = NoveltyTask(
            support=args.support,
            weights=args.weights,
            unknown_seed=seed,
            options={"axis": args.axis, **map_options(args)},
        )
    return run_task(task, args)


def run_task(task, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from napari_openseg.cli._progress import with_progress_bar
    from napari_openseg.core.cohort.cluster import require_distributed
    from napari_openseg.core.cohort.runner import iter_cohort, plan_cohort
    from napari_openseg.errors import OpenSegError

    if not getattr(args, "verbose", False):  # Dask's own log (cluster start and stop) only with -v
        logging.getLogger("distributed").setLevel(logging.ERROR)
    scheduler = None if args.scheduler == "none" else args.scheduler
    if scheduler is None and (args.workers is not None or args.threads_per_worker is not None):
        raise OpenSegError(
            "--workers and --threads-per-worker size a Dask cluster; --scheduler none runs here"
        )
    if scheduler is not None:
        require_distributed()
    plan = plan_cohort(task, args.inputs, args.out_dir, overwrite=args.overwrite)
    print(
        f"{len(plan.todo)} to compute, {len(plan.skipped)} done before with these settings "
        f"(settings hash {plan.settings_hash})",
        file=sys.stderr,
    )

    def show(step) -> None:
        if "cluster" in step.payload:
            tqdm.write(f"running on {step.payload['cluster']}", file=sys.stderr)
        if step.payload.get("dashboard"):
            tqdm.write(f"Dask dashboard: {step.payload['dashboard']}", file=sys.stderr)

    # Ctrl-C or SIGTERM (openseg's main turns it into an interrupt) closes the run: what runs is cancelled,
    # the manifest is written with the finished items
    summary = with_progress_bar(
        iter_cohort(
            plan, scheduler=scheduler, workers=args.workers, threads_per_worker=args.threads_per_worker
        ),
        f"batch {task.name}",
        unit="item",
        on_step=show,
    )
    print(
        f"{summary.manifest}: {summary.done} done, {len(summary.failures)} failed, "
        f"{len(summary.skipped)} done before"
    )
    for failure in summary.failures:  # read_image's messages name the file already
        source = str(failure.item.source)
        print(f"failed: {failure.error if source in failure.error else f'{source}: {failure.error}'}")
    return 1 if summary.failures else 0

"""``openseg train``: episodic training of in-context segmentation weights (resumable)."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train weights on synthetic and real tasks (resumable)",
        description="Episodic training (see docs/model-card.md). Checkpoints, weights and a JSON-lines "
        "log go to OUT_DIR; --resume continues the run stored there.",
    )
    parser.add_argument("out_dir", help="run folder (checkpoint.pt, weights.pt, best.pt, log.jsonl)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run stored in OUT_DIR with its stored settings; only --steps and "
        "--decay-start may change",
    )
    parser.add_argument(
        "--steps", type=int, help="total steps of the run (default 20000; on --resume: as stored)"
    )
    parser.add_argument("--stop-after", type=int, help="end this call after N more steps (checkpointed)")
    parser.add_argument(
        "--decay-start", type=int, help="step from which the learning rate decays (cosine) to 0"
    )
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 32, 32, 32], help="encoder widths")
    parser.add_argument("--grid", type=int, default=64, help="model grid size (default 64)")
    parser.add_argument("--init-weights", help="start from these weights (fine-tuning, e.g. at another grid)")
    parser.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate (default 5e-4)")
    parser.add_argument(
        "--warmup", type=int, default=200, help="steps of linear learning-rate warm-up (default 200)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="episodes per step (default 8)")
    parser.add_argument("--support-min", type=int, default=1, help="smallest support size S (default 1)")
    parser.add_argument("--support-max", type=int, default=16, help="largest support size S (default 16)")
    # The names training.episodes.draw_support_size knows (not imported here: the CLI starts without torch).
    parser.add_argument(
        "--support-sampling",
        choices=("uniform", "log-uniform"),
        default="uniform",
        help="how S is drawn per step: uniform, or log-uniform (each doubling of S as likely: "
        "as many steps at S = 1 as at 32-64; default uniform)",
    )
    parser.add_argument(
        "--real-fraction",
        type=float,
        default=0.3,
        help="share of episodes from real tasks (default 0.3; 0 = synthetic only)",
    )
    parser.add_argument(
        "--real-families",
        nargs="*",
        default=["hippocampus"],
        help="real task families to train on (train split; default hippocampus)",
    )
    parser.add_argument(
        "--task-bank",
        choices=("permissive", "all"),
        help="real tasks from the task bank (training/task_bank.json) instead of "
        "--real-families: the train split of every permissive set (weights that may be "
        "bundled), or of every set ('all': research weights, never bundled); validation "
        "covers every set's val split",
    )
    parser.add_argument(
        "--task-sampling",
        choices=("task", "family"),
        default="task",
        help="draw a real episode's task uniformly over tasks, or over families first "
        "(no set with many labels dominates; default task)",
    )
    parser.add_argument(
        "--empty-fraction",
        type=float,
        default=0.0,
        help="share of real-task episodes whose query lacks the label (default 0)",
    )
    parser.add_argument(
        "--bce-weight",
        type=float,
        default=0.0,
        help="weight of binary cross-entropy added to the soft Dice loss (default 0)",
    )
    parser.add_argument("--no-in-task-augment", action="store_true", help="switch per-entry augmentation off")
    parser.add_argument("--no-task-augment", action="store_true", help="switch task augmentation off")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation and of every batch")
    parser.add_argument("--val-every", type=int, default=500, help="validate every N steps (default 500)")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="checkpoint every N steps")
    parser.add_argument("--log-every", type=int, default=10, help="log every N steps")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes that build batches ahead (default 0: built in the training process; "
        "on a GPU, use most CPU cores); the run is the same either way",
    )
    parser.set_defaults(handler=run)


def config_from_args(args: argparse.Namespace):
    from napari_openseg.training.incontext.episodes import EpisodeConfig
    from napari_openseg.training.incontext.trainer import TrainConfig

    episodes = EpisodeConfig(
        batch_size=args.batch_size,
        support_min=args.support_min,
        support_max=args.support_max,
        support_sampling=args.support_sampling,
        real_fraction=args.real_fraction,
        empty_fraction=args.empty_fraction,
        in_task_augment=not args.no_in_task_augment,
        task_augment=not args.no_task_augment,
        task_sampling=args.task_sampling,
    )
    # steps=0 on --resume means "as stored in the checkpoint".
    steps = args.steps if args.steps else (0 if args.resume else 20000)
    return TrainConfig(
        steps=steps,
        widths=tuple(args.widths),
        grid=args.grid,
        lr=args.lr,
        warmup=args.warmup,
        decay_start=args.decay_start,
        bce_weight=args.bce_weight,
        seed=args.seed,
        episodes=episodes,
        real_families=tuple(args.real_families),
        task_bank=args.task_bank,
        init_weights=args.init_weights,
        val_every=args.val_every,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
    )


def check_options(args: argparse.Namespace) -> None:
    """Refuse settings that cannot train before anything is written (a refused run leaves no folder)."""
    from pathlib import Path

    from napari_openseg.errors import OpenSegError

    at_least_one = (
        "steps",
        "stop_after",
        "val_every",
        "checkpoint_every",
        "log_every",
        "batch_size",
        "threads",
    )
    for option in at_least_one:
        value = getattr(args, option)
        if value is not None and value < 1:
            raise OpenSegError(f"--{option.replace('_', '-')} must be 1 or more, got {value}")
    if args.workers < 0:
        raise OpenSegError(f"--workers must be 0 or more, got {args.workers}")
    if args.support_min < 1 or args.support_max < args.support_min:
        raise OpenSegError("support sizes need 1 <= --support-min <= --support-max")
    for option in ("real_fraction", "empty_fraction"):
        if not 0.0 <= getattr(args, option) <= 1.0:
            raise OpenSegError(
                f"--{option.replace('_', '-')} is a share of episodes, between 0 and 1; "
                f"got {getattr(args, option)}"
            )
    if not args.lr > 0:
        raise OpenSegError(f"--lr must be above 0, got {args.lr}")
    # widths and grid are checked by the trainer, against --init-weights' network when there is one
    if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
        raise OpenSegError(f"{args.out_dir} is a file; the run folder must be a folder")


def run(args: argparse.Namespace) -> int:
    import torch

    from napari_openseg.cli import Terminated
    from napari_openseg.training.incontext.trainer import iter_train
    from napari_openseg.training.splits import shared_data_dir

    check_options(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    # `kill PID` checkpoints and stops like Ctrl-C does (cli.main turns SIGTERM into an interrupt).
    config = config_from_args(args)
    generator = iter_train(
        config,
        args.out_dir,
        resume=args.resume,
        device=args.device,
        data_dir=shared_data_dir(),
        stop_after=args.stop_after,
        workers=args.workers,
    )
    try:
        for progress in generator:
            _print(progress.payload)
    except KeyboardInterrupt as err:
        print(f"stopped; the checkpoint in {args.out_dir} is saved: continue with --resume", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    print(f"run folder {args.out_dir}: checkpoint.pt, weights.pt, best.pt, log.jsonl")
    return 0


def _print(record: dict) -> None:
    """One line per logged step and per validation."""
    if "images_per_s" in record:
        print(
            f"step {record['step']:>7}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
            f"S {record['support_size']:>2}  {record['images_per_s']:.0f} images/s  "
            f"{record['seconds_per_step']:.2f} s/step",
            flush=True,
        )
    if "val" in record:
        print(f"step {record['step']:>7}  validation Dice {json.dumps(record['val'])}", flush=True)

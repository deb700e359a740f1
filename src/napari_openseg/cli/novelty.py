"""``openseg novelty``: train a MedOpenSeg model, seed its unknown prototype, and map novelty.

* ``openseg novelty train --image VOL [--image VOL ...] --labels LAB [--labels LAB ...] --out MODEL``
* ``openseg novelty seed --model MODEL --image VOL --mask MASK --out MODEL2`` (one-shot unknown seed)
* ``openseg novelty map --model MODEL --image VOL --out NOVELTY [--scores-out DIR]``, or
  ``--support SUPPORT.npz`` instead of ``--model`` for the training-free option.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("novelty", help="novelty maps from a prototype memory bank (MedOpenSeg)")
    commands = parser.add_subparsers(dest="novelty_command", metavar="ACTION")
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)

    train = commands.add_parser("train", help="train a novelty model on labelled volumes (known classes)")
    train.add_argument("--image", action="append", required=True, help="a volume (repeat for several)")
    train.add_argument("--labels", action="append", required=True, help="its labels (same order as --image)")
    train.add_argument("--out", required=True, help="model file to write (.pt)")
    train.add_argument("--epochs", type=int, default=20, help="passes of --samples-per-volume patches (default 20)")
    train.add_argument("--samples-per-volume", type=int, default=4, help="patches per volume per epoch")
    train.add_argument("--batch-size", type=int, default=2, help="patches per step")
    train.add_argument("--learning-rate", type=float, default=3e-4)
    train.add_argument("--roi", type=int, nargs=3, default=[64, 64, 64], metavar=("Z", "Y", "X"),
                       help="patch size, each side divisible by 32, one side >= 64 (default 64 64 64)")
    train.add_argument("--downsample", type=int, default=1, help="shrink volumes by this factor first (default 1)")
    train.add_argument("--feature-size", type=int, default=12, help="SwinUNETR width, a multiple of 12")
    train.add_argument("--embedding-dim", type=int, default=128, help="F, the embedding size")
    train.add_argument("--ignore-label", type=int, action="append", default=[],
                       help="label value to leave out of training (repeatable; not 0, the background)")
    train.add_argument("--flips", action="store_true", help="random flips along every axis")
    train.add_argument("--checkpoint", help="checkpoint file (default: MODEL with .ckpt.pt)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the checkpoint if it exists, with its stored settings (only --epochs "
                            "may change)")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--overwrite", action="store_true",
                       help="replace an existing MODEL; without --resume, also start a new checkpoint")
    train.set_defaults(handler=run_train)

    seed = commands.add_parser("seed", help="seed the unknown prototype from one painted unseen structure")
    seed.add_argument("--model", required=True, help="novelty model file")
    seed.add_argument("--image", required=True, help="volume holding the painted instance")
    seed.add_argument("--mask", required=True, help="mask (non-zero = the unseen structure) of that volume")
    seed.add_argument("--out", required=True, help="model file to write with the seeded unknown prototype")
    seed.add_argument("--device", default="auto")
    seed.add_argument("--overwrite", action="store_true")
    seed.set_defaults(handler=run_seed)

    novelty_map = commands.add_parser("map", help="write the novelty map of a volume")
    novelty_map.add_argument("--image", required=True, help="volume to map")
    novelty_map.add_argument("--out", required=True, help="fused novelty map to write (NIfTI, TIFF or NPY)")
    novelty_map.add_argument("--scores-out", help="folder for the cosine and distance maps, segmentation and novel mask")
    novelty_map.add_argument("--mask", help="foreground mask file (default: the body found by intensity)")
    add_map_options(novelty_map)
    novelty_map.add_argument("--overwrite", action="store_true")
    novelty_map.set_defaults(handler=run_map)


def add_map_options(parser: argparse.ArgumentParser) -> None:
    """The options of a novelty map (``openseg novelty map`` and ``openseg batch novelty``), checked
    together by :func:`check_map_options`."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="novelty model file (from `openseg novelty train`)")
    source.add_argument("--support", help="support-set file: training-free option (in-context network features)")
    parser.add_argument("--no-unknown", action="store_true", help="ignore the model's unknown prototype")
    parser.add_argument("--adapt-unknown", type=int, default=0, metavar="N",
                        help="adapt the unknown prototype on each volume for N steps")
    parser.add_argument("--seed-mask", help="for --support: mask (non-zero = one unseen structure) "
                        "that seeds the unknown prototype")
    parser.add_argument("--seed-image", help="volume the --seed-mask was painted on (default: --image)")
    parser.add_argument("--weights", help="in-context weights for --support (name or file)")
    parser.add_argument("--axis", type=int, default=0, help="slice axis for --support (default 0)")
    parser.add_argument("--support-size", type=int, default=16, help="S for --support")
    parser.add_argument("--device", default="auto")


def check_map_options(args: argparse.Namespace) -> None:
    """Refuse combinations of :func:`add_map_options`' options that contradict each other."""
    from ..errors import OpenSegError

    if args.model and (args.seed_mask or args.seed_image):
        raise OpenSegError("--seed-mask is for --support; seed a trained model with `openseg novelty seed`")
    if args.seed_image and not args.seed_mask:
        raise OpenSegError("--seed-image needs --seed-mask, the unseen structure painted on it")
    if args.adapt_unknown < 0:
        raise OpenSegError(f"--adapt-unknown is a number of steps (0 or more), got {args.adapt_unknown}")
    if args.support and args.no_unknown and args.seed_mask:
        raise OpenSegError("--no-unknown and --seed-mask contradict each other: a training-free map has an "
                           "unknown prototype only when --seed-mask seeds it; leave out one of them")
    if args.support and args.adapt_unknown and not args.seed_mask:
        raise OpenSegError("--adapt-unknown with --support needs --seed-mask (one unseen structure painted)")


def default_checkpoint(out: Path) -> Path:
    name = out.name[:-3] if out.name.endswith(".pt") else out.name
    return out.with_name(f"{name}.ckpt.pt")


def run_train(args: argparse.Namespace) -> int:
    from ..errors import OpenSegError
    from ..io import check_writable, read_image
    from ..training.novelty_train import NoveltyTrainSettings, iter_train_novelty
    from ._progress import with_progress_bar

    out = Path(args.out)
    check_writable(out, args.overwrite, inputs=[*args.image, *args.labels])
    if len(args.image) != len(args.labels):
        raise OpenSegError(f"give one --labels per --image: got {len(args.image)} and {len(args.labels)}")
    checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint(out)
    check_writable(checkpoint, overwrite=True, inputs=[*args.image, *args.labels])
    if checkpoint.exists() and not (args.resume or args.overwrite):
        raise OpenSegError(f"checkpoint {checkpoint} exists: pass --resume to continue it, or --overwrite to "
                           "start again from scratch")
    images = [read_image(p).data for p in args.image]
    labels = [read_image(p).data for p in args.labels]
    settings = NoveltyTrainSettings(
        epochs=args.epochs, samples_per_volume=args.samples_per_volume, batch_size=args.batch_size,
        learning_rate=args.learning_rate, roi_size=tuple(args.roi), downsample=args.downsample,
        feature_size=args.feature_size, embedding_dim=args.embedding_dim,
        ignore_values=tuple(args.ignore_label), flips=args.flips, seed=args.seed,
    )
    result = with_progress_bar(
        iter_train_novelty(images, labels, settings, checkpoint=checkpoint, resume=args.resume, device=args.device),
        "novelty train",
    )
    result.model.save(out, overwrite=args.overwrite)
    print(f"{out}: {result.steps} steps, classes {result.model.class_values}, "
          f"final loss {result.losses[-1]:.4f}; checkpoint {checkpoint}")
    return 0


def run_seed(args: argparse.Namespace) -> int:
    from ..core.novelty_map import unknown_seed_embeddings
    from ..core.novelty_model import NoveltyModel, check_seed
    from ..io import check_writable, read_image

    check_writable(args.out, args.overwrite, inputs=[args.model, args.image, args.mask])
    image = read_image(args.image)
    mask = read_image(args.mask).data != 0
    check_seed(image.data, mask)  # before the model is loaded
    model = NoveltyModel.load(args.model)
    model.bank.seed_unknown(unknown_seed_embeddings(image.data, mask, model, args.device),
                            f"one painted instance in {Path(args.mask).name}")
    model.save(args.out, overwrite=args.overwrite)
    print(f"{args.out}: unknown prototype seeded from {int(mask.sum())} voxels")
    return 0


def score_paths(out: Path, folder: Path) -> dict[str, Path]:
    from ..io import strip_suffix

    suffix = out.name[len(strip_suffix(out)) :]
    stem = strip_suffix(out)
    return {kind: folder / f"{stem}_{kind}{suffix}" for kind in ("cosine", "distance", "segmentation", "novel")}


def run_map(args: argparse.Namespace) -> int:
    import numpy as np

    from ..core.inference import load_support
    from ..core.novelty_free import iter_training_free_novelty
    from ..core.novelty_map import iter_novelty_map
    from ..core.novelty_model import NoveltyModel, check_mask, check_seed
    from ..errors import OpenSegError
    from ..io import check_writable, read_image, write_image
    from ._progress import with_progress_bar

    out = Path(args.out)
    inputs = [p for p in (args.model, args.support, args.image, args.mask, args.seed_mask, args.seed_image) if p]
    check_writable(out, args.overwrite, image=True, inputs=inputs)
    extra = {}
    if args.scores_out:
        folder = Path(args.scores_out)
        if folder.exists() and not folder.is_dir():
            raise OpenSegError(f"--scores-out {folder} is a file; it names the folder for the score maps")
        if not folder.is_dir():
            raise OpenSegError(f"scores folder {folder} does not exist")
        extra = score_paths(out, folder)
        for path in extra.values():
            check_writable(path, args.overwrite, image=True, inputs=inputs)
    check_map_options(args)
    image = read_image(args.image)
    mask = check_mask(read_image(args.mask).data != 0, image.data.shape) if args.mask else None
    seed = None
    if args.seed_mask:  # shapes checked before a model is loaded or a support set encoded
        seed_image = read_image(args.seed_image).data if args.seed_image else image.data
        seed = check_seed(seed_image, read_image(args.seed_mask).data != 0)
    if args.model:
        model = NoveltyModel.load(args.model)
        if args.adapt_unknown and not args.no_unknown and model.bank.unknown is None:
            raise OpenSegError(f"{args.model} has no unknown prototype to adapt; seed one first with "
                               "`openseg novelty seed`, or leave out --adapt-unknown")
        maps = with_progress_bar(
            iter_novelty_map(image.data, model, mask=mask, use_unknown=not args.no_unknown,
                             adapt_unknown=args.adapt_unknown, device=args.device),
            f"novelty {image.name}",
        )
    else:
        maps = with_progress_bar(
            iter_training_free_novelty(image.data, load_support(args.support), args.weights, axis=args.axis,
                                       support_size=args.support_size, mask=mask, unknown_seed=seed,
                                       adapt_unknown=args.adapt_unknown, device=args.device),
            f"novelty {image.name}",
        )
    write_image(out, maps.fused, image, overwrite=args.overwrite)
    if extra:
        write_image(extra["cosine"], maps.cosine, image, overwrite=args.overwrite)
        write_image(extra["distance"], maps.distance, image, overwrite=args.overwrite)
        write_image(extra["segmentation"], maps.segmentation, image, overwrite=args.overwrite)
        write_image(extra["novel"], maps.novel_regions().astype(np.uint8), image, overwrite=args.overwrite)
    novel = int(maps.novel_regions().sum())
    print(f"{out}: fused novelty in [0, 1]; adaptive threshold {maps.threshold:.3f} flags {novel} voxels "
          f"({100 * novel / max(1, int(maps.mask.sum())):.1f}% of the body)")
    return 0

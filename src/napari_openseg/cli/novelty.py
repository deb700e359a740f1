"""``openseg novelty``: train a MedOpenSeg model, seed its unknown prototype, and map novelty.

* ``openseg novelty train --image VOL [--image VOL ...] --labels LAB [--labels LAB ...] --out MODEL``
* ``openseg novelty seed --model MODEL --image VOL --mask MASK --out MODEL2`` (one-shot unknown seed)
* ``openseg novelty map --model MODEL --image VOL [--out NOVELTY] [--scores-out DIR]``, or
  ``--support SUPPORT.npz`` instead of ``--model`` for the training-free option. By default it writes
  ``<image>_novelty`` (the heat map) and ``<image>_novelty_novel_region`` (the thresholded mask,
  :func:`~napari_openseg.core.novelty.region.region_path`) beside the image.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_openseg.cli import AXIS_HELP
from napari_openseg.core.novelty.settings import (  # torch-free
    APPEARANCE_SIDES,
    INTENSITY_MODES,
    NoveltySettings,
)

DEVICE_HELP = "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps"
#: ``--novel-when`` for no intensity (appearance) map: novel means unlike every known class only.
NO_SIDE = "unlike-every-class"
#: The settings that :func:`add_map_options` sets for a trained model's map and a training-free one.
MODEL_MAP_OPTIONS = ("use_unknown", "adapt_unknown", "side", "intensity", "threshold")
SUPPORT_MAP_OPTIONS = ("support_size", "adapt_unknown", "side", "threshold")


def register(subparsers) -> None:
    parser = subparsers.add_parser("novelty", help="novelty maps from a prototype memory bank (MedOpenSeg)")
    commands = parser.add_subparsers(dest="novelty_command", metavar="ACTION")
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)

    train = commands.add_parser("train", help="train a novelty model on labelled volumes (known classes)")
    train.add_argument("--image", action="append", required=True, help="a volume (repeat for several)")
    train.add_argument("--labels", action="append", required=True, help="its labels (same order as --image)")
    train.add_argument("--out", required=True, help="model file to write (.pt)")
    # Defaults live in NoveltyTrainSettings; an option left out keeps the settings' value.
    train.add_argument("--epochs", type=int, help="passes of --samples-per-volume patches (default 20)")
    train.add_argument(
        "--max-steps",
        type=int,
        help="stop after this many steps (default 300, about 10 minutes on a 2-core CPU; 0: no limit)",
    )
    train.add_argument("--samples-per-volume", type=int, help="patches per volume per epoch (default 4)")
    train.add_argument("--batch-size", type=int, help="patches per step (default 2)")
    train.add_argument("--learning-rate", type=float, help="AdamW learning rate (default 1e-3)")
    train.add_argument(
        "--backbone",
        choices=["unet", "swinunetr"],
        help="unet: a small residual U-Net that trains on a CPU (default); swinunetr: the paper's",
    )
    train.add_argument(
        "--roi",
        type=int,
        nargs=3,
        metavar=("Z", "Y", "X"),
        help="patch size, sides divisible by 8 (unet) or 32 (swinunetr) (default 16 64 64)",
    )
    train.add_argument("--downsample", type=int, help="shrink volumes by this factor first (default 2)")
    train.add_argument(
        "--feature-size", type=int, help="network width (default 8; a multiple of 12 for swinunetr)"
    )
    train.add_argument("--embedding-dim", type=int, help="F, the embedding size (default 32)")
    train.add_argument(
        "--ignore-label",
        type=int,
        action="append",
        default=[],
        help="label value to leave out of training (repeatable; not 0, the background)",
    )
    train.add_argument("--flips", action="store_true", help="random flips along every axis")
    train.add_argument("--checkpoint", help="checkpoint file (default: MODEL with .ckpt.pt)")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint if it exists, with its stored settings (only --epochs may change)",
    )
    train.add_argument("--device", default="auto", help=DEVICE_HELP)
    train.add_argument("--seed", type=int, default=0, help="seed of the patch sampling and initial weights")
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing MODEL; without --resume, also start a new checkpoint",
    )
    train.set_defaults(handler=run_train)

    seed = commands.add_parser("seed", help="seed the unknown prototype from one painted unseen structure")
    seed.add_argument("--model", required=True, help="novelty model file")
    seed.add_argument("--image", required=True, help="volume holding the painted instance")
    seed.add_argument("--mask", required=True, help="mask (non-zero = the unseen structure) of that volume")
    seed.add_argument("--out", required=True, help="model file to write with the seeded unknown prototype")
    seed.add_argument("--device", default="auto", help=DEVICE_HELP)
    seed.add_argument("--overwrite", action="store_true", help="replace an existing output model")
    seed.set_defaults(handler=run_seed)

    novelty_map = commands.add_parser("map", help="write the novelty map of a volume")
    novelty_map.add_argument("--image", required=True, help="volume to map")
    novelty_map.add_argument(
        "--out",
        help="novelty heat map to write (NIfTI, TIFF or NPY; default "
        "<image>_novelty beside the image); the novel region goes beside it as <out>_novel_region",
    )
    novelty_map.add_argument(
        "--scores-out",
        help="folder for the three score maps (cosine, distance, appearance) "
        "and the known classes (made if missing)",
    )
    novelty_map.add_argument("--mask", help="foreground mask file (default: the body found by intensity)")
    add_map_options(novelty_map)
    novelty_map.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    novelty_map.set_defaults(handler=run_map)


def add_map_options(parser: argparse.ArgumentParser) -> None:
    """The options of a novelty map (``openseg novelty map`` and ``openseg batch novelty``), checked
    together by :func:`check_map_options`; the defaults are
    :class:`~napari_openseg.core.novelty.settings.NoveltySettings`'s."""
    defaults = NoveltySettings()
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="novelty model file (from `openseg novelty train`)")
    source.add_argument(
        "--support", help="support-set file: training-free option (in-context network features)"
    )
    parser.add_argument(
        "--novel-when",
        choices=[*APPEARANCE_SIDES, NO_SIDE],
        default=defaults.side or NO_SIDE,
        help="which intensity departures from its own known class make a voxel novel (brighter: "
        "as FLAIR and T2 lesions are; unlike-every-class: no intensity map; default %(default)s)",
    )
    parser.add_argument(
        "--intensity",
        choices=INTENSITY_MODES,
        default=defaults.intensity,
        help="a trained model meeting a volume whose intensities differ from its training "
        "volumes: auto matches them when they are close enough and refuses otherwise, "
        "match always matches, as-is uses them untouched (default %(default)s)",
    )
    parser.add_argument("--no-unknown", action="store_true", help="ignore the model's unknown prototype")
    parser.add_argument(
        "--threshold",
        type=float,
        default=defaults.threshold,
        metavar="T",
        help="the novel region: novelty above T, between 0 and 1 (the map runs from the body's 1st to "
        "its 99th percentile; default %(default)s)",
    )
    parser.add_argument(
        "--adapt-unknown",
        type=int,
        default=defaults.adapt_unknown,
        metavar="N",
        help="adapt the unknown prototype on each volume for N steps",
    )
    parser.add_argument(
        "--seed-mask",
        help="for --support: mask (non-zero = one unseen structure) that seeds the unknown prototype",
    )
    parser.add_argument("--seed-image", help="volume the --seed-mask was painted on (default: --image)")
    parser.add_argument("--weights", help="in-context weights for --support (name or file)")
    parser.add_argument("--axis", type=int, default=0, help=f"for --support: {AXIS_HELP}")
    parser.add_argument("--support-size", type=int, default=defaults.support_size, help="S for --support")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)


def check_map_options(args: argparse.Namespace) -> None:
    """Refuse combinations of :func:`add_map_options`' options that contradict each other."""
    from napari_openseg.errors import OpenSegError

    if args.model and (args.seed_mask or args.seed_image):
        raise OpenSegError("--seed-mask is for --support; seed a trained model with `openseg novelty seed`")
    if args.seed_image and not args.seed_mask:
        raise OpenSegError("--seed-image needs --seed-mask, the unseen structure painted on it")
    map_settings(args)  # each value checked on its own
    if args.support and args.no_unknown and args.seed_mask:
        raise OpenSegError(
            "--no-unknown and --seed-mask contradict each other: a training-free map has an "
            "unknown prototype only when --seed-mask seeds it; leave out one of them"
        )
    if args.support and args.adapt_unknown and not args.seed_mask:
        raise OpenSegError("--adapt-unknown with --support needs --seed-mask (one unseen structure painted)")


def default_checkpoint(out: Path) -> Path:
    name = out.name[:-3] if out.name.endswith(".pt") else out.name
    return out.with_name(f"{name}.ckpt.pt")


TRAIN_OPTIONS = {
    "epochs": "epochs",
    "max_steps": "max_steps",
    "samples_per_volume": "samples_per_volume",
    "batch_size": "batch_size",
    "learning_rate": "learning_rate",
    "backbone": "backbone",
    "roi": "roi_size",
    "downsample": "downsample",
    "feature_size": "feature_size",
    "embedding_dim": "embedding_dim",
}


def run_train(args: argparse.Namespace) -> int:
    from napari_openseg.cli._progress import with_progress_bar
    from napari_openseg.errors import OpenSegError
    from napari_openseg.io import check_writable, read_image
    from napari_openseg.training.novelty.train import NoveltyTrainSettings, iter_train_novelty

    out = Path(args.out)
    check_writable(out, args.overwrite, inputs=[*args.image, *args.labels])
    if len(args.image) != len(args.labels):
        raise OpenSegError(f"give one --labels per --image: got {len(args.image)} and {len(args.labels)}")
    checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint(out)
    check_writable(checkpoint, overwrite=True, inputs=[*args.image, *args.labels])
    if checkpoint.exists() and not (args.resume or args.overwrite):
        raise OpenSegError(
            f"checkpoint {checkpoint} exists: pass --resume to continue it, or --overwrite to "
            "start again from scratch"
        )
    images = [read_image(p).data for p in args.image]
    labels = [read_image(p).data for p in args.labels]
    given = {
        field: getattr(args, option)
        for option, field in TRAIN_OPTIONS.items()
        if getattr(args, option) is not None
    }
    if given.get("max_steps") == 0:
        given["max_steps"] = None
    settings = NoveltyTrainSettings(
        ignore_values=tuple(args.ignore_label), flips=args.flips, seed=args.seed, **given
    )
    result = with_progress_bar(
        iter_train_novelty(
            images, labels, settings, checkpoint=checkpoint, resume=args.resume, device=args.device
        ),
        "novelty train",
    )
    result.model.save(out, overwrite=args.overwrite)
    print(
        f"{out}: {result.steps} steps, classes {result.model.class_values}, "
        f"final loss {result.losses[-1]:.4f}; checkpoint {checkpoint}"
    )
    return 0


def run_seed(args: argparse.Namespace) -> int:
    from napari_openseg.core.novelty.model import NoveltyModel, check_seed
    from napari_openseg.core.novelty.volume_map import unknown_seed_embeddings
    from napari_openseg.io import check_writable, read_image

    check_writable(args.out, args.overwrite, inputs=[args.model, args.image, args.mask])
    image = read_image(args.image)
    mask = read_image(args.mask).data != 0
    check_seed(image.data, mask)  # before the model is loaded
    model = NoveltyModel.load(args.model)
    model.bank.seed_unknown(
        unknown_seed_embeddings(image.data, mask, model, args.device),
        f"one painted instance in {Path(args.mask).name}",
    )
    model.save(args.out, overwrite=args.overwrite)
    print(f"{args.out}: unknown prototype seeded from {int(mask.sum())} voxels")
    return 0


SCORE_FILES = ("cosine", "distance", "appearance", "segmentation")


def score_paths(out: Path, folder: Path) -> dict[str, Path]:
    from napari_openseg.io import strip_suffix

    suffix = out.name[len(strip_suffix(out)) :]
    stem = strip_suffix(out)
    return {kind: folder / f"{stem}_{kind}{suffix}" for kind in SCORE_FILES}


def default_out(image: Path) -> Path:
    """``<image>_novelty`` beside the image, in its format."""
    from napari_openseg.io import strip_suffix

    return image.with_name(f"{strip_suffix(image)}_novelty{image.name[len(strip_suffix(image)) :]}")


def novel_side(args: argparse.Namespace) -> str | None:
    """``--novel-when`` as the maps' ``side`` (``None``: no intensity map)."""
    return None if args.novel_when == NO_SIDE else args.novel_when


def map_settings(args: argparse.Namespace) -> NoveltySettings:
    """The :class:`~napari_openseg.core.novelty.settings.NoveltySettings` of :func:`add_map_options`'
    options."""
    return NoveltySettings(
        side=novel_side(args),
        intensity=args.intensity,
        use_unknown=not args.no_unknown,
        adapt_unknown=args.adapt_unknown,
        support_size=args.support_size,
        threshold=args.threshold,
    )


def map_options(args: argparse.Namespace) -> dict:
    """The keywords of the map (``--model``: a trained model's, ``--support``: a training-free one's)
    that :func:`add_map_options` sets, with the device."""
    settings = map_settings(args)
    names = MODEL_MAP_OPTIONS if args.model else SUPPORT_MAP_OPTIONS
    return {**{name: getattr(settings, name) for name in names}, "device": args.device}


def run_map(args: argparse.Namespace) -> int:
    from napari_openseg.cli._files import output_folder
    from napari_openseg.core.novelty.region import region_path
    from napari_openseg.io import check_writable

    out = Path(args.out) if args.out else default_out(Path(args.image))
    inputs = [
        p for p in (args.model, args.support, args.image, args.mask, args.seed_mask, args.seed_image) if p
    ]
    check_writable(out, args.overwrite, image=True, inputs=inputs)
    check_writable(region_path(out), args.overwrite, image=True, inputs=inputs)
    check_map_options(args)
    if not args.scores_out:
        return _map(args, out, {})
    with output_folder(args.scores_out, "--scores-out") as folder:
        extra = score_paths(out, folder)
        for path in extra.values():
            check_writable(path, args.overwrite, image=True, inputs=inputs)
        return _map(args, out, extra)


def _map(args: argparse.Namespace, out: Path, extra: dict[str, Path]) -> int:
    from napari_openseg.cli._progress import with_progress_bar
    from napari_openseg.core.novelty.free import iter_training_free_novelty
    from napari_openseg.core.novelty.model import NoveltyModel, check_mask, check_seed
    from napari_openseg.core.novelty.region import region_path, region_volume
    from napari_openseg.core.novelty.volume_map import iter_novelty_map
    from napari_openseg.core.support import load_support
    from napari_openseg.errors import OpenSegError
    from napari_openseg.io import read_image, write_image

    settings = map_settings(args)
    image = read_image(args.image)
    mask = check_mask(read_image(args.mask).data != 0, image.data.shape) if args.mask else None
    seed = None
    if args.seed_mask:  # shapes checked before a model is loaded or a support set encoded
        seed_image = read_image(args.seed_image).data if args.seed_image else image.data
        seed = check_seed(seed_image, read_image(args.seed_mask).data != 0)
    if args.model:
        model = NoveltyModel.load(args.model)
        if args.adapt_unknown and not args.no_unknown and model.bank.unknown is None:
            raise OpenSegError(
                f"{args.model} has no unknown prototype to adapt; seed one first with "
                "`openseg novelty seed`, or leave out --adapt-unknown"
            )
        maps = with_progress_bar(
            iter_novelty_map(image.data, model, settings=settings, mask=mask, device=args.device),
            f"novelty {image.name}",
        )
    else:
        maps = with_progress_bar(
            iter_training_free_novelty(
                image.data,
                load_support(args.support),
                args.weights,
                settings=settings,
                axis=args.axis,
                mask=mask,
                unknown_seed=seed,
                device=args.device,
            ),
            f"novelty {image.name}",
        )
    write_image(out, maps.fused, image, overwrite=args.overwrite)
    region = region_volume(maps)
    write_image(region_path(out), region, image, overwrite=args.overwrite)
    for kind, path in extra.items():
        values = getattr(maps, kind)
        if values is not None:  # no appearance map with --novel-when unlike-every-class
            write_image(path, values, image, overwrite=args.overwrite)
    for note in maps.notes:
        print(f"note: {note}")
    novel = int(region.sum())  # uint8 sums to a uint64
    print(
        f"{out}: novelty in [0, 1]; the threshold {maps.threshold:.3f} flags {novel} voxels "
        f"({100 * novel / max(1, int(maps.mask.sum())):.1f}% of the body), written to {region_path(out)}"
    )
    return 0

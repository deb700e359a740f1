"""Novelty-map benchmark: AUROC of unseen vs known structures, known-class Dice, time and memory.

Protocol: ``benchmarks/novelty_protocol.py`` (train on the left hemisphere's known structures of the
VoxelMorph brain, evaluate on the right hemisphere; deep grey nuclei are unseen). Stages:

* ``train``: trains the MedOpenSeg model (resumable; checkpoint in ``--out-dir``);
* ``evaluate``: AUROC of cosine / distance-sum / fused scores without and with the unknown prototype
  (one-shot seed, seed + adaptation, seed-free) and the segmentation head's Dice on known classes;
* ``free``: the same AUROCs for the training-free option (in-context network features, ``--weights``);
* ``timing``: time and peak memory (RSS) of a map of the whole 160x192x224 volume on the CPU, each
  configuration in a fresh subprocess.

Run everything: ``nice -n 10 python benchmarks/bench_novelty.py all``; tables go to stdout (markdown).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_novelty_lgg  # noqa: E402
import novelty_organs  # noqa: E402
import novelty_protocol as protocol  # noqa: E402
from napari_openseg.training.splits import shared_data_dir  # noqa: E402

log = logging.getLogger("bench_novelty")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "runs" / "bench_novelty"


def train(args) -> None:
    from napari_openseg.cli._progress import with_progress_bar
    from napari_openseg.training.novelty.train import NoveltyTrainSettings, iter_train_novelty

    case = protocol.load_case(args.data)
    settings = NoveltyTrainSettings(
        epochs=args.epochs,
        samples_per_volume=args.samples_per_volume,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        downsample=args.downsample,
        ignore_values=(protocol.IGNORED,),
        roi_size=tuple(args.roi),
        seed=0,
        flips=args.flips,
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    result = with_progress_bar(
        iter_train_novelty(
            [protocol.train_half(case["image"].data)],
            [protocol.train_half(case["train_labels"])],
            settings,
            checkpoint=args.out_dir / "checkpoint.pt",
            resume=True,
            device="cpu",
        ),
        "train",
    )
    result.model.save(args.out_dir / "model.pt")
    elapsed = time.perf_counter() - began
    (args.out_dir / "train_log.json").write_text(
        json.dumps(
            {
                "steps": result.steps,
                "losses": result.losses,
                "seconds_this_run": elapsed,
                "threads": torch.get_num_threads(),
            },
            indent=1,
        )
    )
    print(f"trained {result.steps} steps; this run {elapsed:.0f} s; final loss {result.losses[-1]:.3f}")


def _model_path(args) -> Path:
    for name in ("model.pt", "checkpoint.pt"):
        if (args.out_dir / name).is_file():
            return args.out_dir / name
    raise SystemExit(f"no trained model in {args.out_dir}: run the train stage first")


def _auroc_rows(
    label: str, raw: np.ndarray, mask: np.ndarray, k: int, use_unknown: bool, truth: dict
) -> dict:
    from napari_openseg.core.novelty.scores import auroc, maps_from_raw

    maps = maps_from_raw(raw, mask, k, use_unknown)
    row = {"variant": label}
    for name in ("cosine", "distance", "fused"):
        row[name] = auroc(getattr(maps, name), truth["unseen"], truth["known"])
    flagged = maps.novel_regions()
    row["flagged_unseen"] = float(flagged[truth["unseen"]].mean())
    row["flagged_known"] = float(flagged[truth["known"]].mean())
    return row


def _truth(case: dict) -> dict:
    known = protocol.test_half(case["known"])
    return {"unseen": protocol.test_half(case["unseen"]), "known": known > 0, "labels": known}


def evaluate(args) -> None:
    from napari_openseg.core.metrics import dice_per_label
    from napari_openseg.core.novelty.model import NoveltyModel
    from napari_openseg.core.novelty.volume_map import novelty_map, unknown_seed_embeddings

    case = protocol.load_case(args.data)
    truth = _truth(case)
    model = NoveltyModel.load(_model_path(args))
    test = protocol.test_half(case["image"].data)
    seed_emb = unknown_seed_embeddings(
        protocol.train_half(case["image"].data), protocol.train_half(case["seed"]), model, device="cpu"
    )
    seeded = NoveltyModel(model.network, model.bank.copy(), model.class_values, model.downsample)
    seeded.bank.seed_unknown(seed_emb, "left putamen (training half)")
    k = model.config.num_classes
    began = time.perf_counter()
    base = novelty_map(test, seeded, device="cpu", keep_raw=True)
    seconds = time.perf_counter() - began
    rows = [
        _auroc_rows("no unknown prototype", base.raw, base.mask, k, False, truth),
        _auroc_rows("unknown: one-shot seed", base.raw, base.mask, k, True, truth),
    ]
    adapted = novelty_map(test, seeded, device="cpu", adapt_unknown=args.adapt_steps, keep_raw=True)
    rows.append(
        _auroc_rows(
            f"unknown: seed + {args.adapt_steps} adaptation steps", adapted.raw, adapted.mask, k, True, truth
        )
    )
    free = novelty_map(
        test, model, device="cpu", seed_free=True, adapt_unknown=args.adapt_steps, keep_raw=True
    )
    rows.append(
        _auroc_rows("unknown: seed-free (outliers + adaptation)", free.raw, free.mask, k, True, truth)
    )
    dice = dice_per_label(base.segmentation, truth["labels"], sorted(protocol.KNOWN))
    info = model.info
    print(
        f"\n### Trained MedOpenSeg ({info.get('trained_steps')} steps, downsample {model.downsample}, "
        f"roi {list(model.config.roi_size)}); test-half map {seconds:.1f} s\n"
    )
    _print_auroc(rows)
    print("\nKnown-class Dice of the segmentation head (right hemisphere):\n")
    print("| class | Dice |\n|---|---|")
    for value, (name, _) in protocol.KNOWN.items():
        print(f"| {name} | {dice[value]:.3f} |")
    print(f"| **mean** | **{np.mean(list(dice.values())):.3f}** |")
    _save(args, "evaluate", {"rows": rows, "dice": dice, "steps": info.get("trained_steps")})


def _print_auroc(rows: list[dict]) -> None:
    print("| variant | AUROC cosine | AUROC distance sum | AUROC fused | flagged unseen | flagged known |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['cosine']:.3f} | {r['distance']:.3f} | {r['fused']:.3f} | "
            f"{r['flagged_unseen']:.1%} | {r['flagged_known']:.1%} |"
        )


def _save(args, stage: str, result: dict) -> None:
    path = args.out_dir / "results.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[stage] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=float))


def free(args) -> None:
    from napari_openseg.core.metrics import dice_per_label
    from napari_openseg.core.novelty.free import (
        training_free_novelty,
    )
    from napari_openseg.core.support import build_support_set
    from napari_openseg.model.registry import resolve_weights_path

    case = protocol.load_case(args.data)
    truth = _truth(case)
    weights = resolve_weights_path(args.weights)
    train_image = protocol.train_half(case["image"].data)
    support = build_support_set(train_image, protocol.train_half(case["known"]), axis=args.axis)
    test = protocol.test_half(case["image"].data)
    began = time.perf_counter()
    maps = training_free_novelty(
        test,
        support,
        str(weights),
        axis=args.axis,
        device="cpu",
        keep_raw=True,
        unknown_seed=(train_image, protocol.train_half(case["seed"])),
    )
    seconds = time.perf_counter() - began
    raw, k = maps.raw, len(protocol.KNOWN) + 1
    rows = [
        _auroc_rows("no unknown prototype", raw, maps.mask, k, False, truth),
        _auroc_rows("unknown: one-shot seed", raw, maps.mask, k, True, truth),
    ]
    if args.adapt_steps:
        adapted = training_free_novelty(
            test,
            support,
            str(weights),
            axis=args.axis,
            device="cpu",
            keep_raw=True,
            unknown_seed=(train_image, protocol.train_half(case["seed"])),
            adapt_unknown=args.adapt_steps,
        )
        rows.append(
            _auroc_rows(
                f"unknown: seed + {args.adapt_steps} adaptation steps",
                adapted.raw,
                adapted.mask,
                k,
                True,
                truth,
            )
        )
    dice = dice_per_label(maps.segmentation, truth["labels"], sorted(protocol.KNOWN))
    print(
        f"\n### Training-free (in-context features, weights {weights.name}, axis {args.axis}, "
        f"{len(support)} support entries); map {seconds:.1f} s\n"
    )
    _print_auroc(rows)
    print(f"\nNearest-prototype segmentation, mean known-class Dice {np.mean(list(dice.values())):.3f}")
    _save(args, "free", {"rows": rows, "dice": dice, "weights": str(weights)})


TIMING_CASES = {
    "default CPU network (U-Net width 8, downsample 2)": "default",
    "training-free (in-context features)": "free",
    "default CPU network, synthetic 256^3 volume": "default-big",
}
#: The SwinUNETR rows need the model of the ``train`` stage (``--swin`` adds them).
SWIN_TIMING_CASES = {
    "SwinUNETR trained, downsample 2": "trained",
    "same network, downsample 1 (64^3 windows)": "native",
    "SwinUNETR trained, downsample 2, synthetic 256^3 volume": "big",
}


def timing(args) -> None:
    on_cuda = args.device.startswith("cuda")  # the only device whose peak memory torch reports here
    where = f"{args.device}, peak GPU memory allocated" if on_cuda else args.device.upper()
    print(
        f"\n### Time and peak memory of one map of the whole 160x192x224 volume ({where}, "
        f"{args.threads} threads, fresh process each)\n"
    )
    gpu = " peak GPU (GiB) |" if on_cuda else ""
    print(
        f"| configuration | windows or slices | seconds | CPU seconds | peak RSS (GiB) | RSS before the map (GiB) |"
        f"{gpu}"
    )
    print("|---|---|---|---|---|---|" + ("---|" if gpu else ""))
    results = {}
    cases = {**TIMING_CASES, **(SWIN_TIMING_CASES if args.swin else {})}
    for label, kind in cases.items():
        command = [
            sys.executable,
            __file__,
            "_time_one",
            "--kind",
            kind,
            "--out-dir",
            str(args.out_dir),
            "--threads",
            str(args.threads),
            "--device",
            args.device,
        ] + (["--weights", args.weights] if args.weights else [])
        if args.support_size is not None:
            command += ["--support-size", str(args.support_size)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"| {label} | failed: {done.stderr.strip().splitlines()[-1:]} | | | | |")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        results[label] = r
        cell = f" {r['gpu_peak_gib']:.2f} |" if gpu else ""
        print(
            f"| {label} | {r['units']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['peak_gib']:.2f} | "
            f"{r['before_gib']:.2f} |{cell}"
        )
    _save(args, "timing", results)


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _time_one(args) -> None:
    import torch

    from napari_openseg.core.novelty.free import iter_training_free_novelty
    from napari_openseg.core.novelty.model import NoveltyModel
    from napari_openseg.core.novelty.volume_map import iter_novelty_map
    from napari_openseg.core.progress import Progress
    from napari_openseg.core.support import build_support_set
    from napari_openseg.model.medopenseg import MedOpenSeg, MedOpenSegConfig

    case = protocol.load_case(args.data)
    image = case["image"].data
    if args.kind in ("big", "default-big"):
        image = np.zeros((256, 256, 256), np.uint8)
        image[16:240, 32:224, 48:208] = case["image"].data  # the brain inside a 256^3 field of view
    if args.kind == "free":
        support = build_support_set(protocol.train_half(image), protocol.train_half(case["known"]), axis=0)
        gen = iter_training_free_novelty(
            image, support, args.weights, axis=0, device=args.device, **bench_novelty_lgg.free_options(args)
        )
    elif args.kind.startswith("default"):
        gen = iter_novelty_map(image, _default_model(len(protocol.KNOWN) + 1), device=args.device)
    else:
        model = NoveltyModel.load(_model_path(args))
        if args.kind == "native":  # timing only: the trained weights at full resolution, 64^3 windows
            config = MedOpenSegConfig(**{**model.config.to_dict(), "roi_size": [64, 64, 64]})
            net = MedOpenSeg(config)
            net.load_state_dict(model.network.state_dict())
            model = NoveltyModel(net.eval(), model.bank, model.class_values, 1)
        gen = iter_novelty_map(image, model, device=args.device)
    before = _rss_gib()
    began, cpu = time.perf_counter(), time.process_time()
    units = 0
    try:
        while True:
            step: Progress = next(gen)
            units = step.total
    except StopIteration:
        pass
    on_cuda = args.device.startswith("cuda")
    if on_cuda:
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
    gpu_peak = torch.cuda.max_memory_allocated() / 1024**3 if on_cuda else 0.0
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu_seconds": cpu,
                "peak_gib": _rss_gib(),
                "before_gib": before,
                "units": units,
                "gpu_peak_gib": gpu_peak,
            }
        )
    )


def _default_model(num_classes: int):
    """The architecture ``openseg novelty train`` makes by default, untrained (timing only), with
    random unit prototypes."""
    from napari_openseg.core.novelty.model import NoveltyModel
    from napari_openseg.core.novelty.prototypes import PrototypeBank
    from napari_openseg.model.medopenseg import MedOpenSeg, MedOpenSegConfig
    from napari_openseg.training.novelty.train import NoveltyTrainSettings

    settings = NoveltyTrainSettings()
    torch.manual_seed(0)
    config = MedOpenSegConfig(
        num_classes=num_classes,
        feature_size=settings.feature_size,
        embedding_dim=settings.embedding_dim,
        roi_size=settings.roi_size,
        backbone=settings.backbone,
    )
    values = list(range(num_classes))
    bank = PrototypeBank(values, settings.embedding_dim)
    bank.set_from_means(torch.randn(num_classes, settings.embedding_dim), torch.arange(num_classes))
    return NoveltyModel(MedOpenSeg(config).eval(), bank, values, settings.downsample)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "stage",
        choices=[
            "train",
            "evaluate",
            "free",
            "timing",
            "all",
            "_time_one",
            "organs",
            *bench_novelty_lgg.STAGES,
        ],
    )
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument(
        "--adapt-steps", type=int, default=5, help="adaptation steps of the unknown prototype"
    )
    parser.add_argument(
        "--axis", type=int, default=2, help="slice axis of the training-free option (2: sagittal)"
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        help=f"default {DEFAULT_OUT} (LGG stages: "
        f"{bench_novelty_lgg.out_dir_default(DEFAULT_OUT.parents[1])})",
    )
    parser.add_argument("--epochs", type=int, default=300, help="2 steps each (default: the 600 measured)")
    parser.add_argument("--samples-per-volume", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--roi", type=int, nargs=3, default=[64, 64, 32], help="training patch (z y x)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--downsample", type=int, default=2)
    parser.add_argument("--flips", action="store_true", help="train with random flips along every axis")
    parser.add_argument(
        "--weights", help="in-context weights for the training-free option (default: openseg-default)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="device of the timing stage's maps (cpu, cuda, ...)")
    parser.add_argument(
        "--swin", action="store_true", help="timing: also the SwinUNETR model of the train stage"
    )
    bench_novelty_lgg.add_arguments(parser)
    args = parser.parse_args()
    lgg_stage = args.stage in bench_novelty_lgg.STAGES
    if args.out_dir is None:
        args.out_dir = bench_novelty_lgg.out_dir_default(DEFAULT_OUT.parents[1]) if lgg_stage else DEFAULT_OUT
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    data = shared_data_dir()
    if data is None:
        print("../shared/data is absent: nothing to benchmark")
        return 1
    args.data = data
    if lgg_stage:
        bench_novelty_lgg.STAGES[args.stage](args)
        return 0
    if args.stage == "organs":
        novelty_organs.run(args)
        return 0
    stages = ["train", "evaluate", "free", "timing"] if args.stage == "all" else [args.stage]
    for stage in stages:
        globals()[stage](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

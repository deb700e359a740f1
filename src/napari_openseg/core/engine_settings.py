"""The segmentation engine's defaults and choices, in one torch-free place.

The command line builds its parser from these without importing torch (``openseg --help`` stays
quick); :mod:`.network`, :mod:`.stacking` and :mod:`.engine` read them from here.
"""

from __future__ import annotations

#: S: support entries per network prediction.
DEFAULT_SUPPORT_SIZE = 16
#: How a task is segmented: the in-context network, the pixel classifier, or both stacked.
METHODS: tuple[str, ...] = ("network", "pixel-classifier", "stacked")
#: ``"auto"``: per task, the method with the best cross-validated Dice on the support set.
CHOICES: tuple[str, ...] = ("auto", *METHODS)
DEFAULT_METHOD = "auto"

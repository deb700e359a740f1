"""Does a volume look like the volumes a model was trained on? Intensity signatures and matching.

A trained novelty model has only seen the intensities of its training volumes. Its
*intensity signature* is the list of :data:`QUANTILES` of their normalised intensities
(:func:`~napari_openseg.core.preprocess.normalize_intensity`) inside the body. A new volume's
signature is compared with it by the mean absolute difference of the quantiles (the Wasserstein-1
distance of the two distributions on [0, 1]); then, with ``intensity="auto"``:

* distance <= :data:`SAME_BELOW`: the volume is used as it is (the 50 LGG FLAIR volumes lie within
  0.064 of each other);
* distance <= :data:`REFUSE_ABOVE`: the volume's intensities are mapped onto the training
  distribution, quantile by quantile (a monotone, piecewise-linear map: dark stays dark), and the
  result says so. A T1 brain meets a FLAIR model this way (distances 0.05-0.22 measured);
* above: refused with an :class:`~napari_openseg.errors.OpenSegError` that says why and what to do
  (CT against the FLAIR volumes: 0.24-0.28; the MNI152 template against them: 0.34-0.38).

The check reads the histogram only: it cannot tell T1 from FLAIR when their histograms agree, and
matching cannot undo a contrast that is inverted (CSF bright in T2, dark in T1). ``intensity="match"``
always matches, ``"as-is"`` never touches or refuses.
"""

from __future__ import annotations

import numpy as np

from napari_openseg.core.engine_settings import check_choice
from napari_openseg.core.novelty.settings import DEFAULT_INTENSITY, INTENSITY_MODES
from napari_openseg.errors import OpenSegError

#: Quantile levels of a signature.
QUANTILES = np.linspace(0.0, 1.0, 21)
SAME_BELOW = 0.07
REFUSE_ABOVE = 0.25
#: Voxels read for a signature (a strided sample of larger bodies).
SIGNATURE_SAMPLE = 2_000_000


def intensity_signature(normalized: np.ndarray, mask: np.ndarray) -> list[float]:
    """Quantiles (:data:`QUANTILES`) of ``normalized`` intensities inside ``mask``."""
    values = np.asarray(normalized, np.float32)[np.asarray(mask, bool)]
    if values.size == 0:
        raise OpenSegError("the body mask is empty: there are no intensities to compare")
    if values.size > SIGNATURE_SAMPLE:
        values = values[:: values.size // SIGNATURE_SAMPLE]
    return [float(v) for v in np.quantile(values, QUANTILES)]


def merge_signatures(signatures: list[list[float]]) -> list[float]:
    """One signature for several training volumes: the mean quantile function."""
    return [float(v) for v in np.mean(np.asarray(signatures, np.float64), axis=0)]


def signature_distance(a, b) -> float:
    """Mean absolute difference of two signatures (Wasserstein-1 on [0, 1])."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.shape != QUANTILES.shape:
        raise OpenSegError(
            f"intensity signatures need {QUANTILES.size} quantiles, got {a.shape} and {b.shape}"
        )
    return float(np.abs(a - b).mean())


def match_to(normalized: np.ndarray, own: list[float], reference: list[float]) -> np.ndarray:
    """Map intensities so that the quantiles ``own`` land on ``reference`` (piecewise linear, monotone)."""
    own_q = np.maximum.accumulate(np.asarray(own, np.float64))
    ref_q = np.maximum.accumulate(np.asarray(reference, np.float64))
    # equal quantiles (a flat stretch of the histogram) get distinct positions so that np.interp works
    own_q = own_q + np.arange(own_q.size) * 1e-7
    return np.interp(normalized, own_q, ref_q).astype(np.float32)


def check_intensities(
    normalized: np.ndarray,
    mask: np.ndarray,
    reference: list[float] | None,
    mode: str = DEFAULT_INTENSITY,
    what: str = "the model's training volumes",
) -> tuple[np.ndarray, list[str]]:
    """Apply the policy of the module docstring: returns the intensities to use and notes for the user."""
    check_choice("intensity handling", mode, INTENSITY_MODES)
    if reference is None or mode == "as-is":
        return normalized, []
    own = intensity_signature(normalized, mask)
    distance = signature_distance(own, reference)
    if mode == "auto" and distance <= SAME_BELOW:
        return normalized, []
    if mode == "auto" and distance > REFUSE_ABOVE:
        raise OpenSegError(
            f"this volume's intensities differ too much from {what} (distance {distance:.2f}, more than "
            f"{REFUSE_ABOVE}): it is probably another modality or a very different scan. Train a model on "
            "volumes like this one, or map it anyway with intensity 'match' (or --intensity match)."
        )
    note = (
        f"intensities matched to {what} (distance {distance:.2f}; above {SAME_BELOW} a volume is "
        "matched before it is mapped)"
    )
    return match_to(normalized, own, reference), [note]

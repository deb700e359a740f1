"""What a propagation run returns: the labels, each object's per-slice confidence, and the help a
correction loop needs (the weakest slice, the slices a user changed, the next run's prompt)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from napari_openseg.core.support import check_labels
from napari_openseg.errors import OpenSegError


@dataclass
class PropagationResult:
    """Labels with the image's shape and the per-slice confidence ``"C N"`` of each object.

    ``confidence[c, s]`` is NaN where object ``label_values[c]`` was not predicted on slice ``s``
    (a prompt slice, or beyond where its front stopped).
    """

    labels: np.ndarray
    label_values: list[int]
    confidence: np.ndarray
    axis: int
    prompt_slices: dict[int, list[int]]
    complete_slices: list[int] = field(default_factory=list)
    #: Per label, the slices where a front stopped because its confidence fell below the stop
    #: threshold while the object was still drawn; a large structure may go on past them.
    confidence_stops: dict[int, list[int]] = field(default_factory=dict)
    #: The same for labels whose pixel classifier joined: where a front stopped because the
    #: classifier's mask disagreed with the network's (``classifier_stop``).
    classifier_stops: dict[int, list[int]] = field(default_factory=dict)
    #: Per label, the half-split Dice of its pixel classifier on the painted slices
    #: (core/propagate/classifier.py); the labels whose classifier joined the network.
    classifier_dice: dict[int, float] = field(default_factory=dict)
    classifier_joined: list[int] = field(default_factory=list)

    def slice_confidence(self) -> np.ndarray:
        """``"N"``: the weakest object's confidence on each slice (NaN where none was predicted)."""
        conf = self.confidence
        predicted = ~np.isnan(conf)
        weakest = np.where(predicted, conf, np.inf).min(axis=0)
        return np.where(predicted.any(axis=0), weakest, np.nan).astype(np.float32)

    def least_confident_slice(self) -> int | None:
        """The predicted slice with the lowest confidence: the first one to check and correct."""
        per_slice = self.slice_confidence()
        if np.all(np.isnan(per_slice)):
            return None
        return int(np.nanargmin(per_slice))

    def confidence_stop_hint(
        self, settings: dict[str, float], classifier_setting: str = "classifier_stop"
    ) -> str | None:
        """Sentences naming the slices where fronts ended while the object was still drawn, or None:
        on low confidence, or where the pixel classifier joined, on its disagreement with the
        network. ``settings`` maps what the caller's user knows each confidence threshold as (a
        widget control, a CLI option) to its value; the hint names those in use (above 0);
        ``classifier_setting`` is the agreement threshold's name."""
        sentences = []
        if self.confidence_stops:
            setting = " or ".join(name for name, value in settings.items() if value > 0) or "the stop"
            sentences.append(
                f"Fronts ended on low confidence ({_where(self.confidence_stops)}). "
                f"If an object goes on past there, lower {setting} and run again."
            )
        if self.classifier_stops:
            sentences.append(
                f"Fronts ended where the pixel classifier disagreed with the network "
                f"({_where(self.classifier_stops)}). If an object goes on past there, lower "
                f"{classifier_setting} (0: stop on confidence) and run again."
            )
        return " ".join(sentences) or None

    def classifier_note(self) -> str | None:
        """A sentence on each label's pixel classifier: joined or left out, and its half-split Dice."""
        if not self.classifier_dice:
            return None
        parts = [
            f"label {v}: {'joined the network' if v in self.classifier_joined else 'left out'} "
            f"(half-split Dice {d:.2f})"
            for v, d in self.classifier_dice.items()
        ]
        return "Pixel classifier: " + "; ".join(parts) + "."

    def summary(self) -> dict:
        """A JSON-ready description: per-slice confidences, prompts, the weakest slice."""
        per_slice = self.slice_confidence()
        as_float = lambda x: None if np.isnan(x) else round(float(x), 4)  # noqa: E731
        return {
            "axis": self.axis,
            "label_values": self.label_values,
            "prompt_slices": {str(v): s for v, s in self.prompt_slices.items()},
            "complete_slices": self.complete_slices,
            "least_confident_slice": self.least_confident_slice(),
            "confidence_stops": {str(v): s for v, s in self.confidence_stops.items()},
            "classifier_stops": {str(v): s for v, s in self.classifier_stops.items()},
            "pixel_classifier": {
                str(v): {"half_split_dice": round(d, 4), "joined": v in self.classifier_joined}
                for v, d in self.classifier_dice.items()
            },
            "mean_confidence": None
            if np.all(np.isnan(per_slice))
            else round(float(np.nanmean(per_slice)), 4),
            "slices": [
                {
                    "index": s,
                    "confidence": as_float(per_slice[s]),
                    "objects": {
                        str(v): as_float(self.confidence[c, s]) for c, v in enumerate(self.label_values)
                    },
                }
                for s in range(per_slice.shape[0])
            ],
        }

    def changed_slices(self, edited: np.ndarray) -> list[int]:
        """The slices where ``edited`` (this result's labels after the user's fixes) differs from
        :attr:`labels`."""
        edited = check_labels(edited, self.labels.shape)
        changed = np.moveaxis(edited != self.labels, self.axis, 0)
        return np.flatnonzero(changed.reshape(changed.shape[0], -1).any(axis=1)).tolist()

    def with_corrections(
        self, prompt: np.ndarray, edited: np.ndarray, slices: Sequence[int] | None = None
    ) -> tuple[np.ndarray, list[int]]:
        """The prompt and complete slices for the next run after the user fixed some slices.

        ``edited`` is this result's labels after the user's fixes; ``slices`` are the fixed slices
        (default: :meth:`changed_slices`). Returns ``(new_prompt, complete_slices)``: ``prompt`` with
        those slices taken from ``edited``, and the slices to pass as ``complete_slices`` (the
        earlier ones included). Labels painted in ``prompt`` that this run did not propagate are
        not in ``edited``; they stay on the fixed slices wherever the fix left the voxel empty.
        """
        edited = check_labels(edited, self.labels.shape)
        prompt = check_labels(prompt, self.labels.shape)
        edited_stack = np.moveaxis(edited, self.axis, 0)
        if slices is None:
            slices = self.changed_slices(edited)
        slices = check_slices(slices, edited_stack.shape[0], "corrected")
        new_prompt = np.array(prompt, dtype=np.result_type(prompt.dtype, edited.dtype))
        new_stack = np.moveaxis(new_prompt, self.axis, 0)
        painted, fixes = new_stack[slices], edited_stack[slices]
        others = (painted != 0) & ~np.isin(painted, self.label_values)
        new_stack[slices] = np.where(others & (fixes == 0), painted, fixes)
        return new_prompt, sorted(set(self.complete_slices) | set(slices))


def _where(stops: dict[int, list[int]]) -> str:
    return "; ".join(f"label {v}: slice {', '.join(map(str, s))}" for v, s in stops.items())


def check_slices(slices: Sequence[int], n_slices: int, what: str) -> list[int]:
    result = sorted({int(s) for s in slices})
    bad = [s for s in result if not 0 <= s < n_slices]
    if bad:
        raise OpenSegError(f"{what} slice {bad[0]} is outside 0..{n_slices - 1}")
    return result

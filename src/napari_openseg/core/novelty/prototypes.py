"""A memory bank of class prototypes (MedOpenSeg, Vargas et al. 2025, section 3.2).

One prototype per known class, background included, stored L2-normalised as ``"K F"``. Prototypes
are never trained by gradients: after each batch they move towards the mean embedding of their class,
``p <- normalise(a * p + (1 - a) * mean)`` with momentum ``a`` (0.9 by default). The mean is taken over
L2-normalised embeddings, so it is a mean *direction* and the update does not depend on how long the
embeddings are. A prototype starts at zero; its first update therefore sets it to its class's first
mean direction.

An optional *unknown* prototype stands for structures that were never labelled:

* :meth:`PrototypeBank.seed_unknown` sets it from the embeddings of one painted instance of an unseen
  structure (the one-shot seed); no gradient ever flows from it;
* :meth:`PrototypeBank.init_unknown_from_outliers` is the seed-free variant: the mean direction of the
  embeddings least similar to every known prototype;
* :meth:`PrototypeBank.adapt_unknown` then adapts it from *unlabelled* embeddings only: each step
  assigns every embedding to its most similar prototype (known or unknown, cosine), and moves the
  unknown prototype by the same moving average towards the mean direction of the embeddings it won.
  This is one k-means step with the known prototypes held fixed; no label is used.

Files: :meth:`PrototypeBank.save` writes plain tensors and numbers (``torch.load(weights_only=True)``
reads them back); the same :meth:`state_dict` travels inside model files and training checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_openseg.core.tensor_files import load_format_file
from napari_openseg.errors import OpenSegError

BANK_FORMAT = "napari-openseg prototype bank"


#: ``a`` of the moving-average update (the issue's default).
DEFAULT_MOMENTUM = 0.9


def _as_tensor(values, dtype=torch.float32) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().to(dtype)
    return torch.as_tensor(np.asarray(values), dtype=dtype)


class PrototypeBank:
    """Known-class prototypes ``"K F"`` with their label values, and an optional unknown prototype.

    Parameters
    ----------
    class_values
        Label value of each class, background (usually 0) included; index ``k`` of every array of the
        bank is class ``class_values[k]``.
    dim
        F, the embedding size.
    momentum
        ``a`` in ``p <- a * p + (1 - a) * mean``; 0 replaces a prototype by each new mean, values near 1
        move it slowly.
    """

    def __init__(self, class_values: Sequence[int], dim: int, momentum: float = DEFAULT_MOMENTUM):
        values = [int(v) for v in class_values]
        if len(values) < 1 or len(set(values)) != len(values):
            raise OpenSegError(f"a prototype bank needs distinct class values, got {values}")
        if not 0.0 <= momentum < 1.0:
            raise OpenSegError(f"prototype momentum must lie in [0, 1), got {momentum}")
        if dim < 1:
            raise OpenSegError(f"embedding size must be >= 1, got {dim}")
        self.class_values = values
        self.dim = int(dim)
        self.momentum = float(momentum)
        self.prototypes = torch.zeros(len(values), self.dim)
        self.counts = torch.zeros(len(values), dtype=torch.long)
        self.unknown: torch.Tensor | None = None
        self.unknown_source = ""
        #: Factor applied to raw embeddings before Euclidean distances (1 for a trained network).
        self.embedding_scale = 1.0

    # ------------------------------------------------------------------ updates
    @property
    def num_classes(self) -> int:
        return len(self.class_values)

    @property
    def ready(self) -> bool:
        """Whether every class has been observed at least once."""
        return bool((self.counts > 0).all())

    def missing_classes(self) -> list[int]:
        return [v for v, n in zip(self.class_values, self.counts.tolist()) if n == 0]

    def _check_embeddings(self, embeddings) -> torch.Tensor:
        x = _as_tensor(embeddings)
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise OpenSegError(f'embeddings must be "N F" with F={self.dim}, got shape {tuple(x.shape)}')
        return x.to(self.prototypes.device)

    @torch.no_grad()
    def update(self, embeddings, classes) -> list[int]:
        """Moving-average update from ``embeddings "N F"`` and class indices ``classes "N"``.

        ``classes`` holds indices into :attr:`class_values` (not label values); negative entries are
        ignored. Returns the class indices that were updated.
        """
        x = self._check_embeddings(embeddings)
        k = _as_tensor(classes, torch.long).to(x.device).reshape(-1)
        if k.shape[0] != x.shape[0]:
            raise OpenSegError(f"{x.shape[0]} embeddings but {k.shape[0]} class indices")
        if (k >= self.num_classes).any():
            raise OpenSegError(f"class indices must be < {self.num_classes}, got {int(k.max())}")
        directions = F.normalize(x.float(), dim=1)
        updated = []
        for index in torch.unique(k[k >= 0]).tolist():
            mean = directions[k == index].mean(dim=0)
            blended = self.momentum * self.prototypes[index] + (1.0 - self.momentum) * mean
            self.prototypes[index] = F.normalize(blended, dim=0)
            self.counts[index] += 1
            updated.append(int(index))
        return updated

    @torch.no_grad()
    def set_from_means(self, embeddings, classes) -> None:
        """Set every observed class's prototype to its mean direction (no moving average)."""
        momentum, self.momentum = self.momentum, 0.0
        try:
            self.update(embeddings, classes)
        finally:
            self.momentum = momentum

    @torch.no_grad()
    def seed_unknown(self, embeddings, source: str = "one painted instance") -> None:
        """Set the unknown prototype to the mean direction of ``embeddings "N F"`` of one instance."""
        x = self._check_embeddings(embeddings)
        if x.shape[0] == 0:
            raise OpenSegError("the unknown seed has no voxels: paint the unseen structure first")
        self.unknown = F.normalize(F.normalize(x.float(), dim=1).mean(dim=0), dim=0)
        self.unknown_source = source

    @torch.no_grad()
    def init_unknown_from_outliers(self, embeddings, fraction: float = 0.01) -> None:
        """Seed-free unknown prototype: mean direction of the ``fraction`` of embeddings least similar
        to every known prototype."""
        x = F.normalize(self._check_embeddings(embeddings).float(), dim=1)
        if x.shape[0] == 0:
            raise OpenSegError("no embeddings to initialise the unknown prototype from")
        best = (x @ self.prototypes.T).max(dim=1).values
        count = max(1, int(round(fraction * x.shape[0])))
        outliers = torch.topk(-best, count).indices
        self.unknown = F.normalize(x[outliers].mean(dim=0), dim=0)
        self.unknown_source = f"least similar {fraction:.0%} of unlabelled embeddings"

    @torch.no_grad()
    def adapt_unknown(self, embeddings, steps: int = 5, momentum: float | None = None) -> float:
        """Adapt the unknown prototype from unlabelled ``embeddings "N F"``; returns the fraction of
        embeddings it won in the last step (0 when it won none, and then it stays where it was)."""
        if self.unknown is None:
            raise OpenSegError("there is no unknown prototype to adapt; seed it first")
        x = F.normalize(self._check_embeddings(embeddings).float(), dim=1)
        a = self.momentum if momentum is None else float(momentum)
        won = 0.0
        for _ in range(int(steps)):
            bank = torch.cat([self.prototypes, self.unknown[None]], dim=0)
            assigned = (x @ bank.T).argmax(dim=1) == self.num_classes
            won = float(assigned.float().mean()) if x.shape[0] else 0.0
            if not assigned.any():
                break
            self.unknown = F.normalize(a * self.unknown + (1.0 - a) * x[assigned].mean(dim=0), dim=0)
        return won

    def clear_unknown(self) -> None:
        self.unknown = None
        self.unknown_source = ""

    # ------------------------------------------------------------------ files
    def state_dict(self) -> dict:
        """Plain tensors, numbers and strings only (safe for ``torch.load(weights_only=True)``)."""
        state = {
            "class_values": list(self.class_values),
            "dim": self.dim,
            "momentum": self.momentum,
            "prototypes": self.prototypes.detach().cpu().clone(),
            "counts": self.counts.detach().cpu().clone(),
            "embedding_scale": float(self.embedding_scale),
            "unknown_source": self.unknown_source,
        }
        if self.unknown is not None:
            state["unknown"] = self.unknown.detach().cpu().clone()
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> PrototypeBank:
        try:
            values, dim, momentum = list(state["class_values"]), int(state["dim"]), float(state["momentum"])
            prototypes = _as_tensor(state["prototypes"])
            counts = _as_tensor(state["counts"], torch.long)
        except (KeyError, TypeError, ValueError) as err:
            raise OpenSegError(f"not a prototype bank ({err})") from err
        # checked before the bank allocates its own arrays: a damaged dim could ask for terabytes
        if tuple(prototypes.shape) != (len(values), dim) or tuple(counts.shape) != (len(values),):
            raise OpenSegError(
                f"prototype bank arrays do not match: prototypes {tuple(prototypes.shape)}, "
                f"{len(values)} classes of size {dim}"
            )
        bank = cls(values, dim, momentum)
        if not torch.isfinite(prototypes).all():
            raise OpenSegError("the prototype bank holds NaN or infinite prototypes; the file is damaged")
        bank.prototypes, bank.counts = prototypes.clone(), counts.clone()
        bank.embedding_scale = float(state.get("embedding_scale", 1.0))
        if state.get("unknown") is not None:
            unknown = _as_tensor(state["unknown"])
            if unknown.numel() != bank.dim or not torch.isfinite(unknown).all():
                raise OpenSegError(
                    f"the unknown prototype has {unknown.numel()} values (or non-finite ones); "
                    f"the bank's embeddings have {bank.dim}"
                )
            bank.unknown = unknown.reshape(bank.dim).clone()
            bank.unknown_source = str(state.get("unknown_source", ""))
        return bank

    def copy(self) -> PrototypeBank:
        return PrototypeBank.from_state_dict(self.state_dict())

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the bank alone to a ``.pt`` file, atomically."""
        from napari_openseg.io import atomic_path

        with atomic_path(path, overwrite) as tmp:
            torch.save({"format": BANK_FORMAT, "version": 1, "bank": self.state_dict()}, tmp)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> PrototypeBank:
        """Read a file written by :meth:`save` (plain tensors only)."""
        content = load_format_file(
            path,
            BANK_FORMAT,
            missing="{path}: no such prototype-bank file",
            unreadable="{path} is not a readable prototype-bank file ({detail})",
            foreign="{path} is not a napari-openseg prototype-bank file",
        )
        if "bank" not in content:
            raise OpenSegError(f"{path} holds no prototype bank; the file is damaged")
        return cls.from_state_dict(content["bank"])

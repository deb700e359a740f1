"""Device choice: ``"auto"`` (CUDA, then MPS, then CPU) or an explicit device."""

from __future__ import annotations

import torch

from napari_openseg.core.engine_settings import PRECISIONS, check_choice
from napari_openseg.errors import OpenSegError

#: The torch number format of each of :data:`~napari_openseg.core.engine_settings.PRECISIONS`.
DTYPES = {name: getattr(torch, name) for name in PRECISIONS}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda" | "cuda:N" | "mps"`` into a usable ``torch.device``.

    Raises ``OpenSegError`` when the asked device is absent, naming the devices that exist.
    """
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise OpenSegError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise OpenSegError(
                f"device {name!r} was asked for but this PyTorch sees no CUDA GPU "
                f"(available: {', '.join(available_devices())}); choose cpu or auto"
            )
        if device.index is not None and device.index >= count:
            raise OpenSegError(f"device {name!r} does not exist: this machine has {count} CUDA GPU(s)")
    elif device.type == "mps" and not _mps_available():
        raise OpenSegError("device 'mps' was asked for but is not available; use cpu or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise OpenSegError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """``"float32" | "bfloat16" | "float16"`` -> dtype; float16 is refused on CPU, where it is slow
    and inexact."""
    check_choice("precision", precision, PRECISIONS)
    if precision == "float16" and device.type == "cpu":
        raise OpenSegError("float16 is for GPUs; on the CPU use float32 or bfloat16")
    return DTYPES[precision]


def available_devices() -> list[str]:
    """Names of the devices this PyTorch can use, CPU last."""
    names = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    if _mps_available():
        names.append("mps")
    return names + ["cpu"]


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())

"""Named weights: where they come from, their licence, and loading them (cached per name and device).

Weights are resolved lazily, never at import time. Two kinds of file are read, both with
``torch.load(weights_only=True)`` so that loading never runs code from the file:

* a bare state dict in the official UniverSeg layout (the widths are read off the tensor shapes);
* napari-openseg's own file: ``{"format": "napari-openseg weights", "version": 1, "config": {...},
  "state_dict": {...}, "info": {...}}``.

Downloads go to one cache folder, ``$OPENSEG_CACHE_DIR`` or ``~/.cache/napari-openseg``.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from napari_openseg.core.tensor_files import layout_mismatch, load_tensor_file
from napari_openseg.errors import OpenSegError
from napari_openseg.model.universeg import UniverSeg, UniverSegConfig, config_from_state_dict

log = logging.getLogger(__name__)

WEIGHTS_FORMAT = "napari-openseg weights"
DEFAULT_WEIGHTS = "openseg-default"
#: What propagation runs with when the default is asked for (chosen on validation, docs/model-card.md).
PROPAGATION_WEIGHTS = "openseg-propagate"
CACHE_ENV = "OPENSEG_CACHE_DIR"
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "weights"


@dataclass(frozen=True)
class WeightsEntry:
    """A named set of weights and what a user must know before using them."""

    name: str
    description: str
    licence: str
    filename: str
    url: str | None = None
    sha256: str | None = None
    bundled: bool = False
    research_only: bool = False

    @property
    def path(self) -> Path:
        return BUNDLED_DIR / self.filename if self.bundled else cache_dir() / self.filename


REGISTRY: dict[str, WeightsEntry] = {
    "openseg-default": WeightsEntry(
        name="openseg-default",
        description="napari-openseg's own weights, trained by its training code (see docs/model-card.md)",
        licence="BSD-3-Clause (same as napari-openseg); see docs/model-card.md for the training data",
        filename="openseg-default.pt",
        bundled=True,
    ),
    "openseg-propagate": WeightsEntry(
        name="openseg-propagate",
        description="napari-openseg's own phase-3 weights, propagation's default: their confidence ends "
        "fronts where objects end (see docs/model-card.md)",
        licence="BSD-3-Clause (same as napari-openseg); see docs/model-card.md for the training data",
        filename="openseg-propagate.pt",
        bundled=True,
    ),
    "openseg-v2": WeightsEntry(
        name="openseg-v2",
        description="napari-openseg's weights trained on the permissive sets of the task bank (nine "
        "modalities; see docs/model-card.md); not yet the default",
        licence="BSD-3-Clause (same as napari-openseg); see docs/model-card.md for the training data",
        filename="openseg-v2.pt",
        bundled=True,
    ),
    "universeg-v1": WeightsEntry(
        name="universeg-v1",
        description="official UniverSeg v1 weights (Butoi et al., 2023), 64 features, support size 64",
        licence="research use only (UniverSeg authors' release); not for clinical or commercial use",
        filename="universeg_v1_nf64_ss64_STA.pt",
        url="https://github.com/JJGO/UniverSeg/releases/download/weights/universeg_v1_nf64_ss64_STA.pt",
        # The release publishes no checksum; the file is checked by its strict state-dict layout.
        sha256=None,
        research_only=True,
    ),
}

_CACHE: dict[tuple[str, int, int, str], UniverSeg] = {}
_CACHE_LOCK = threading.Lock()


def cache_dir() -> Path:
    """Folder for downloaded weights; ``$OPENSEG_CACHE_DIR`` moves it."""
    custom = os.environ.get(CACHE_ENV)
    if custom:
        return Path(custom).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "napari-openseg"


def is_available(name: str) -> bool:
    """Whether named weights can be loaded without a download."""
    return name in REGISTRY and REGISTRY[name].path.is_file()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_weights(
    name: str,
    url: str | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    timeout: float = 30.0,
) -> Path:
    """Fetch named weights into the cache folder (atomically) and return the file's path.

    ``url`` overrides the entry's address (a mirror, or a ``file://`` URL). Offline or failed
    downloads raise ``OpenSegError`` with what to do instead.
    """
    entry = _entry(name)
    if entry.bundled:
        return entry.path
    source = url or entry.url
    if not source:
        raise OpenSegError(f"weights {name!r} have no download address")
    if entry.research_only:
        log.warning("%s: licence: %s", name, entry.licence)
    target = entry.path
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OpenSegError(
            f"cannot use {target.parent} as the weights cache ({err}); set {CACHE_ENV} to a folder"
        ) from err
    partial = target.with_name(target.name + ".partial")
    try:
        with urllib.request.urlopen(source, timeout=timeout) as response, open(partial, "wb") as out:
            total = response.headers.get("Content-Length")
            total = int(total) if total else None
            done = 0
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                done += len(block)
                if progress:
                    progress(done, total)
        if total is not None and done != total:  # the connection ended early; no checksum would tell
            raise OSError(f"the connection ended after {done} of {total} bytes")
    except (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError, ValueError) as err:
        partial.unlink(missing_ok=True)
        raise OpenSegError(
            f"could not download {name} from {source} ({err}). Without internet, download the file "
            f"elsewhere and put it at {target}, or pass its path with --weights PATH"
        ) from err
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    try:
        if entry.sha256 and _sha256(partial) != entry.sha256:
            raise OpenSegError(f"the download of {name} is damaged (checksum mismatch); try again")
        try:  # the official file has no checksum: install it only if it loads as these weights
            network_from_file(partial)
        except OpenSegError as err:
            raise OpenSegError(
                f"what {source} sent is not the {name} weights ({err}); nothing was installed"
            ) from err
        os.replace(partial, target)
    finally:  # refused, or interrupted while checking: no half-checked file stays in the cache
        partial.unlink(missing_ok=True)
    return target


#: Bounds on an architecture read from a file, checked before anything is built: far above every
#: released or trained network (v1: widths 64, grid 128), far below what exhausts a machine's memory.
MAX_CHANNELS = 1024
MAX_LEVELS = 8
MAX_GRID = 1024


def read_weights_file(path: str | Path) -> tuple[UniverSegConfig, dict[str, torch.Tensor], dict]:
    """Read a weights file safely; returns (architecture, state dict, info).

    The architecture is checked against sane bounds and every tensor's shape against it before any
    network is built (:func:`expected_shapes` builds none)."""
    path = Path(path)
    if not path.is_file():
        raise OpenSegError(f"weights file {path} does not exist")
    content = load_tensor_file(
        path,
        "{path} is not a loadable weights file: it is empty or damaged, or it holds more than plain "
        "tensors (pickled code is never run) ({detail})",
    )
    if isinstance(content, dict) and content.get("format") == WEIGHTS_FORMAT:
        state_dict, info = content.get("state_dict", {}), content.get("info", {})
        fields = _config_kwargs(content.get("config", {}), path)
        try:
            config = UniverSegConfig(**fields)
        except (TypeError, ValueError) as err:
            raise OpenSegError(f"{path}: its architecture cannot be built ({err})") from err
        if not isinstance(state_dict, dict) or not all(
            isinstance(v, torch.Tensor) for v in state_dict.values()
        ):
            raise OpenSegError(
                f"{path}: its state dict holds entries that are not tensors; the file is damaged"
            )
        if not isinstance(info, dict):
            raise OpenSegError(
                f"{path}: its info is a {type(info).__name__}, not a mapping; the file is damaged"
            )
    elif isinstance(content, dict) and all(isinstance(v, torch.Tensor) for v in content.values()):
        try:
            config = config_from_state_dict(content)
        except ValueError as err:
            raise OpenSegError(f"{path}: not a UniverSeg state dict ({err})") from err
        state_dict, info = content, {}
    else:
        raise OpenSegError(f"{path} holds neither a napari-openseg weights file nor a UniverSeg state dict")
    _check_bounds(config, path)
    _check_layout(config, state_dict, path)
    return config, state_dict, dict(info)


def _config_kwargs(config: dict, path: Path) -> dict:
    if not isinstance(config, dict):
        raise OpenSegError(
            f"{path}: its architecture is a {type(config).__name__}, not a mapping; the file is damaged"
        )
    allowed = {"encoder_channels", "decoder_channels", "grid_size"}
    unknown = set(config) - allowed
    if unknown:
        raise OpenSegError(f"{path}: unknown architecture fields {sorted(unknown)}; upgrade napari-openseg")
    whole = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    for key, value in config.items():
        if key == "grid_size":
            fits, kind = whole(value), "a whole number"
        else:
            fits = (key == "decoder_channels" and value is None) or (
                isinstance(value, (list, tuple)) and all(whole(v) for v in value)
            )
            kind = "a list of whole numbers"
        if not fits:
            raise OpenSegError(
                f"{path}: its architecture's {key} is {value!r}, not {kind}; the file is damaged"
            )
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


def _check_bounds(config: UniverSegConfig, path: Path) -> None:
    widths = config.encoder_channels + config.decoder_channels
    if len(config.encoder_channels) > MAX_LEVELS or max(widths) > MAX_CHANNELS:
        raise OpenSegError(
            f"{path}: its architecture has {len(config.encoder_channels)} levels of up to {max(widths)} "
            f"channels; weights files hold at most {MAX_LEVELS} levels of {MAX_CHANNELS}: the file is damaged"
        )
    if config.grid_size > MAX_GRID:
        raise OpenSegError(
            f"{path}: its grid size {config.grid_size} is above {MAX_GRID}; the file is damaged"
        )


def expected_shapes(config: UniverSegConfig) -> dict[str, torch.Size]:
    """The state-dict shapes of a network of ``config``, from a network on the meta device (no memory)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in UniverSeg(config).state_dict().items()}


def _check_layout(config: UniverSegConfig, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse a state dict that does not fit ``config``, naming the keys."""
    problem = layout_mismatch(expected_shapes(config), state_dict)
    if problem:
        raise OpenSegError(f"{path} is not in the UniverSeg layout: {problem}")


def network_from_file(path: str | Path) -> UniverSeg:
    """A network with the file's weights loaded strictly; layout mismatches name the keys."""
    config, state_dict, info = read_weights_file(path)
    net = UniverSeg(config)
    net.load_state_dict(state_dict, strict=True)
    net.weights_info = dict(info, source=str(path))
    return net.eval()


def save_weights(net: UniverSeg, path: str | Path, info: dict | None = None, half: bool = False) -> Path:
    """Write ``net`` as a napari-openseg weights file (optionally stored in float16)."""
    from napari_openseg.io import atomic_path

    state = {
        k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in net.state_dict().items()
    }
    payload = {
        "format": WEIGHTS_FORMAT,
        "version": 1,
        "config": net.config.to_dict(),
        "state_dict": state,
        "info": dict(info or {}),
    }
    with atomic_path(path, overwrite=True) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def _entry(name: str) -> WeightsEntry:
    if name not in REGISTRY:
        raise OpenSegError(f"unknown weights {name!r}; known: {', '.join(REGISTRY)} (or give a file path)")
    return REGISTRY[name]


def propagation_weights(spec: str | Path | None) -> str:
    """The weights propagation runs with: the default (``None`` or its name) means :data:`PROPAGATION_WEIGHTS`."""
    return PROPAGATION_WEIGHTS if spec is None or str(spec) == DEFAULT_WEIGHTS else str(spec)


def resolve_weights_path(spec: str | Path | None) -> Path:
    """A weights name or path -> an existing file, or an ``OpenSegError`` that says how to get it."""
    spec = DEFAULT_WEIGHTS if spec is None else spec
    if str(spec) in REGISTRY:
        entry = REGISTRY[str(spec)]
        if entry.path.is_file():
            return entry.path
        if entry.bundled:
            raise OpenSegError(
                f"the bundled weights {entry.name} are missing from this installation; reinstall "
                "napari-openseg or pass --weights PATH"
            )
        raise OpenSegError(
            f"weights {entry.name} are not downloaded yet (licence: {entry.licence}). Run "
            f"`openseg weights download {entry.name}` once with internet, or put the file at {entry.path}"
        )
    path = Path(spec).expanduser()
    if not path.is_file():
        raise OpenSegError(f"{spec!r} is neither a known weights name ({', '.join(REGISTRY)}) nor a file")
    return path


def load_model(spec: str | Path | None = None, device: torch.device | str = "cpu") -> UniverSeg:
    """The network for a weights name or file on ``device``, in eval mode, cached per (file, device).

    A file rewritten since (training rewrites ``best.pt`` in place) is read again. The cached network
    is shared: callers must not modify it (inference works on a prepared copy).
    """
    path = resolve_weights_path(spec)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, str(torch.device(device)))
    with _CACHE_LOCK:
        if key not in _CACHE:
            for stale in [k for k in _CACHE if (k[0], k[3]) == (key[0], key[3])]:  # an older version
                del _CACHE[stale]
            net = network_from_file(path).to(device)
            net.requires_grad_(False)
            _CACHE[key] = net
        return _CACHE[key]


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()

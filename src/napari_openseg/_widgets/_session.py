"""Per-viewer state shared by every napari-openseg widget, and the events it emits.

One :class:`Session` exists per viewer (:func:`get_session`). It holds the support set and the model
choice (weights, device). Widgets change state only through its methods and redraw from its signals,
so a script that calls ``get_session(viewer).add_entries(...)`` and a click on a button leave every
widget showing the same thing. All methods are meant for the main (GUI) thread.

Signals (``psygnal``):

``support_changed(SupportSet)``
    entries were added, removed, replaced or cleared.
``model_changed(str, str)``
    the weights (a name or a file path) or the device changed.
"""

from __future__ import annotations

import hashlib
import logging
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path

from psygnal import Signal

from napari_openseg.core.support import SupportEntry, SupportSet
from napari_openseg.errors import OpenSegError
from napari_openseg.model.registry import DEFAULT_WEIGHTS

log = logging.getLogger(__name__)


class Session:
    """The support set and model choice of one viewer.

    Parameters
    ----------
    viewer
        The napari viewer this state belongs to (kept as a weak reference; may be ``None`` for
        scripts without a viewer).
    """

    support_changed = Signal(object)
    model_changed = Signal(str, str)

    def __init__(self, viewer=None):
        self._viewer_ref = weakref.ref(viewer) if viewer is not None else None
        self._support = SupportSet()
        self._weights = DEFAULT_WEIGHTS
        self._device = "auto"
        #: Image layers (``unique_id``) a Segment run is writing to: a second run on one is refused,
        #: since both would fill, and then remove, the same preview and output layers.
        self.segmenting: set[str] = set()

    @property
    def viewer(self):
        """The viewer, or ``None`` once it has been closed (or for a viewer-less session)."""
        return self._viewer_ref() if self._viewer_ref is not None else None

    # --- support set -------------------------------------------------------------------------

    @property
    def support(self) -> SupportSet:
        """The current support set. Do not mutate it directly: use the methods below so that
        widgets hear about the change."""
        return self._support

    def support_snapshot(self) -> SupportSet:
        """A copy of the support set for a background job: edits made while it runs do not reach it."""
        return SupportSet(entries=list(self._support.entries), metadata=dict(self._support.metadata))

    def add_entries(self, entries: Iterable[SupportEntry]) -> int:
        """Append entries; returns how many were added. A slice already in the set for the same label
        (same source, axis and slice) is not added again: adding the current slice, then all labelled
        slices, would otherwise count it twice."""
        held = {_slice_key(e) for e in self._support.entries}
        fresh = []
        for entry in entries:
            key = _slice_key(entry)
            if key not in held:
                held.add(key)
                fresh.append(entry)
        if fresh:
            self._support.extend(fresh)
            self.support_changed.emit(self._support)
        return len(fresh)

    def remove_entries(self, indices: Sequence[int]) -> int:
        """Remove entries by position (any order, duplicates ignored); returns how many went."""
        unique = sorted({int(i) for i in indices}, reverse=True)
        for index in unique:
            if not 0 <= index < len(self._support):
                raise OpenSegError(f"no support entry {index}; the set has {len(self._support)}")
        for index in unique:
            self._support.remove(index)
        if unique:
            self.support_changed.emit(self._support)
        return len(unique)

    def clear_support(self) -> None:
        """Empty the support set (keeps its metadata)."""
        self._support = SupportSet(metadata=dict(self._support.metadata))
        self.support_changed.emit(self._support)

    def replace_support(self, support: SupportSet) -> None:
        """Use ``support`` from now on (for example one built by a script)."""
        if not isinstance(support, SupportSet):
            raise TypeError(f"expected a SupportSet, got {type(support).__name__}")
        self._support = support
        self.support_changed.emit(self._support)

    def load_support(self, path: str | Path, replace: bool = False) -> int:
        """Read a support-set file and add its entries (or replace the set); returns how many entries
        the set gained (entries it already held are not added twice).

        Appending is the default so that opening a file never discards entries already collected.
        """
        loaded = SupportSet.load(path)
        if replace:
            self.replace_support(loaded)
            added = len(loaded)
        else:
            self._support.metadata.update(loaded.metadata)
            added = self.add_entries(loaded.entries)
        log.info("added %d of the %d support entries in %s", added, len(loaded), path)
        return added

    def save_support(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the support set to ``path`` (``.npz``), atomically; refuses an existing file unless
        ``overwrite``."""
        path = Path(path)
        if path.suffix.lower() != ".npz":
            raise OpenSegError(f"support-set files end in .npz, got {path.name}")
        return self._support.save(path, overwrite=overwrite)

    # --- model choice ------------------------------------------------------------------------

    @property
    def weights(self) -> str:
        """A registry name (``"openseg-default"``, ``"universeg-v1"``) or a weights file path."""
        return self._weights

    @property
    def device(self) -> str:
        """``"auto"``, ``"cpu"``, ``"cuda[:N]"`` or ``"mps"``."""
        return self._device

    def set_model(self, weights: str | None = None, device: str | None = None) -> None:
        """Change the weights and/or device; emits ``model_changed`` when something changed.
        Nothing is loaded here: workers load weights lazily when they run."""
        new_weights = self._weights if weights is None else str(weights)
        new_device = self._device if device is None else str(device)
        if (new_weights, new_device) != (self._weights, self._device):
            self._weights, self._device = new_weights, new_device
            self.model_changed.emit(new_weights, new_device)


def _slice_key(entry: SupportEntry):
    """What makes two entries the same: the same slice (or 2D image) of the same source, painted the
    same, for the same label (a repainted slice is a new entry)."""
    content = hashlib.blake2b(entry.image.tobytes() + entry.mask.tobytes(), digest_size=16).digest()
    return entry.source, entry.axis, entry.slice_index, entry.label, content


def connect_widget(signal, widget, slot) -> None:
    """Connect a session signal to a Qt widget's ``slot`` and disconnect it when the widget is
    destroyed (the session outlives dock widgets; psygnal would otherwise call a deleted object)."""
    signal.connect(slot)
    widget.destroyed.connect(lambda *_: signal.disconnect(slot, missing_ok=True))


_SESSIONS: dict[int, tuple[weakref.ref, Session]] = {}


def unwrap_viewer(viewer):
    """The viewer itself when napari hands plugins a proxy of it (``PublicOnlyProxy``): proxies are
    made afresh on access, so identities (one session per viewer, "is this the same layer?") need
    the real objects. Only public API is used on it."""
    return getattr(viewer, "__wrapped__", viewer)


def get_session(viewer) -> Session:
    """The one :class:`Session` of ``viewer``, created on first use and dropped with the viewer."""
    viewer = unwrap_viewer(viewer)
    key = id(viewer)
    known = _SESSIONS.get(key)
    if known is not None and known[0]() is viewer:
        return known[1]
    session = Session(viewer)
    _SESSIONS[key] = (weakref.ref(viewer, lambda _ref, key=key: _SESSIONS.pop(key, None)), session)
    return session

"""The preview of a running segmentation: slices appear batch by batch, and nothing is half-written.

Adding or removing a napari layer costs hundreds of milliseconds of main-thread time on a slow
display and every refresh repaints the canvas, so the preview does each as rarely as possible:

* first run on a query: one read-only ``"<name> (running)"`` layer, made and drawn when Run is
  pressed (not while the network runs) and reused for each query of a batch. On success it
  *becomes* the output layer; on cancel or error it is removed.
* a run that will replace this plugin's earlier output: the batches are shown in that output layer
  itself (made read-only, its earlier array kept aside). On success it keeps the new result; on
  cancel or error the earlier array is put back, untouched.

Refreshes are throttled to one per :data:`REFRESH_INTERVAL_MS`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from qtpy.QtCore import QEventLoop, QTimer
from qtpy.QtWidgets import QApplication

from napari_openseg._widgets._layers import (
    NIFTI_KEY,
    find_owned_layer,
    geometry_of,
    output_metadata,
    place_like,
    put_output_layer,
    remove_owned_layers,
)

REFRESH_INTERVAL_MS = 250
PREVIEW_ROLE = "preview"


@dataclass
class _Borrowed:
    """An earlier output layer shown as the preview, with what to put back on cancel."""

    layer: object
    data: np.ndarray
    name: str
    editable: bool
    placement: dict  # its geometry before the run, given back with its data on cancel


class Preview:
    """Preview of one run, keyed by query index; ``output_role`` is the role of the output layers."""

    def __init__(self, viewer, output_role: str = "segmentation"):
        self.viewer = viewer
        self.output_role = output_role
        self._layers: dict[int, tuple[object, np.ndarray]] = {}
        self._borrowed: dict[str, _Borrowed] = {}  # by source layer id
        self._last_refresh = 0.0
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self._refresh_now)
        self._pending = None

    def prepare(self, index: int, source, dtype=np.uint8) -> None:
        """Show an empty preview for query ``index`` now, so that no layer is added while the network
        runs."""
        shape = tuple(np.shape(source.data[0] if source.multiscale else source.data))[: source.ndim]
        data = np.zeros(shape, dtype)
        name = f"{source.name} (running)"
        key = str(source.unique_id)
        earlier = self._borrowed[key].layer if key in self._borrowed else None
        if earlier is None:
            earlier = find_owned_layer(self.viewer, self.output_role, source)
            if earlier is not None and type(earlier).__name__ == "Labels" and earlier.ndim == len(shape):
                self._borrowed[key] = _Borrowed(
                    earlier, earlier.data, earlier.name, earlier.editable, geometry_of(earlier)
                )
            else:
                earlier = None
        if earlier is not None:
            self._remove_made()  # the previous query's preview, if it made one: this one borrows instead
            layer = earlier
            layer.data = data
            place_like(layer, source)  # the source may have moved since that output was made
            layer.name = name
            layer.editable = False  # after the data: napari recomputes editable when data is set
        else:
            current = next(iter(self._layers.values()), (None, None))[0]
            reusable = (
                current is not None
                and current in self.viewer.layers
                and not self._is_borrowed(current)
                and current.ndim == len(shape)
            )
            if reusable:
                layer = current
                layer.data = data  # swap data and placement instead of making another layer
                place_like(layer, source)
                layer.metadata.pop(NIFTI_KEY, None)
                layer.metadata.update(output_metadata(source, PREVIEW_ROLE))
                layer.name = name
                layer.editable = False
            else:
                self._remove_made()
                layer = put_output_layer(self.viewer, source, data, role=PREVIEW_ROLE, name=name, opacity=0.5)
                layer.editable = False  # painting on a layer that is being filled in would be lost
        self._layers.clear()
        self._layers[index] = (layer, data)

    @staticmethod
    def draw_now() -> None:
        """Draw what ``prepare`` changed before the worker starts. Drawn later, the first paint of a
        new layer shared the GIL with the worker's start-up and stalled the window for 108-153 ms."""
        QApplication.processEvents(QEventLoop.ExcludeUserInputEvents)

    def write(self, index: int, source, axis: int, start: int, stop: int, labels: np.ndarray) -> None:
        """Put a batch ``labels "b H W"`` (slices ``start:stop`` along ``axis``) into the preview of
        query ``index``."""
        if index not in self._layers or self._layers[index][1].dtype != labels.dtype:
            self.prepare(index, source, labels.dtype)
        layer, data = self._layers[index]
        planes = data[None] if data.ndim == 2 else np.moveaxis(data, axis, 0)
        planes[start:stop] = labels
        self._schedule(layer)

    def _schedule(self, layer) -> None:
        self._pending = layer
        waited = (time.perf_counter() - self._last_refresh) * 1000
        if waited >= REFRESH_INTERVAL_MS:
            self._refresh_now()
        elif not self._timer.isActive():
            self._timer.start(int(REFRESH_INTERVAL_MS - waited))

    def _refresh_now(self) -> None:
        layer, self._pending = self._pending, None
        if layer is not None and layer in self.viewer.layers:
            layer.refresh()
            self._last_refresh = time.perf_counter()

    def promote(self, index: int, source, data: np.ndarray, *, name: str):
        """Give query ``index``'s final labels to the layer that showed its preview and return that
        layer (now the output), or ``None`` when the caller must write the output itself."""
        borrowed = self._borrowed.pop(str(source.unique_id), None)
        if borrowed is not None:
            self._forget(borrowed.layer)
            if borrowed.layer not in self.viewer.layers:
                return None
            borrowed.layer.data = data
            place_like(borrowed.layer, source)  # the source may have moved during the run
            borrowed.layer.name = borrowed.name
            borrowed.layer.editable = borrowed.editable
            self._refresh_status()
            return borrowed.layer
        entry = self._layers.get(index)
        if entry is None or entry[0] not in self.viewer.layers:
            return None
        if find_owned_layer(self.viewer, self.output_role, source) is not None:
            return None
        layer = entry[0]
        self._forget(layer)
        layer.metadata.update(output_metadata(source, self.output_role))
        layer.data = data
        place_like(layer, source)  # the source may have moved during the run
        layer.name = name
        layer.opacity = 0.7
        layer.editable = True
        self._refresh_status()
        return layer

    def drop(self) -> None:
        """End the preview: remove the layer it made, and give every borrowed output its earlier
        array back."""
        self._timer.stop()
        self._pending = None
        self._remove_made()
        for borrowed in self._borrowed.values():
            borrowed.layer.data = borrowed.data
            for key, value in borrowed.placement.items():
                setattr(borrowed.layer, key, value)
            borrowed.layer.name = borrowed.name
            borrowed.layer.editable = borrowed.editable
        self._borrowed.clear()
        self._layers.clear()
        self._refresh_status()

    def _refresh_status(self) -> None:
        # napari recomputes the status bar (which names the layer under the cursor) only when the
        # mouse moves; without this it keeps showing the preview's "(running)" name.
        update = getattr(self.viewer, "update_status_from_cursor", None)
        if update is not None:
            update()

    def _is_borrowed(self, layer) -> bool:
        return any(borrowed.layer is layer for borrowed in self._borrowed.values())

    def _forget(self, layer) -> None:
        for index in [i for i, (shown, _) in self._layers.items() if shown is layer]:
            del self._layers[index]
        if self._pending is layer:
            self._pending = None

    def _remove_made(self) -> None:
        made = [layer for layer, _ in self._layers.values() if not self._is_borrowed(layer)]
        remove_owned_layers(self.viewer, made)

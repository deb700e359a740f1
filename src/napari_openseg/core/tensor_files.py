"""Files of plain tensors, numbers and strings, read without ever running code from them."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import OpenSegError


def load_format_file(path: str | Path, file_format: str, missing: str, unreadable: str, foreign: str) -> dict:
    """The content of ``path`` (``torch.load(weights_only=True)``), a dict whose ``format`` is ``file_format``.

    The messages are format strings: ``missing`` and ``foreign`` get ``{path}``, ``unreadable`` gets
    ``{path}`` and ``{detail}`` (the loader's first error line)."""
    path = Path(path)
    if not path.is_file():
        raise OpenSegError(missing.format(path=path))
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # damaged or foreign files raise many types
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise OpenSegError(unreadable.format(path=path, detail=detail)) from err
    if not isinstance(content, dict) or content.get("format") != file_format:
        raise OpenSegError(foreign.format(path=path))
    return content

"""Files of plain tensors, numbers and strings, read without ever running code from them.

Before ``torch.load(weights_only=True)`` reads a file, the sizes its archive declares are checked:
torch stores tensors uncompressed, so members that together claim more than the file's size are a
crafted or damaged file (a compressed member could expand a few megabytes into gigabytes), and the
total must fit the memory budget (:mod:`napari_openseg.file_limits`). Refusals never repeat torch's
advice to load with ``weights_only`` switched off: that would run the file's code.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import torch

from napari_openseg.errors import OpenSegError
from napari_openseg.file_limits import check_budget, check_stored_size, human_size


def load_tensor_file(path: str | Path, unreadable: str) -> object:
    """The content of ``path`` read with ``torch.load(weights_only=True)``, its sizes checked first.

    ``unreadable`` is a format string with ``{path}`` and ``{detail}`` (why the file was refused)."""
    path = Path(path)
    try:
        _check_archive_sizes(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except OpenSegError:
        raise
    except MemoryError as err:
        raise OpenSegError(unreadable.format(path=path, detail="there is not enough memory")) from err
    except Exception as err:  # damaged or foreign files raise many types
        raise OpenSegError(unreadable.format(path=path, detail=load_error_detail(err))) from err


def _check_archive_sizes(path: Path) -> None:
    if not zipfile.is_zipfile(path):
        return  # torch's legacy format, or not an archive at all (torch.load says which)
    with zipfile.ZipFile(path) as archive:
        declared = sum(info.file_size for info in archive.infolist())
    what = f"its archive declares {human_size(declared)} of content (torch stores tensors uncompressed)"
    check_stored_size(declared, path.stat().st_size, path, what)
    check_budget(declared, path, what)


def load_error_detail(err: Exception) -> str:
    """One line saying why torch refused a file, without its advice to switch ``weights_only`` off."""
    text = str(err)
    if "Weights only load failed" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        named = f" ({found.group(1)})" if found else ""
        return f"it holds pickled Python objects{named} besides plain tensors and numbers"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if "weights_only" not in line and "safe_globals" not in line]
    return lines[0] if lines else type(err).__name__


def load_format_file(path: str | Path, file_format: str, missing: str, unreadable: str, foreign: str) -> dict:
    """The content of ``path`` (:func:`load_tensor_file`), a dict whose ``format`` is ``file_format``.

    The messages are format strings: ``missing`` and ``foreign`` get ``{path}``, ``unreadable`` gets
    ``{path}`` and ``{detail}`` (why the loader refused the file)."""
    path = Path(path)
    if not path.is_file():
        raise OpenSegError(missing.format(path=path))
    content = load_tensor_file(path, unreadable)
    if not isinstance(content, dict) or content.get("format") != file_format:
        raise OpenSegError(foreign.format(path=path))
    return content


def layout_mismatch(expected: dict[str, torch.Size], state_dict: dict[str, torch.Tensor]) -> str | None:
    """How ``state_dict`` differs from the ``expected`` key -> shape layout (keys named), or None."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(
        k for k in set(expected) & set(state_dict) if tuple(expected[k]) != tuple(state_dict[k].shape)
    )
    parts = []
    if missing:
        parts.append(f"missing keys {_few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_few(unexpected)}")
    if wrong:
        parts.append(f"keys with other shapes {_few(wrong)}")
    return "; ".join(parts) or None


def _few(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)} in all)"

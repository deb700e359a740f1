"""Sizes that files declare, checked before anything is allocated for them.

A header (NIfTI dimensions, an ``.npy`` shape, a zip member's size) says how much memory reading a file
will take; a damaged or crafted file can declare far more than it holds. Every reader in the package
compares the declared size with

* what the file can physically hold: its own size when stored plainly, :data:`MAX_DEFLATE_EXPANSION`
  times its size when deflate-compressed (``.nii.gz``), and :data:`MAX_SUPPORT_EXPANSION` times its
  size for a support-set file past :data:`EXPANSION_FLOOR` (real ones expand 2-7 times);
* the memory budget, :func:`memory_budget`: ``$OPENSEG_MEMORY_LIMIT`` or half the machine's memory;

and refuses with an ``OpenSegError`` before reading. Compressed streams are read to their end, so
that their checksums (gzip CRC-32 and length, zip CRC-32) are verified: a damaged file is refused,
never read with wrong values.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from napari_openseg.errors import OpenSegError

MEMORY_LIMIT_ENV = "OPENSEG_MEMORY_LIMIT"
#: deflate cannot expand data more than 1032 times (258-byte matches coded in 2 bits).
MAX_DEFLATE_EXPANSION = 1032
#: How many times a support-set file past :data:`EXPANSION_FLOOR` may expand (real ones: 2 to 7).
MAX_SUPPORT_EXPANSION = 50
EXPANSION_FLOOR = 64 * 1024**2
#: Bytes read at a time from a compressed stream.
CHUNK = 16 * 1024**2
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def human_size(nbytes: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    """``"8G"``, ``"512M"``, ``"1000000"`` -> bytes (binary units)."""
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = raw[-1:] if raw[-1:] in _UNITS and raw[-1:] else ""
    try:
        value = float(raw[: len(raw) - len(unit)])
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise OpenSegError(f"{MEMORY_LIMIT_ENV}={text!r} is not a size; write it like 8G, 512M or 1000000")
    return int(value * _UNITS[unit])


def physical_memory() -> int | None:
    """The machine's memory in bytes, where the system tells it."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def memory_budget() -> int:
    """The most memory one file may make this process allocate: ``$OPENSEG_MEMORY_LIMIT`` (``8G``,
    ``512M``, bytes) or half the machine's memory (16 GiB where the system does not tell it)."""
    custom = os.environ.get(MEMORY_LIMIT_ENV)
    if custom:
        return parse_size(custom)
    total = physical_memory()
    return total // 2 if total else 16 * 1024**3


def check_budget(nbytes: int, path: str | Path, what: str) -> None:
    """Refuse reading ``path`` when it needs ``nbytes`` of memory, more than :func:`memory_budget`;
    ``what`` says what the file declares ("its header declares 2000x2000x2000 uint8 values (7.5 GiB)")."""
    budget = memory_budget()
    if nbytes > budget:
        source = "" if os.environ.get(MEMORY_LIMIT_ENV) else ", half this machine's memory"
        raise OpenSegError(
            f"{path}: {what}; reading it needs {human_size(nbytes)} of memory, more than the budget of "
            f"{human_size(budget)}{source}: set {MEMORY_LIMIT_ENV} (e.g. 32G) to allow more, or crop the data first"
        )


def check_stored_size(nbytes: int, available: int, path: str | Path, what: str, expansion: int = 1) -> None:
    """Refuse ``nbytes`` of declared content (``what``) when ``available`` bytes of file, expanding at
    most ``expansion`` times, cannot hold it: the file is truncated, damaged or crafted."""
    if nbytes > max(0, available) * expansion:
        stored = "compressed data" if expansion > 1 else "data"
        raise OpenSegError(
            f"{path}: {what}, more than its {human_size(max(0, available))} of {stored} can hold; "
            "the file is truncated, damaged or not what its header says"
        )


def describe_array(shape: tuple[int, ...], dtype: np.dtype) -> str:
    """``"2000x2000x2000 uint8 values (7.5 GiB)"``."""
    dims = "x".join(str(int(s)) for s in shape) or "a single"
    return f"{dims} {np.dtype(dtype).name} values ({human_size(array_bytes(shape, dtype))})"


def array_bytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Exact byte count, in Python integers (no overflow for crafted shapes)."""
    return math.prod(int(s) for s in shape) * np.dtype(dtype).itemsize


def drain(stream, limit: int | None = None) -> int:
    """Read ``stream`` to its end (so a gzip or zip reader checks its CRC), in bounded chunks; returns
    the bytes read. ``limit``: stop reading past this many bytes (the caller refuses)."""
    total = 0
    while True:
        block = stream.read(CHUNK)
        if not block:
            return total
        total += len(block)
        if limit is not None and total > limit:
            return total


def read_into(stream, array: np.ndarray) -> None:
    """Fill ``array`` from ``stream`` in bounded chunks (no whole-size temporary)."""
    view = memoryview(array.reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
        block = stream.read(min(CHUNK, len(view) - done))
        if not block:
            raise OSError(f"the data ends after {done} of {len(view)} bytes")
        view[done : done + len(block)] = block
        done += len(block)


def _npy_header(stream, path: Path, name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    fmt = np.lib.format
    version = fmt.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran, dtype = fmt.read_array_header_2_0(stream)
    else:
        raise OpenSegError(f"{path}: {name} is .npy format version {version}, which is not read here")
    if dtype.hasobject:
        raise OpenSegError(f"{path}: {name} holds Python objects (pickles), which are never loaded")
    return tuple(int(s) for s in shape), bool(fortran), dtype


def _read_npy_stream(stream, shape, fortran, dtype) -> np.ndarray:
    array = np.empty(math.prod(shape), dtype)
    if array.nbytes:
        read_into(stream, array)
    return array.reshape(shape[::-1]).transpose() if fortran else array.reshape(shape)


def read_npy(path: str | Path) -> np.ndarray:
    """An ``.npy`` file whose header is checked against the file's size and the budget first."""
    path = Path(path)
    with open(path, "rb") as stream:
        shape, fortran, dtype = _npy_header(stream, path, "the array")
        nbytes, what = array_bytes(shape, dtype), f"it declares {describe_array(shape, dtype)}"
        check_stored_size(nbytes, path.stat().st_size - stream.tell(), path, what)
        check_budget(nbytes, path, what)
        return _read_npy_stream(stream, shape, fortran, dtype)


def read_npz(
    path: str | Path,
    names: list[str] | None = None,
    max_expansion: int = MAX_DEFLATE_EXPANSION,
    kind: str = ".npz archive",
) -> dict[str, np.ndarray]:
    """The arrays ``names`` (default all) of an ``.npz`` file, checked before they are read.

    Each member's declared size (zip directory) must match its ``.npy`` header; the members together
    must fit the memory budget and, past :data:`EXPANSION_FLOOR`, expand at most ``max_expansion``
    times the file's size. Every member is read to its end, so zip's CRC-32 is checked. Damaged
    archives raise ``OpenSegError`` (saying the file is not a readable ``kind``); pickled members are
    refused.
    """
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
            wanted = list(members) if names is None else [n for n in names if n in members]
            declared = sum(members[n].file_size for n in wanted)
            what = f"its {len(wanted)} arrays declare {human_size(declared)}"
            if declared > EXPANSION_FLOOR:
                check_stored_size(declared, file_size, path, what, max_expansion)
            check_budget(declared, path, what)
            arrays = {}
            for name in wanted:
                with archive.open(members[name]) as stream:
                    shape, fortran, dtype = _npy_header(stream, path, f"array {name!r}")
                    expected = stream.tell() + array_bytes(shape, dtype)
                    if expected != members[name].file_size:
                        raise OpenSegError(
                            f"{path}: array {name!r} declares {describe_array(shape, dtype)} but its zip "
                            f"entry holds {human_size(members[name].file_size)}; the file is damaged"
                        )
                    arrays[name] = _read_npy_stream(stream, shape, fortran, dtype)
                    drain(stream)  # the end of the member: zipfile checks the CRC here
            return arrays
    except OpenSegError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as err:
        raise OpenSegError(
            f"{path} is not a readable {kind}: it is damaged or of another kind ({err}); nothing was read"
        ) from err

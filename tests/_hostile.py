"""Builders of hostile files (compression bombs, lying headers) and a peak-memory probe for tests.

The bombs are valid: a deflate stream of ``prefix`` followed by ``zeros`` zero bytes, with correct
CRC-32 and lengths, so a reader without limits would really decompress them in full. The stream is
made by repeating one compressed mebibyte (a full flush makes every repetition byte-identical), so a
1 GiB bomb is built in a fraction of a second.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

MIB = 1 << 20


def deflate_zeros(prefix: bytes, zeros: int) -> tuple[bytes, int, int]:
    """Raw deflate of ``prefix + bytes(zeros)`` (``zeros`` a multiple of 1 MiB); its CRC-32 and length."""
    assert zeros % MIB == 0
    chunk = bytes(MIB)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    tail = zlib.compressobj(9, zlib.DEFLATED, -15).flush()  # an empty final block
    crc = zlib.crc32(prefix)
    for _ in range(zeros // MIB):
        crc = zlib.crc32(chunk, crc)
    return head + block * (zeros // MIB) + tail, crc, len(prefix) + zeros


def write_gzip_bomb(path: Path, prefix: bytes, zeros: int) -> Path:
    data, crc, size = deflate_zeros(prefix, zeros)
    header = b"\x1f\x8b\x08\x00" + b"\x00" * 4 + b"\x02\xff"
    path.write_bytes(header + data + struct.pack("<II", crc, size & 0xFFFFFFFF))
    return path


def write_zip(path: Path, members: dict[str, tuple[bytes, int]]) -> Path:
    """A zip archive whose member ``name`` holds ``prefix + bytes(zeros)``, deflated (sizes < 4 GiB)."""
    local, central = b"", b""
    for name, (prefix, zeros) in members.items():
        data, crc, size = deflate_zeros(prefix, zeros)
        encoded = name.encode()
        fields = struct.pack("<HHHHHIII", 20, 0, 8, 0, 0x21, crc, len(data), size)
        central += (
            b"PK\x01\x02"
            + struct.pack("<H", 20)
            + fields
            + struct.pack("<HHHHHII", len(encoded), 0, 0, 0, 0, 0, len(local))
            + encoded
        )
        local += b"PK\x03\x04" + fields + struct.pack("<HH", len(encoded), 0) + encoded + data
    count = len(members)
    end = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, count, count, len(central), len(local), 0)
    path.write_bytes(local + central + end)
    return path


def npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    """The bytes of an ``.npy`` header (format 1.0) declaring ``shape`` and ``dtype``."""
    text = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
    text += " " * (63 - (len(text) + 10) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode()


def nifti_header(shape: tuple[int, ...], dtype) -> bytes:
    """A NIfTI-1 single-file header (with its 4-byte extension flag) declaring ``shape`` x ``dtype``."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    return header.binaryblock + b"\x00" * 4


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def measure(code: str, setup: str = "", env: dict | None = None, timeout: float = 600) -> dict:
    """Run ``code`` in a fresh Python after ``setup`` (imports) and report what it did to memory.

    Returns ``{"error": str | None, "result": ..., "growth_mib": float, "peak_mib": float}``: the
    ``OpenSegError`` message (None when none was raised), what ``code`` left in ``result`` (JSON), the
    most resident memory the process held while ``code`` ran, and how far that is above what it held
    when ``code`` started. On Linux the kernel's peak (``VmHWM``) is reset first, so what imports
    allocated and freed does not hide what ``code`` allocates; elsewhere ``ru_maxrss`` is used, which
    can only understate the growth."""
    script = textwrap.dedent("""
        import json, resource, sys
        from napari_openseg.errors import OpenSegError
        {setup}
        def status(key):
            with open("/proc/self/status") as lines:
                return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(key))
        def maxrss():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # the peak resident size starts again from the current one
            peak, before = (lambda: status("VmHWM")), status("VmRSS")
        except OSError:
            peak, before = maxrss, maxrss()
        error = result = None
        try:
        {code}
        except OpenSegError as err:
            error = str(err)
        print(json.dumps({{"error": error, "result": result, "growth_mib": (peak() - before) / 2**20,
                          "peak_mib": peak() / 2**20}}))
    """).format(setup=textwrap.dedent(setup), code=textwrap.indent(textwrap.dedent(code), "    "))
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])

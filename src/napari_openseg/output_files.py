"""Where outputs go: checked before a run starts, written to a temporary file, and given their name
only when complete, never over a file that appeared meanwhile (unless asked to replace it) and never
over one of the run's inputs."""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from napari_openseg.errors import OpenSegError


def _new_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


#: The mode ``open()`` gives a new file under this process's umask (read once, at import).
NEW_FILE_MODE = _new_file_mode()


def same_file(first: str | Path, second: str | Path) -> bool:
    """Whether two paths name the same existing file (device and inode; links are resolved)."""
    try:
        a, b = os.stat(first), os.stat(second)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def check_output(path: str | Path, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Path:
    """Refuse, before any work is done, an output that cannot be written: an existing file unless
    ``overwrite``, a missing or read-only folder, and one of the run's ``inputs`` (the same file by
    device and inode, links included, even with ``overwrite``)."""
    path = _check_target(Path(path), overwrite)
    for source in inputs:
        if same_file(path, source):
            raise OpenSegError(
                f"{path} is the input {source}; the output must not replace an input: "
                "give the output another name"
            )
    try:  # a read-only folder, a full quota, a file system that refuses new files
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.probe-", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OpenSegError(f"cannot write in {path.parent} ({_reason(err)}); choose another folder") from err
    return path


def _check_target(path: Path, overwrite: bool) -> Path:
    if path.is_dir():
        raise OpenSegError(f"{path} is a folder; give a file name")
    if os.path.lexists(path) and not overwrite:  # a link counts, even one that leads nowhere
        raise OpenSegError(f"{path} exists; choose another name or pass --overwrite")
    if not path.parent.exists():
        raise OpenSegError(f"folder {path.parent} does not exist")
    return path


def _reason(err: OSError) -> str:
    return err.strerror or str(err) or type(err).__name__


#: What the temporary file of :func:`atomic_path` carries after the target's name (``.NAME.partial-XXXX``).
PARTIAL_MARK = ".partial-"


def partial_files(path: str | Path) -> list[Path]:
    """Temporary files :func:`atomic_path` left beside ``path`` (a process killed mid-write cannot remove
    its own); only for a caller that knows no other process is writing ``path`` now."""
    path = Path(path)
    return sorted(path.parent.glob(f".{glob.escape(path.name)}{PARTIAL_MARK}*"))


@contextlib.contextmanager
def atomic_path(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` with the same suffix; move it into place on success.

    Without ``overwrite`` the target is created exclusively (a hard link of the finished file, which
    fails if the name exists): a file that appeared meanwhile (another run writing the same output)
    is never replaced, and this result is refused instead. On any exception (including a cancelled
    run) the temporary file is removed and ``path`` is left as it was; operating-system errors (a
    full disk, a read-only folder) become ``OpenSegError``.
    """
    path = _check_target(Path(path), overwrite)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}{PARTIAL_MARK}", suffix=suffix, dir=path.parent)
    except OSError as err:
        raise OpenSegError(f"cannot write in {path.parent} ({_reason(err)}); choose another folder") from err
    tmp = Path(tmp_name)
    try:
        # mkstemp makes the file private (0600); give it the mode a plain open() would (or the replaced file's)
        os.fchmod(fd, path.stat().st_mode & 0o777 if path.exists() else NEW_FILE_MODE)
        os.close(fd)
        yield tmp
        _publish(tmp, path, overwrite)
    except OSError as err:
        raise OpenSegError(f"could not write {path} ({_reason(err)}); nothing was written") from err
    finally:
        tmp.unlink(missing_ok=True)


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Give the finished ``tmp`` the name ``path``: replacing it with ``overwrite``, else only if free."""
    if overwrite:
        os.replace(tmp, path)
        return
    taken = OpenSegError(
        f"{path} appeared while this run was writing it (another program or run?); it was "
        "left as it is and this result was not written: choose another name or pass --overwrite"
    )
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise taken from None
    except OSError:  # no hard links on this file system: claim the name exclusively, then fill it
        pass
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        raise taken from None
    try:
        os.replace(tmp, path)
    except BaseException:
        path.unlink(missing_ok=True)  # the empty placeholder this run made
        raise

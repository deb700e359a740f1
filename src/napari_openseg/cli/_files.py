"""Checks and folders that every command does the same way: inputs before any work, output folders
made when missing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path


def check_inputs(paths: Sequence[str | Path], what: str = "input") -> None:
    """Refuse, before any work, a missing input or one of a type that cannot be read (all of them
    are checked, so that the tenth of ten files is not found missing after nine were segmented)."""
    from napari_openseg.errors import OpenSegError
    from napari_openseg.io import image_format

    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        listed = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise OpenSegError(
            f"{len(missing)} {what} file{'s' if len(missing) != 1 else ''} not found: {listed}; "
            "nothing was done"
        )
    for path in paths:
        image_format(path)


@contextlib.contextmanager
def output_folder(path: str | Path, option: str) -> Iterator[Path]:
    """The folder named by ``option`` (``--out-dir``), made with its parents when missing; a folder
    made here is removed again if the command stops with an error before anything was written in it."""
    from napari_openseg.errors import OpenSegError

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise OpenSegError(f"{option} {folder} is a file; it names the folder for the outputs")
    made = [] if folder.exists() else _make(folder)
    try:
        yield folder
    except BaseException:
        for new in made:  # deepest first; only folders this command made, and only while empty
            with contextlib.suppress(OSError):
                new.rmdir()
        raise


def _make(folder: Path) -> list[Path]:
    """Make ``folder`` and its missing parents; returns the ones made, deepest first."""
    new = []
    current = folder
    while not current.exists():
        new.append(current)
        current = current.parent
    folder.mkdir(parents=True)
    return new

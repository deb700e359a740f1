"""A long benchmark's ``--json`` file, kept after every set, and runs over different sets read as one.

``write_run`` replaces the file whole (:func:`napari_openseg.output_files.atomic_path`: a temporary
file in the same folder, then a rename), so a run stopped at any moment leaves the last complete
file, with the same layout as the final one.
``merge_runs`` reads several such files (runs side by side over different ``--sets``) and refuses
to merge runs whose settings differ.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from napari_openseg.output_files import atomic_path


def write_run(path: str | Path, payload: dict | list) -> None:
    """Write ``payload`` as JSON to ``path``, atomically: readers see the old file or the new one."""
    with atomic_path(path, overwrite=True) as temporary:
        temporary.write_text(json.dumps(payload, indent=1))


def merge_runs(
    files: Sequence[str | Path],
    same: Sequence[str],
    settings: Callable[[dict], dict] = lambda run: run,
) -> tuple[list[dict], dict]:
    """The runs saved in ``files`` and their ``"results"`` merged into one dict (a set in two files:
    the later file's). ``settings(run)`` holds the keys ``same`` that every run must share."""
    runs = [json.loads(Path(f).read_text()) for f in files]
    for file, run in zip(files[1:], runs[1:]):
        differs = [k for k in same if settings(run).get(k) != settings(runs[0]).get(k)]
        if differs:
            raise SystemExit(
                f"{file} differs from {files[0]} in {', '.join(differs)}: their tables cannot be merged"
            )
    results: dict = {}
    for run in runs:
        results.update(run["results"])
    return runs, results

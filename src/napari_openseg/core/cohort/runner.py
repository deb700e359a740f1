"""Cohorts: one task (a support set's segmentation, a novelty map) over many files, resumable.

:func:`plan_cohort` checks every input before any work (missing files are listed together), names each
output ``<input name>_<tag>.<suffix>`` in the output folder (:func:`~napari_openseg.io.result_path`, one
per tag of the task: a novelty map and its novel region) and reads the folder's ``manifest.csv``: an
item whose row says ``done`` with the same settings hash and lists all its outputs, and whose outputs
all exist, is skipped; one missing output recomputes the item, and any changed setting (options, the
support set's entries, the weights' bytes) changes the hash and recomputes it. :func:`iter_cohort`
runs the rest on Dask (:mod:`.cohort_dask`) or in this process, yielding progress per finished item.
The manifest is rewritten atomically as items finish (at most once a second, and at the end); items
not yet finished are ``pending`` in it. Outputs are written whole or not at all (each file), and
temporary files a killed worker left are removed at the start and end of a run, which a lock file
keeps to one at a time per folder. A failed item (an unreadable file, a 4D image, ...) is recorded with
its message; the others go on.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import os
import socket
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_openseg.core.cohort.tasks import (
    CohortItem,
    CohortJob,
    CohortTask,
    ItemResult,
    process_item,
    settings_hash,
)
from napari_openseg.core.progress import Progress, run_to_end
from napari_openseg.errors import OpenSegError

MANIFEST_NAME = "manifest.csv"
#: The columns a manifest must have; ``outputs`` (added later) may be missing in one written before.
REQUIRED_FIELDS = ("input", "output", "status", "error", "seconds", "device", "settings_hash")
#: ``output``: an item's main output, which names its row; ``outputs``: all its files, main first,
#: separated by :data:`OUTPUTS_SEPARATOR`.
MANIFEST_FIELDS = (*REQUIRED_FIELDS, "outputs")
OUTPUTS_SEPARATOR = ";"
LOCK_NAME = ".openseg-batch.lock"
#: Seconds between two rewrites of the manifest while items finish.
MANIFEST_INTERVAL = 1.0


def _listing(paths: Sequence[Any], limit: int = 10) -> str:
    shown = ", ".join(str(p) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _is_image(path: Path) -> bool:
    from napari_openseg.io import image_format

    try:
        image_format(path)
    except OpenSegError:
        return False
    return True


def _from_csv(path: Path) -> list[Path]:
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise OpenSegError(f"{path}: could not be read as a CSV manifest ({err})") from err
    if not rows or "path" not in rows[0]:
        raise OpenSegError(f"{path}: a CSV manifest needs a 'path' column with one input per row")
    return [path.parent / row["path"].strip() for row in rows if (row.get("path") or "").strip()]


def collect_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files, folders (their image files), glob patterns, or one CSV manifest with a ``path`` column
    (relative paths from the CSV's folder) -> the input files, in order, each once. Missing files and
    patterns that match nothing are listed together in one ``OpenSegError``."""
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise OpenSegError("no inputs: give files, folders, glob patterns or one CSV manifest")
    if any(p.suffix.lower() == ".csv" for p in inputs):
        if len(inputs) > 1:
            raise OpenSegError("a CSV manifest lists every input: give it alone")
        inputs = _from_csv(inputs[0]) if inputs[0].is_file() else inputs
    found: list[Path] = []
    missing: list[str] = []
    for path in inputs:
        if path.is_dir():
            found += sorted(
                p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and _is_image(p)
            )
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(str(path)):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            found += matches if matches else []
            if not matches:
                missing.append(f"{path} (matches nothing)")
        else:
            missing.append(str(path))
    if missing:
        raise OpenSegError(f"{len(missing)} input(s) not found: {_listing(missing)}")
    unique = list(dict.fromkeys(p.absolute() for p in found))
    unsupported = [p for p in unique if not _is_image(p)]
    if unsupported:
        raise OpenSegError(
            f"not image files (.nii/.nii.gz, .tif/.tiff, .npy, .png/.jpg): {_listing(unsupported)}"
        )
    if not unique:
        raise OpenSegError(f"no image files in {_listing(inputs)}")
    return unique


def read_manifest(path: str | Path) -> dict[str, dict[str, str]]:
    """A folder's manifest rows by output name (empty when there is none)."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            if not set(REQUIRED_FIELDS) <= set(reader.fieldnames or ()):
                raise OpenSegError(
                    f"{path} is not a batch manifest (it lacks the columns {', '.join(REQUIRED_FIELDS)});"
                    " move it away or choose another output folder"
                )
            return {row["output"]: row for row in reader}
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise OpenSegError(
            f"{path} could not be read ({err}); move it away or choose another output folder"
        ) from err


def write_manifest(path: Path, rows: dict[str, dict[str, str]]) -> None:
    """Write the rows (sorted by output name) atomically."""
    from napari_openseg.output_files import atomic_path

    with atomic_path(path, overwrite=True) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, MANIFEST_FIELDS)
        writer.writeheader()
        for name in sorted(rows):
            writer.writerow({key: rows[name].get(key) or "" for key in MANIFEST_FIELDS})


def output_names(item: CohortItem) -> str:
    """The manifest's ``outputs`` of an item: its files' names, main first."""
    return OUTPUTS_SEPARATOR.join(path.name for path in item.outputs)


def listed_outputs(row: dict[str, str] | None) -> set[str]:
    """The file names a manifest row claims (``output`` alone in a manifest written before ``outputs``)."""
    if row is None:
        return set()
    return set(filter(None, (row.get("outputs") or row["output"]).split(OUTPUTS_SEPARATOR)))


@dataclass
class CohortPlan:
    """The items of a cohort run: ``todo`` to compute, ``skipped`` already done with these settings."""

    task: CohortTask
    out_dir: Path
    settings_hash: str
    todo: list[CohortItem]
    skipped: list[CohortItem]
    rows: dict[str, dict[str, str]]

    @property
    def manifest(self) -> Path:
        return self.out_dir / MANIFEST_NAME


def plan_cohort(
    task: CohortTask, inputs: Sequence[str | Path], out_dir: str | Path, *, overwrite: bool = False
) -> CohortPlan:
    """Check the inputs and the task, and decide which items to compute (see the module's notes).

    An existing output that the folder's manifest does not list is someone else's file: it is replaced
    only with ``overwrite``.
    """
    from napari_openseg.io import result_path

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise OpenSegError(f"output folder {out_dir} does not exist")
    for given in inputs:
        if Path(given).is_dir() and Path(given).resolve() == out_dir.resolve():
            raise OpenSegError(f"{out_dir} is the output folder; keep the inputs in another folder")
    sources = collect_inputs(inputs)
    items = [
        CohortItem(source, tuple(result_path(out_dir, source, tag) for tag in task.tags))
        for source in sources
    ]
    by_output: dict[Path, list[Path]] = {}
    for item in items:
        for output in item.outputs:
            by_output.setdefault(output, []).append(item.source)
    clashes = [f"{', '.join(map(str, s))} -> {o.name}" for o, s in by_output.items() if len(s) > 1]
    if clashes:
        raise OpenSegError(
            f"inputs with the same name would share an output ({_listing(clashes, 3)}): "
            "rename them or run them into different output folders"
        )
    given = {source.resolve() for source in sources}
    both = [output for item in items for output in item.outputs if output.resolve() in given]
    if both:
        raise OpenSegError(
            f"{_listing(both)}: an output would replace one of the inputs; "
            "keep the inputs out of the output folder"
        )
    task.check()  # a support set, model, weights or option that cannot be used fails here, before any work
    digest = settings_hash(task)
    rows = read_manifest(out_dir / MANIFEST_NAME)
    todo, skipped, foreign = [], [], []
    for item in items:
        row = rows.get(item.output.name)
        unlisted = [path for path in item.outputs if path.name not in listed_outputs(row)]
        if (
            row is not None
            and row["status"] == "done"
            and row["settings_hash"] == digest
            and row["input"] == str(item.source)
            and not unlisted
            and all(path.is_file() for path in item.outputs)
        ):
            skipped.append(item)
            rows[item.output.name] = {**row, "outputs": output_names(item)}
            continue
        if not overwrite:
            foreign += [path for path in unlisted if os.path.lexists(path)]
        todo.append(item)
    if foreign:
        raise OpenSegError(
            f"{len(foreign)} output(s) exist that {MANIFEST_NAME} does not list: "
            f"{_listing(foreign)}; pass --overwrite to replace them or choose another folder"
        )
    return CohortPlan(task, out_dir, digest, todo, skipped, rows)


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """One cohort run per output folder at a time; a lock left by a dead process on this host is taken."""
    lock = folder / LOCK_NAME
    here = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            host, _, pid = lock.read_text().strip().partition(" ")
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                lock.unlink(missing_ok=True)  # its process is gone: take it over
                continue
            raise OpenSegError(
                f"another batch run (process {pid or '?'} on {host or '?'}) is writing to {folder}; "
                f"wait for it, or delete {lock} if it has stopped"
            ) from None
        with os.fdopen(fd, "w") as handle:
            handle.write(here)
        break
    else:
        raise OpenSegError(f"another batch run took {lock} at the same moment; wait for it to finish")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_partials(plan: CohortPlan) -> None:
    from napari_openseg.output_files import partial_files

    for item in plan.todo:
        for output in item.outputs:
            for stale in partial_files(output):
                stale.unlink(missing_ok=True)
    for stale in partial_files(plan.manifest):
        stale.unlink(missing_ok=True)


@dataclass
class CohortSummary:
    """The results of a run's computed items and the items skipped as already done."""

    results: list[ItemResult]
    skipped: list[CohortItem]
    manifest: Path
    dashboard: str | None = None
    failures: list[ItemResult] = field(init=False)

    def __post_init__(self) -> None:
        self.failures = [r for r in self.results if r.status != "done"]

    @property
    def done(self) -> int:
        return len(self.results) - len(self.failures)


def _row(result: ItemResult, digest: str) -> dict[str, str]:
    return {
        "input": str(result.item.source),
        "output": result.item.output.name,
        "status": result.status,
        "error": result.error,
        "seconds": f"{result.seconds:.2f}",
        "device": result.device,
        "settings_hash": digest,
        "outputs": output_names(result.item),
    }


def iter_cohort(
    plan: CohortPlan,
    *,
    scheduler: Any = "local",
    workers: int | None = None,
    threads_per_worker: int | None = None,
    dashboard: bool = True,
) -> Generator[Progress, None, CohortSummary]:
    """Run a plan's items; yield progress per finished item, return a :class:`CohortSummary`.

    Parameters
    ----------
    scheduler
        ``"local"``: a Dask cluster on this machine, sized to it (``workers``, ``threads_per_worker``
        within its cores; one worker per GPU); an address (``"tcp://host:8786"``) or a
        ``distributed.Client``: a running Dask cluster; ``None``: in this process, without Dask.

    Each progress record's ``payload`` holds ``result`` (an :class:`ItemResult`) once an item has
    finished; the first holds ``dashboard``, Dask's dashboard link or ``None``, and ``cluster``, where
    the items run, in words. Stopping the generator (Ctrl+C, closing it) cancels what is running;
    finished items stay done in the manifest.
    """
    from napari_openseg.core.cohort.cluster import dask_session, iter_dask_results, require_distributed

    if scheduler is not None:
        require_distributed()
    rows = dict(plan.rows)
    results: list[ItemResult] = []
    total = len(plan.todo)
    session = None

    def stage() -> str:
        failed = sum(r.status != "done" for r in results)
        text = f"{len(results) - failed} done, {failed} failed"
        return text + (f" ({len(plan.skipped)} done before)" if plan.skipped else "")

    with folder_lock(plan.out_dir), contextlib.ExitStack() as stack:
        stack.callback(_remove_partials, plan)  # after the cluster below has closed (LIFO)
        stack.callback(lambda: write_manifest(plan.manifest, rows))
        _remove_partials(plan)
        for item in plan.todo:
            rows[item.output.name] = {
                "input": str(item.source),
                "output": item.output.name,
                "status": "pending",
                "settings_hash": plan.settings_hash,
                "outputs": output_names(item),
            }
        write_manifest(plan.manifest, rows)
        job = CohortJob(plan.task, plan.settings_hash)
        if scheduler is None or not plan.todo:
            finished = (process_item(item, job) for item in plan.todo)
        else:
            session = stack.enter_context(
                dask_session(
                    scheduler,
                    device=plan.task.options.get("device", "auto"),
                    workers=workers,
                    threads_per_worker=threads_per_worker,
                    items=total,
                    dashboard=dashboard,
                )
            )
            job = CohortJob(plan.task, plan.settings_hash, session.torch_threads, session.spread_gpus)
            finished = iter_dask_results(session, plan.todo, job)
        stack.callback(finished.close)  # first: cancel what still runs while the client is connected
        link = session.dashboard if session is not None else None
        where = session.description if session is not None else "this process"
        yield Progress(0, total, stage(), {"dashboard": link, "cluster": where})
        written = time.monotonic()
        for result in finished:
            results.append(result)
            rows[result.item.output.name] = _row(result, plan.settings_hash)
            if time.monotonic() - written >= MANIFEST_INTERVAL:
                write_manifest(plan.manifest, rows)
                written = time.monotonic()
            yield Progress(len(results), total, stage(), {"result": result})
    return CohortSummary(results, plan.skipped, plan.manifest, link)


def run_cohort(
    task: CohortTask,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    **run_options,
) -> CohortSummary:
    """:func:`plan_cohort` and :func:`iter_cohort` to the end (``run_options`` are the latter's)."""
    return run_to_end(iter_cohort(plan_cohort(task, inputs, out_dir, overwrite=overwrite), **run_options))

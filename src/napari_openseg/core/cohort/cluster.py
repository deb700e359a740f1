"""Cohort items on Dask (``dask.distributed``): a local cluster sized to this machine, or a running
scheduler at an address (dask-jobqueue on SLURM/PBS, Kubernetes, ``dask scheduler``).

Dask schedules; this module only sizes a local cluster, connects, submits one task per item
(:func:`~napari_openseg.core.cohort.tasks.process_item`) and hands results back as they finish. The
job (task and settings hash) is sent to the workers once, not with every item.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from napari_openseg.core.cohort.tasks import CohortItem, CohortJob, ItemResult, failure_message, process_item
from napari_openseg.errors import OpenSegError

log = logging.getLogger(__name__)

#: Seconds a run waits for a running scheduler's first worker (batch jobs may still be queued).
WORKER_TIMEOUT_S = 600.0

#: How users get Dask: the package extra that carries it.
INSTALL_HINT = "pip install 'napari-openseg[cluster]' (or: pip install distributed)"


def require_distributed():
    """The ``distributed`` module, or an ``OpenSegError`` that says how to install it."""
    try:
        import distributed
    except ImportError as err:
        raise OpenSegError(
            f"running a cohort on Dask needs dask.distributed, which is not installed: {INSTALL_HINT}; "
            "or run it in this process, without Dask, with --scheduler none"
        ) from err
    return distributed


def available_cores() -> int:
    """The cores this process may use (its CPU affinity, which batch systems restrict)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _item_threads(cores: int) -> int:
    """Torch threads per item: ``OMP_NUM_THREADS`` when set (as torch itself reads it), else ``cores``."""
    wanted = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, min(int(wanted), cores)) if wanted.isdigit() and int(wanted) > 0 else max(1, cores)


@dataclass(frozen=True)
class LocalLayout:
    """A local cluster: ``workers`` processes of ``threads`` task threads, each task using
    ``torch_threads`` cores; ``spread_gpus``: worker N uses GPU N."""

    workers: int
    threads: int
    torch_threads: int
    spread_gpus: bool = False


def local_layout(device: Any, workers: int | None, threads: int | None, items: int) -> LocalLayout:
    """Size a local cluster: on the CPU, workers x threads <= cores (default: one single-threaded
    worker per core), each item's network on cores / (workers x threads) torch threads, or fewer if
    ``OMP_NUM_THREADS`` says so; on GPUs, one worker per device. Never more workers than items."""
    import torch

    from napari_openseg.core.device import resolve_device

    if (workers is not None and workers < 1) or (threads is not None and threads < 1):
        raise OpenSegError(f"workers and threads per worker must be >= 1, got {workers} and {threads}")
    cores = available_cores()
    threads = threads or 1
    chosen = resolve_device(device)
    if chosen.type != "cpu":
        devices = torch.cuda.device_count() if chosen.type == "cuda" and chosen.index is None else 1
        workers = workers or devices
        if workers > devices:
            raise OpenSegError(
                f"{workers} workers asked for, but {chosen} gives {devices} device(s): "
                "a local cluster runs one worker per GPU"
            )
        workers = max(1, min(workers, items))
        return LocalLayout(workers, threads, _item_threads(cores // workers), spread_gpus=devices > 1)
    workers = workers or max(1, cores // threads)
    if workers * threads > cores:
        raise OpenSegError(
            f"{workers} workers x {threads} threads = {workers * threads} exceeds the {cores} "
            "cores of this machine, which would make the run slower, not faster; ask for fewer"
        )
    workers = max(1, min(workers, items))
    return LocalLayout(workers, threads, _item_threads(cores // (workers * threads)))


@dataclass
class DaskSession:
    """A connected client and what the job needs to know about its workers."""

    client: Any
    torch_threads: int | None
    spread_gpus: bool
    dashboard: str | None
    description: str


def _dashboard_link(client, local: bool = False) -> str | None:
    """The dashboard's address when one runs (its pages need bokeh where the scheduler runs)."""
    if local and not _bokeh_installed():
        return None
    try:
        services = client.scheduler_info().get("services", {})
    except Exception:  # an old or unusual scheduler: no link, no failure
        return None
    return client.dashboard_link if "dashboard" in services else None


def _bokeh_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("bokeh") is not None


@contextlib.contextmanager
def dask_session(
    scheduler: Any,
    *,
    device: Any = "auto",
    workers: int | None = None,
    threads_per_worker: int | None = None,
    items: int = 1,
    dashboard: bool = True,
) -> Iterator[DaskSession]:
    """Connect to Dask for the length of the block: ``scheduler`` is ``"local"`` (a cluster started
    here and closed at the end), an address such as ``tcp://host:8786``, or a ``distributed.Client``
    (used as it is and left open)."""
    distributed = require_distributed()
    if isinstance(scheduler, distributed.Client):
        yield DaskSession(scheduler, None, False, _dashboard_link(scheduler), "the given Dask client")
        return
    if scheduler == "local":
        layout = local_layout(device, workers, threads_per_worker, items)
        cluster = distributed.LocalCluster(
            n_workers=layout.workers,
            threads_per_worker=layout.threads,
            processes=True,
            dashboard_address=":8787" if dashboard and _bokeh_installed() else ":0",
            silence_logs=logging.ERROR,
        )
        try:
            with distributed.Client(cluster) as client:
                yield DaskSession(
                    client,
                    layout.torch_threads,
                    layout.spread_gpus,
                    _dashboard_link(client, True),
                    f"local Dask cluster: {layout.workers} worker(s) x {layout.threads} thread(s)",
                )
        finally:
            cluster.close()
        return
    if workers is not None or threads_per_worker is not None:
        raise OpenSegError(
            "--workers and --threads-per-worker size a local cluster; a running scheduler "
            "has the workers it was started with"
        )
    try:
        client = distributed.Client(scheduler, timeout="30s")
    except (OSError, TimeoutError, ValueError) as err:
        raise OpenSegError(
            f"could not reach a Dask scheduler at {scheduler!r} ({err}); start one (dask "
            "scheduler, dask-jobqueue, Kubernetes) or use --scheduler local"
        ) from err
    with client:
        yield DaskSession(client, None, False, _dashboard_link(client), f"Dask scheduler at {scheduler}")


def iter_dask_results(
    session: DaskSession, items: Sequence[CohortItem], job: CohortJob
) -> Iterator[ItemResult]:
    """Submit every item and yield results as they finish; items still running when the caller
    stops are cancelled. A task Dask itself gives up on (its worker died, even on retries) is a failed
    item."""
    from distributed import as_completed

    client = session.client
    try:
        client.wait_for_workers(1, timeout=WORKER_TIMEOUT_S)
    except (TimeoutError, asyncio.TimeoutError) as err:  # the same class from Python 3.11
        raise OpenSegError(
            f"no Dask worker joined the scheduler within {WORKER_TIMEOUT_S:.0f} s; start workers "
            "(dask worker ADDRESS, dask-jobqueue's scale) and run the command again"
        ) from err
    shared = client.scatter(job, broadcast=True, hash=False)
    futures = {client.submit(process_item, item, shared, pure=False): item for item in items}
    try:
        for future in as_completed(list(futures)):
            item = futures.pop(future)
            try:
                yield future.result()
            except Exception as err:  # KilledWorker, a result that could not come back, ...
                yield ItemResult(item, "failed", f"Dask could not run it: {failure_message(err)}")
    finally:
        if futures:
            client.cancel(list(futures), force=True)
        client.cancel([shared], force=True)

"""The dask cluster a fit runs on: the one at ``address``, or a local one started here."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

# A second local cluster on this machine (another fit, a test run) finds the scheduler's HTTP
# port taken and moves to a free one: no news for the user, and it would turn a one-line error
# into a multi-line warning on stderr.
warnings.filterwarnings("ignore", message=r"Port \d+ is already in use", category=UserWarning)

# Share of the memory available at start that a local cluster's tasks may hold at once: the
# rest is for the process itself, page cache and whatever else runs (an extraction, say).
MEMORY_FRACTION = 0.5


def bounded_count(wanted: int, available_bytes: float, bytes_each: float, fraction: float = MEMORY_FRACTION) -> int:
    """How many of ``wanted`` concurrent tasks of ``bytes_each`` fit in ``fraction`` of ``available_bytes`` (≥ 1)."""
    if bytes_each <= 0:
        return max(1, wanted)
    return max(1, min(wanted, int(fraction * available_bytes // bytes_each)))


def machine() -> tuple[int, int]:
    """Cores this process may use (affinity and cgroup quota) and bytes of memory available now."""
    import psutil
    from dask.system import CPU_COUNT
    from distributed.system import MEMORY_LIMIT

    return CPU_COUNT, int(min(psutil.virtual_memory().available, MEMORY_LIMIT))


def local_threads(thread_bytes: float = 0) -> int:
    """Task threads of a local cluster: ``$SOAPFLOW_FIT_THREADS``, else one per core as long as
    each thread's ``thread_bytes`` of blocks in flight fit in ``MEMORY_FRACTION`` of free memory.

    Within one refit the fit never meets the extraction (it starts on finalized stores). Beside
    an extraction in another process the two share the cores as any two programs do: the fit's
    threads run single-threaded BLAS, so it adds one runnable thread per core, and its memory
    stays within the share of what was free when it started (``benchmarks/fit.py --scale``'s
    ``load`` run prints both slow-downs)."""
    override = os.environ.get("SOAPFLOW_FIT_THREADS")
    if override:
        try:
            threads = int(override)
        except ValueError:
            threads = 0
        if threads < 1:
            from soapflow.errors import SoapError

            raise SoapError(f"SOAPFLOW_FIT_THREADS must be a whole number ≥ 1, got {override!r}")
        return threads
    cores, available = machine()
    return bounded_count(cores, available, thread_bytes)


@contextlib.contextmanager
def dask_client(address: str | None = None, workers: int = 1, processes: bool = False, *,
                threads: int | None = None, thread_bytes: float | None = None):
    """Yield a ``distributed.Client``.

    The local default is one worker in this process with ``local_threads(thread_bytes)``
    task threads (one per core, fewer where memory is short) and single-threaded BLAS while
    the cluster runs: the casts, subtractions and reads between GEMMs then keep every core
    busy too, which multi-threaded BLAS on fewer task threads does not. Memory is
    ``thread_bytes`` per thread (default: a fit leaf's, ``soapflow.fit.LEAF_BYTES``), whatever
    the store's size. BLAS results do not depend on its thread count, so neither does the
    artifact. Pass ``workers``/``processes`` for a wider local cluster (one task thread per
    worker process), or ``address`` to use a running one.
    """
    from distributed import Client, LocalCluster, rejoin, secede

    logging.getLogger("distributed").setLevel(logging.WARNING)  # Prefect's log config shows INFO

    if address:
        # A task on a dask worker (the refit flow's fit under DaskTaskRunner) that waits on tasks it
        # submits leaves the worker's thread pool meanwhile, as dask's worker_client does: the
        # worker may run those very tasks, which on a cluster of one-thread workers would
        # otherwise wait forever for the thread this one holds.
        on_worker = _on_worker_thread()
        if on_worker:
            secede()
        try:
            with Client(address) as client:
                yield client
        finally:
            if on_worker:
                rejoin()
        return
    from threadpoolctl import threadpool_limits

    if threads is None:
        if thread_bytes is None:
            from soapflow.fit import LEAF_BYTES as thread_bytes
        threads = 1 if processes else local_threads(thread_bytes)
    blas = 1 if threads > 1 else None  # None: leave BLAS its own threads
    with threadpool_limits(limits=blas, user_api="blas"), LocalCluster(
        n_workers=workers,
        threads_per_worker=threads,
        processes=processes,
        dashboard_address=None,
        silence_logs=logging.ERROR,
    ) as cluster, Client(cluster) as client:
        yield client


def _on_worker_thread() -> bool:
    """Whether this code runs as a task in a dask worker's thread pool."""
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:
        return False
    return True

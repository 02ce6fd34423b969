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


MAX_LOCAL_THREADS = int(os.environ.get("SOAPFLOW_FIT_THREADS", "4"))  # memory grows with blocks in flight; more threads rarely help a 2-pass GEMM


@contextlib.contextmanager
def dask_client(address: str | None = None, workers: int = 1, processes: bool = False):
    """Yield a ``distributed.Client``.

    The local default is one worker in this process with one task thread per core (at most
    ``MAX_LOCAL_THREADS``) and single-threaded BLAS while the cluster runs, so that the casts,
    subtractions and reads between GEMMs keep every core busy too. Memory is a few blocks per
    thread, whatever the store's size. BLAS results do not depend on its thread count, so neither
    does the artifact. Pass ``workers``/``processes`` for a wider local cluster (dask's
    worker processes run single-threaded BLAS by default), or ``address`` to use a running one.
    """
    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.WARNING)  # Prefect's log config shows INFO

    if address:
        with Client(address) as client:
            yield client
        return
    from threadpoolctl import threadpool_limits

    threads = 1 if processes else max(1, min(os.cpu_count() or 1, MAX_LOCAL_THREADS))
    blas = 1 if threads > 1 else None  # None: leave BLAS its own threads
    with threadpool_limits(limits=blas, user_api="blas"), LocalCluster(
        n_workers=workers,
        threads_per_worker=threads,
        processes=processes,
        dashboard_address=None,
        silence_logs=logging.ERROR,
    ) as cluster, Client(cluster) as client:
        yield client

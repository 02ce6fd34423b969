"""The dask cluster a fit runs on: the one at ``address``, or a local one started here."""

from __future__ import annotations

import contextlib
import logging
import warnings

# A second local cluster on this machine (another fit, a test run) finds the scheduler's HTTP
# port taken and moves to a free one: no news for the user, and it would turn a one-line error
# into a multi-line warning on stderr.
warnings.filterwarnings("ignore", message=r"Port \d+ is already in use", category=UserWarning)


@contextlib.contextmanager
def dask_client(address: str | None = None, workers: int = 1, processes: bool = False):
    """Yield a ``distributed.Client``.

    The local default is one worker with one task thread in this process: NumPy's BLAS
    already uses every core inside a task, and one block in flight keeps memory at a few
    blocks whatever the store's size. Pass ``workers``/``processes`` for a wider local
    cluster, or ``address`` to use a running one.
    """
    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.WARNING)  # Prefect's log config shows INFO

    if address:
        with Client(address) as client:
            yield client
        return
    with LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=processes,
        dashboard_address=None,
        silence_logs=logging.ERROR,
    ) as cluster, Client(cluster) as client:
        yield client

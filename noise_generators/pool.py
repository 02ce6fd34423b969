"""Threads that run torch single-threaded, for spreading independent CPU blocks over cores.

Each block is then computed by one thread exactly as it would be with ``torch.set_num_threads(1)``,
so results are bit-identical whatever the pool size. Two things make a plain thread pool fail
here: torch's per-op OpenMP teams from several threads oversubscribe the cores (and their
spinning workers steal the cores NumPy threads need), and ``torch.set_num_threads`` is per
thread for OpenMP but also resets the process default. So each pool thread sets one thread for
itself once, and the caller's default is restored after all have done so.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}
# A forked child has none of the parent's threads: its pools would accept work and never run it.
os.register_at_fork(after_in_child=_pools.clear)


def single_threaded_pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``workers`` threads, each running torch ops on one thread."""
    with _lock:
        pool = _pools.get(workers)
        if pool is None:
            before = torch.get_num_threads()
            ready = threading.Barrier(workers + 1)

            def init() -> None:
                torch.get_num_threads()  # torch's lazy per-thread init first, or it undoes the next line
                torch.set_num_threads(1)
                ready.wait()

            pool = ThreadPoolExecutor(workers, thread_name_prefix="soapflow-cpu", initializer=init)
            for _ in range(workers):  # no thread idles before the barrier, so each submit starts one
                pool.submit(lambda: None)
            ready.wait()
            torch.set_num_threads(before)
            _pools[workers] = pool
        return pool

"""One OpenMP team at a time: torch work that must not leave one behind on the caller's thread.

torch's CPU ops run on libgomp. The first multi-threaded op a thread runs gives that thread a team
of worker threads, which it keeps until it exits. While the teams' threads together outnumber the
cores, libgomp lets every worker spin only briefly before sleeping between two ops, so each op of a
forward pays a futex wake-up and the cores idle meanwhile (``benchmarks/forward_thread.py`` counts
the sleeps and the CPU use). Work such as loading a model therefore runs on a thread that exits when
it is done, taking its team with it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")


def on_passing_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on a new thread that exits before this returns (its exceptions
    are raised here). A Ctrl-C meanwhile is raised at once: the thread finishes in the background."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="passing")
    try:
        result = pool.submit(fn, *args, **kwargs).result()
    except BaseException:
        pool.shutdown(wait=False)
        raise
    pool.shutdown(wait=True)
    return result
